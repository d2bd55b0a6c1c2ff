"""The generated stubs in entitlement/v1 are exactly what scripts/gen_protos.py makes of proto/:
a proto change without regeneration (or a hand edit of generated code) cannot land."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from entitlement.config import ROOT

PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
SCRIPT = Path("scripts") / "gen_protos.py"


def _check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, str(root / SCRIPT), "--check"], cwd=root, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """proto/, scripts/ and entitlement/v1 copied with the same layout (the script works relative to
    its own location)."""
    root = tmp_path / "repo"
    for part in ("proto", "scripts", "entitlement/v1"):
        shutil.copytree(ROOT / part, root / part, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_committed_stubs_are_current() -> None:
    result = _check(ROOT)
    assert result.returncode == 0, result.stderr
    assert "generated code is current" in result.stdout


def test_the_copy_is_current_before_any_change(copy: Path) -> None:
    result = _check(copy)
    assert result.returncode == 0, result.stderr


def test_a_changed_proto_makes_its_stubs_stale(copy: Path) -> None:
    proto = copy / "proto" / "entitlement" / "v1" / "common.proto"
    text = proto.read_text(encoding="utf-8")
    assert text.rstrip().endswith("}")
    proto.write_text(text + "\nmessage AddedByTheStalenessTest {\n  string note = 1;\n}\n", encoding="utf-8")

    result = _check(copy)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "generated code is stale" in result.stderr
    stale = result.stderr.split(": ", 1)[1].strip().split(", ")
    assert "common_pb2.py" in stale and "common_pb2.pyi" in stale
    assert not any(name.startswith(("activation", "audit", "eligibility")) for name in stale), stale
    # --check never writes: the committed copy is left as it was.
    assert (copy / "entitlement" / "v1" / "common_pb2.py").read_bytes() == (
        ROOT / "entitlement" / "v1" / "common_pb2.py").read_bytes()


def test_a_hand_edit_or_a_stray_file_is_stale(copy: Path) -> None:
    generated = copy / "entitlement" / "v1" / "audit_pb2_grpc.py"
    generated.write_text(generated.read_text(encoding="utf-8") + "# edited by hand\n", encoding="utf-8")
    (copy / "entitlement" / "v1" / "leftover_pb2.py").write_text("# from a deleted proto\n", encoding="utf-8")

    result = _check(copy)
    assert result.returncode == 1
    stale = result.stderr.split(": ", 1)[1].strip().split(", ")
    assert sorted(stale) == ["audit_pb2_grpc.py", "leftover_pb2.py"]
