"""Crash safety under load: `server.py` killed with SIGKILL at random moments while clients stream
activations (with request_ids), suspensions, resumptions, revocations, redemptions and registry
imports, and fetch signed checkpoints; restarted on the same database each time.

After each restart: entitlement.doctor (the shared invariant checker) finds nothing, given what the
clients were told (no activation without its ledger entries and event, no ledger entry without its
activation, commits equal to the ledger and the log, states and bindings as logged, the log still
extending the last checkpoint fetched before the kill, every acknowledged request in the
database); the restarted server proves the new log head consistent with that checkpoint; every
acknowledged activation is there with its id, state and binding; replaying every acknowledged
request_id answers the same activation.

The kill moments come from a seed, printed (ENTITLEMENT_CRASH_SEED=N replays them; thread
scheduling still varies). 3 kills per backend; 20 with ENTITLEMENT_STRESS=1 (`make stress`).
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

from load_clients import Activated, People, Told, activator, checkpoints, importer, lifecycle, verify_durable
from test_server_ops import Server, prepare

STRESS = os.environ.get("ENTITLEMENT_STRESS") == "1"
KILLS = 20 if STRESS else 3
# Registry rows per import beyond the test registry's, drawn per round: small imports complete
# (and are acknowledged) several times before the kill, large ones are cut at various stages.
FILLER_ROWS = (1_000, 5_000, 15_000, 40_000) if STRESS else (1_000, 5_000, 15_000)
ACTIVATORS = 2
MAX_DELAY_S = 1.5  # the kill comes this long at most after the round's load is flowing
FLOWING_WITHIN_S = 120.0


def _restart(server: Server, round_no: int) -> Server:
    """A new server process on the same directory and database (the old log kept beside)."""
    server.close()
    log = server.dir.log_path
    if log.exists():
        log.rename(log.with_name(f"server-killed-{round_no}.stderr"))
    return Server(server.dir)


def test_kill_9_under_load_loses_nothing_acknowledged(fresh_url: str, tmp_path: Path) -> None:
    seed = int(os.environ.get("ENTITLEMENT_CRASH_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"\ncrash seed {seed} (ENTITLEMENT_CRASH_SEED={seed} replays the kill moments)")
    rng = random.Random(seed)
    told, people = Told(), People()
    d = prepare(tmp_path / "srv", fresh_url)
    # The servers' TMPDIR, where ImportExtract spools the bytes it receives: a server killed during a
    # push leaves its spool (the next start sweeps it only once it is a minute old), which went to
    # the machine's /tmp, five of them per CI run.
    (tmp_path / "srv" / "tmp").mkdir()
    d.extra_env["TMPDIR"] = str(tmp_path / "srv" / "tmp")
    server = Server(d)
    imports_started = 0
    try:
        for round_no in range(1, KILLS + 1):
            context = f"seed {seed}, kill {round_no}/{KILLS}"
            stop = threading.Event()
            told.going_away.clear()
            mine: list[Activated] = []

            def adopt(a: Activated) -> None:
                with told.lock:
                    mine.append(a)

            acked_before = told.ok["activate"]
            threads = [threading.Thread(target=activator, args=(server, told, people, stop, adopt))
                       for _ in range(ACTIVATORS)]
            threads.append(threading.Thread(target=lifecycle, args=(server, told, mine, random.Random(rng.random()),
                                                                    stop)))
            filler = rng.choice(FILLER_ROWS)
            threads.append(threading.Thread(target=importer, args=(server, told, filler, stop, imports_started + 1)))
            threads.append(threading.Thread(target=checkpoints, args=(server, told, stop)))
            imports_started += 1000  # each round's extracts differ from every other round's
            for t in threads:
                t.start()
            flowing_by = time.monotonic() + FLOWING_WITHIN_S
            while told.ok["activate"] < acked_before + 3 and time.monotonic() < flowing_by:
                if told.errors_before:
                    break
                time.sleep(0.01)
            assert told.ok["activate"] >= acked_before + 3, f"{context}: no activation went through: " \
                                                            f"{dict(told.errors_before)}\n{server.stderr()[-3000:]}"
            time.sleep(rng.uniform(0.0, MAX_DELAY_S))

            with told.lock:
                importing = told.in_flight_imports > 0
                calls = dict(told.ok)
            told.going_away.set()
            server.proc.kill()  # SIGKILL
            server.proc.wait(timeout=30)
            stop.set()
            for t in threads:
                t.join(timeout=120)
            assert not any(t.is_alive() for t in threads), f"{context}: a client thread is stuck"
            assert not told.errors_before, f"{context}: calls failed before the kill: {dict(told.errors_before)}"

            server = _restart(server, round_no)
            v = verify_durable(server, told, fresh_url, context=context)
            print(f"kill {round_no}: {'during an import' if importing else 'between imports'} of "
                  f"the test registry + {filler} rows, calls OK so far {calls}; "
                  f"after restart: {v.activations} activations, {v.transitions} transitions, {v.redemptions} "
                  f"redemptions, {v.imports} imports durable; {v.resolved} unknown outcomes settled; log "
                  f"{v.checkpoint_size} -> {v.head_size} consistent")
        assert told.ok["import"] + told.errors_after.get(("import", "UNAVAILABLE"), 0) >= 1
        assert sum(told.ok[x] for x in ("suspend", "resume", "revoke", "redeem")) >= 1, \
            f"the lifecycle client did nothing: {dict(told.ok)}"
    finally:
        server.close()
