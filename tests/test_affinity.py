"""entitlement/affinity.py's pure parts: reading ENTITLEMENT_CPU_AFFINITY and choosing each server
process's CPU (the pinning itself is tested on real server processes: tests/test_processes.py)."""

from __future__ import annotations

import pytest

from entitlement import affinity


@pytest.mark.parametrize("raw, parsed", [
    ("auto", "auto"), (" AUTO ", "auto"), ("off", "off"), ("Off", "off"),
    ("0", (0,)), ("3,1", (3, 1)), ("0-3", (0, 1, 2, 3)), ("2, 0-1", (2, 0, 1)), ("1,1,0-1", (1, 0)),
    ("8191", (8191,)),
])
def test_parse(raw: str, parsed: object) -> None:
    assert affinity.parse(raw) == parsed


@pytest.mark.parametrize("raw", ["", "on", "0,", ",0", "1-0", "-1", "0-", "1.5", "0 1", "8192", "0-99999999999"])
def test_parse_refuses_naming_the_variable(raw: str) -> None:
    with pytest.raises(SystemExit) as exc:
        affinity.parse(raw)
    assert "ENTITLEMENT_CPU_AFFINITY must be auto, off or a list of CPUs" in str(exc.value)
    assert repr(raw) in str(exc.value)


def test_auto_pins_only_one_process_per_cpu() -> None:
    two = {0, 1}
    assert [affinity.choose("auto", i, 2, two) for i in range(2)] == [0, 1]
    assert [affinity.choose("auto", i, 3, {4, 2, 7}) for i in range(3)] == [2, 4, 7]
    assert affinity.choose("auto", 0, 1, two) is None           # a lone process: its neighbours unknown
    assert affinity.choose("auto", 0, 1, {5}) is None           # (one CPU: nothing to choose)
    assert affinity.choose("auto", 0, 2, {0, 1, 2, 3}) is None  # fewer processes than CPUs
    assert affinity.choose("auto", 2, 3, two) is None           # more processes than CPUs


def test_a_list_pins_process_i_on_its_ith_cpu_wrapping_round() -> None:
    allowed = {0, 1, 2, 3}
    assert [affinity.choose((3, 1), i, 3, allowed) for i in range(3)] == [3, 1, 3]
    assert affinity.choose((2,), 0, 1, allowed) == 2
    assert affinity.choose("2,3", 1, 2, allowed) == 3  # the text of a list, as a Settings built by hand may hold
    assert affinity.choose("off", 0, 4, allowed) is None


def test_a_list_naming_cpus_not_allowed_is_refused() -> None:
    with pytest.raises(SystemExit) as exc:
        affinity.choose((1, 6), 0, 1, {0, 1, 2, 4})
    assert str(exc.value) == ("ENTITLEMENT_CPU_AFFINITY: CPU 6 is not one this process may run on "
                              "(it may run on 0-2,4)")
    with pytest.raises(SystemExit) as exc:
        affinity.choose((6, 7), 0, 1, {0})
    assert "CPUs 6, 7 are not ones this process may run on (it may run on 0)" in str(exc.value)


def test_ranges() -> None:
    assert affinity.ranges([]) == ""
    assert affinity.ranges([3]) == "3"
    assert affinity.ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
