"""Calls leave no reference cycles of ours (or of SQLAlchemy's through ours) for the cyclic
collector: what reference counting frees goes at once, and what only the collector can free is
collected in young-generation runs that stop every thread of the server (2-4 ms each under load,
when an activation left about 50 such objects: docs/PERFORMANCE-LOG.md, ninth session). Over the real
channel, on both backends (gRPC's own per-call cycles in its event-loop server are not ours: only
objects of SQLAlchemy's and of this service's modules are counted)."""

from __future__ import annotations

import gc
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from support import Api, identity, next_person

from sqlalchemy import Engine

from entitlement.storage.db import Database
from entitlement.v1 import activation_pb2, eligibility_pb2

OURS = ("sqlalchemy", "entitlement")
# Protobuf messages (entitlement.v1) are gRPC's to hold: in its own per-call cycles they are not ours.
NOT_OURS = ("entitlement.v1",)


def _ours(module: str) -> bool:
    return module.split(".")[0] in OURS and not module.startswith(NOT_OURS)


def _components(objs: list[object]) -> list[list[object]]:
    """The garbage split into its connected parts (references between its objects, either way)."""
    index = {id(o): i for i, o in enumerate(objs)}
    parent = list(range(len(objs)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, o in enumerate(objs):
        for ref in gc.get_referents(o):
            j = index.get(id(ref))
            if j is not None:
                parent[root(i)] = root(j)
    parts: dict[int, list[object]] = {}
    for i, o in enumerate(objs):
        parts.setdefault(root(i), []).append(o)
    return list(parts.values())


def _of_another_database(part: list[object], database: str | None) -> bool:
    """A part holding an Engine of another database than the server's: left by something else in
    this test process (make test runs many test files in each pytest-xdist worker: another file's
    Database, freed by its own thread while this block ran), not by the calls measured here."""
    return any(isinstance(o, Engine) and o.url.database != database for o in part)


@contextmanager
def cyclic_garbage(database: str | None = None) -> Iterator[Counter[str]]:
    """The types (module.name) of the objects the collector finds unreachable, of those made in the
    block, restricted to ours (and, given the server's database, without the parts of another
    database's). The collector's debug flags and earlier garbage are left as found."""
    found: Counter[str] = Counter()
    gc.collect()
    flags, before = gc.get_debug(), len(gc.garbage)
    gc.set_debug(flags | gc.DEBUG_SAVEALL)
    try:
        yield found
        gc.collect()
        for part in _components(gc.garbage[before:]):
            if database is not None and _of_another_database(part, database):
                continue
            for obj in part:
                kind = type(obj)
                if _ours(kind.__module__):
                    found[f"{kind.__module__}.{kind.__qualname__}"] += 1
    finally:
        gc.set_debug(flags)
        del gc.garbage[before:]


def _signup(api: Api) -> Callable[[], None]:
    """An advisor's check and activation, the platform's redemption and verification: the hot
    paths, reads and writes."""
    def once() -> None:
        agency_id, birth = next_person()
        assert api.advisor.CheckEligibility(eligibility_pb2.CheckEligibilityRequest(
            job_seeker=identity(agency_id, birth), program="programs/premium-job-seekers")).decisions[0].eligible
        token = api.activate(agency_id, birth).activation_token
        account = f"acct-{uuid.uuid4().hex[:12]}"
        api.platform.RedeemActivationToken(activation_pb2.RedeemActivationTokenRequest(token=token, account_id=account))
        assert api.platform.VerifyEntitlement(activation_pb2.VerifyEntitlementRequest(account_id=account)).active
    return once


def test_a_signup_leaves_no_cyclic_garbage(api: Api) -> None:
    once = _signup(api)
    once()  # the first calls fill caches and compile statements
    with cyclic_garbage(api.h.ctx.db.engine.url.database) as found:
        for _ in range(5):
            once()
    assert not found, dict(found)


def test_transitions_leave_no_cycles_of_ours_or_of_orm_states(api: Api) -> None:
    """Suspend and resume go through the ORM (the rollup's before_flush reads the activation's
    history); SQLAlchemy's own UPDATE statements leave cycles of bind parameters that are not ours,
    but no instance state (nor its attribute states) and nothing of this service's may stay in one."""
    def suspend_and_resume() -> None:
        name = api.activate().activation.name
        for method in (api.advisor.SuspendActivation, api.advisor.ResumeActivation):
            method(activation_pb2.TransitionActivationRequest(name=name, reason="test"))
    suspend_and_resume()
    with cyclic_garbage(api.h.ctx.db.engine.url.database) as found:
        for _ in range(5):
            suspend_and_resume()
    kept = {k: n for k, n in found.items() if k.startswith(("entitlement.", "sqlalchemy.orm."))}
    assert not kept, dict(found)


def test_the_check_finds_the_garbage_of_a_cycle(api: Api) -> None:
    """The counter above sees a cycle of ours when there is one (else the test could not fail)."""
    from entitlement.storage.direct import Statements

    with cyclic_garbage() as found:
        with api.h.ctx.db.write() as s:
            holder: dict[str, object] = {"statements": Statements(s.connection())}
            holder["itself"] = holder  # a cycle that only the collector can free
        del holder
    assert found["entitlement.storage.direct.Statements"] == 1, dict(found)


def test_the_check_leaves_out_the_garbage_of_another_database_only(api: Api, tmp_path: Path) -> None:
    """Given the server's database, another Database's engines freed in the block (another test
    file's, in the same pytest-xdist worker) are not counted; a cycle of ours still is."""
    from entitlement.storage.direct import Statements

    with cyclic_garbage(api.h.ctx.db.engine.url.database) as found:
        other = Database(f"sqlite:///{tmp_path / 'other.db'}")
        with other.engine.connect():
            pass
        other.dispose()
        del other
        with api.h.ctx.db.write() as s:
            holder: dict[str, object] = {"statements": Statements(s.connection())}
            holder["itself"] = holder
        del holder
    assert found["entitlement.storage.direct.Statements"] == 1, dict(found)
    assert not [k for k in found if k.startswith("sqlalchemy.engine.")], dict(found)
    with cyclic_garbage() as unfiltered:  # without the filter, the same Database's garbage is seen
        other = Database(f"sqlite:///{tmp_path / 'other2.db'}")
        with other.engine.connect():
            pass
        other.dispose()
        del other
    assert unfiltered["sqlalchemy.engine.base.Engine"] >= 1, dict(unfiltered)
