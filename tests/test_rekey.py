"""Upgrading data keyed before identifiants were made canonical, on both backends. An earlier version
keyed a person by the identifiant as written in the extract: `l0000005` and `L0000005` were two
keys. Since then every key is the canonical (upper-case) one, so such a person's activation no
longer matched anyone: a second live activation in the same program was possible (the funders
committed twice) and revalidation curtailed the first as not registered. The next import re-keys
those activations (one `activation.person_rekeyed` event each); then the person is one person."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import grpc
import pytest
from sqlalchemy import select, update

from own_server import default_people, own_server, write_registry
from support import TODAY, As, expect_error, identity

from entitlement import jobs, registry
from entitlement.storage.models import Activation, Event
from entitlement.v1 import activation_pb2


def test_the_next_import_rekeys_activations_of_a_lower_case_identifiant(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    people = default_people()
    upper = "L0000005"
    lower = upper.lower()
    with own_server(backend[0], tmp_path / "srv", request) as h:
        adv = As(h.channel, h.tokens["advisor-paris"])
        birth = people[upper][0]

        def activate() -> activation_pb2.ActivateEntitlementResponse:
            resp: activation_pb2.ActivateEntitlementResponse = adv.ActivateEntitlement(
                activation_pb2.ActivateEntitlementRequest(
                    job_seeker=identity(upper, birth), program="programs/premium-job-seekers",
                    platform="platforms/openclassrooms", reason="rekey"))
            return resp
        made = activate()
        activation_id = made.activation.name.split("/")[1]
        # As an earlier version left it: the extract wrote the identifiant in lower case, and the
        # activation was keyed by it as written.
        legacy = h.ctx.pseudo.legacy_person_key(lower)
        assert legacy != h.ctx.pseudo.person_key(lower)
        with h.ctx.db.write() as s:
            s.execute(update(Activation).where(Activation.id == activation_id).values(person_key=legacy))
        # The agency's next extract, still writing it in lower case.
        extract = write_registry(tmp_path / "next.csv", {(lower if k == upper else k): v for k, v in people.items()})
        summary = registry.import_extract(h.ctx.db, h.ctx.pseudo, h.clock, extract, extracted_on=TODAY)
        assert not summary.unchanged
        with h.ctx.db.read() as s:
            key = s.execute(select(Activation.person_key).where(Activation.id == activation_id)).scalar_one()
            events = s.execute(select(Event).where(Event.subject == made.activation.name)
                               .order_by(Event.seq)).scalars().all()
        assert bytes(key) == h.ctx.pseudo.person_key(upper)
        [rekeyed] = [e for e in events if e.type == "activation.person_rekeyed"]
        payload = json.loads(rekeyed.payload_json)
        assert payload == {"previous_job_seeker_ref": h.ctx.pseudo.person_ref(legacy),
                           "job_seeker_ref": h.ctx.pseudo.person_ref(h.ctx.pseudo.person_key(upper))}
        assert lower not in rekeyed.payload_json and upper not in rekeyed.payload_json
        # One person again: a second activation is refused, revalidation leaves the first alone.
        f = expect_error(lambda _r: activate(), None, grpc.StatusCode.ALREADY_EXISTS)
        assert f.reason == "ACTIVATION_EXISTS" and f.metadata["activation"] == made.activation.name
        summary_r = jobs.run_revalidation(h.ctx, activation_ids=[activation_id])
        assert summary_r.curtailed == 0 and summary_r.expired == 0
        with h.ctx.db.read() as s:
            end = s.execute(select(Activation.end_date).where(Activation.id == activation_id)).scalar_one()
        assert end == dt.date(2027, 3, 15)


def test_an_activation_whose_new_key_is_taken_keeps_its_old_one_and_the_import_goes_through(
        backend: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The person was activated again under the new key meanwhile (two live activations): the old one
    is left as it is (an operator settles it), and the import is not refused for it."""
    people = default_people()
    upper = "L0000006"
    lower = upper.lower()
    with own_server(backend[0], tmp_path / "srv", request) as h:
        adv = As(h.channel, h.tokens["advisor-paris"])
        request_ = activation_pb2.ActivateEntitlementRequest(
            job_seeker=identity(upper, people[upper][0]), program="programs/premium-job-seekers",
            platform="platforms/openclassrooms", reason="rekey")
        old = adv.ActivateEntitlement(request_).activation.name.split("/")[1]
        legacy = h.ctx.pseudo.legacy_person_key(lower)
        with h.ctx.db.write() as s:
            s.execute(update(Activation).where(Activation.id == old).values(person_key=legacy))
        new = adv.ActivateEntitlement(request_).activation.name.split("/")[1]  # the duplicate the bug allowed
        extract = write_registry(tmp_path / "next.csv", {(lower if k == upper else k): v for k, v in people.items()})
        summary = registry.import_extract(h.ctx.db, h.ctx.pseudo, h.clock, extract, extracted_on=TODAY)
        with h.ctx.db.read() as s:
            keys = dict(s.execute(select(Activation.id, Activation.person_key)
                                  .where(Activation.id.in_([old, new]))).all())
            current = registry.current_snapshot(s)
        assert bytes(keys[old]) == legacy and bytes(keys[new]) == h.ctx.pseudo.person_key(upper)
        assert current is not None and current.id == summary.snapshot_id
