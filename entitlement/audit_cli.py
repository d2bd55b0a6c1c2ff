"""`entitlement audit ...`: the Merkle event log from the command line.

  keygen   (operator) create the checkpoint signing key when missing; print the verifier key
  export   (funder, admin) download a checkpoint, the log's leaves up to it and, from a checkpoint
           kept earlier, the consistency proof: the files `verify` reads
  verify   (anyone, offline: no database, no server) check those files
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

EXIT_FAILED = 1

EVENTS_FILE = "events.jsonl"
CHECKPOINT_FILE = "checkpoint.txt"
PROOF_FILE = "consistency.json"
KEY_FILE = "verifier-key.txt"


def _fail(message: str) -> int:
    print(f"entitlement: {message}", file=sys.stderr)
    return EXIT_FAILED


# ---------------------------------------------------------------------------------------- keygen

def cmd_keygen(args: argparse.Namespace) -> int:
    from entitlement.config import Settings
    from entitlement.logtree import create_key_file, read_signer
    settings = Settings.from_env()
    path = settings.log_key_path
    if path.exists():
        print(f"log signing key {path} already exists (it is never replaced: funders trust its verifier key)")
    else:
        create_key_file(path)
        print(f"created log signing key {path}; restart the servers to sign checkpoints with it")
    signer = read_signer(path, settings.log_origin)
    print(f"verifier key (publish it to the funders): {signer.verifier.encode()}")
    return 0


# ---------------------------------------------------------------------------------------- verify

def cmd_verify(args: argparse.Namespace) -> int:
    """Offline: reads files only (entitlement.logformat, .note, .merkle)."""
    from entitlement import logformat, note
    if args.previous_events and not args.trusted:
        return _fail("--previous-events needs --trusted: the checkpoint that export was verified against "
                     "(it is compared with that checkpoint's leaves only)")
    try:
        report = logformat.verify_files(
            Path(args.events), Path(args.checkpoint), args.key,
            trusted=Path(args.trusted) if args.trusted else None, proof=Path(args.proof) if args.proof else None,
            previous=Path(args.previous_events) if args.previous_events else None)
    except (note.NoteError, logformat.FormatError, OSError) as exc:
        return _fail(f"verification FAILED: {exc}")
    cp, trusted = report.checkpoint, report.trusted
    if report.ok:
        print(f"OK: {report.entries} events verified against the checkpoint of {cp.origin} at size {cp.size}")
        print(f"  {report.readable} events read in full and hashed again, {report.redacted} given as leaf hashes only")
        if trusted is not None:
            proof = " and the service's consistency proof verifies" if args.proof else ""
            print(f"  the first {trusted.size} events still hash to the trusted checkpoint's root{proof}: "
                  f"nothing logged before was changed")
        print(f"  keep {args.checkpoint} as your trusted checkpoint for the next verification")
        return 0
    first = report.first_bad_seq
    print(f"verification FAILED: first bad sequence number: {first if first is not None else 'unknown'}")
    for p in report.problems:
        print(f"  - {p.message}")
    if report.more_problems:
        print(f"  ... and {report.more_problems} more")
    return EXIT_FAILED


# ---------------------------------------------------------------------------------------- export

def _metadata(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    token = args.token or os.environ.get("ENTITLEMENT_TOKEN", "")
    return (("authorization", f"Bearer {token}"),) if token else ()


def cmd_export(args: argparse.Namespace) -> int:
    import grpc

    from entitlement import client_cli, logformat, note
    from entitlement.v1 import audit_pb2, audit_pb2_grpc

    trusted_size = None
    if args.trusted:
        try:
            text = Path(args.trusted).read_text(encoding="utf-8")
            trusted_size = note.parse_checkpoint(text[: text.rfind("\n\n") + 1]).size
        except (OSError, note.NoteError) as exc:
            return _fail(f"--trusted {args.trusted}: not a checkpoint ({exc})")
    out = Path(args.dir)
    made = not out.exists()  # removed again if the export fails before writing anything in it
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file of that name, no permission
        return _fail(f"{args.dir}: cannot make the export's directory ({exc.strerror or exc})")
    address = args.address or os.environ.get("ENTITLEMENT_ADDRESS", client_cli.DEFAULT_ADDRESS)
    metadata = _metadata(args)
    # The client commands' channel (TLS with --ca, mutual TLS with --cert/--key), plaintext without.
    make_channel = getattr(client_cli, "_channel", None)
    try:
        channel = make_channel(args, address) if make_channel else grpc.insecure_channel(address)
    except client_cli.ClientError as exc:
        return _fail(str(exc))
    try:
        with channel:
            stub = audit_pb2_grpc.AuditServiceStub(channel)
            cp = stub.GetCheckpoint(audit_pb2.GetCheckpointRequest(), metadata=metadata, timeout=args.timeout)
            size = cp.tree_size
            if trusted_size is not None:
                if trusted_size > size:
                    return _fail(f"the trusted checkpoint ({trusted_size} events) is larger than the log's "
                                 f"({size}): the log lost events")
                if size == 0:  # both empty: nothing to prove (new_size 0 would mean "the log's size now")
                    consistency = logformat.ConsistencyProof(0, 0, ())
                else:
                    proof = stub.GetConsistencyProof(audit_pb2.GetConsistencyProofRequest(
                        old_size=trusted_size, new_size=size), metadata=metadata, timeout=args.timeout)
                    consistency = logformat.ConsistencyProof(proof.old_size, proof.new_size, tuple(proof.hashes))
                (out / PROOF_FILE).write_text(consistency.to_json(), encoding="utf-8")
            elif (out / PROOF_FILE).exists():
                # An earlier export's proof, of other checkpoints: verified with this export it
                # fails, and left there it could be taken for this one's.
                (out / PROOF_FILE).unlink()
            # (An empty log: nothing to stream; tree_size 0 would mean "the log's size now", and events
            # logged since the checkpoint would come too.)
            written = _write_events(out / EVENTS_FILE, stub.StreamEvents(
                audit_pb2.StreamEventsRequest(start_sequence=1, tree_size=size), metadata=metadata,
                timeout=args.timeout) if size else ())
    except grpc.RpcError as err:
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        return _fail(client_cli._describe(err))
    (out / CHECKPOINT_FILE).write_text(cp.checkpoint, encoding="utf-8")
    (out / KEY_FILE).write_text(cp.verifier_key + "\n", encoding="utf-8")
    print(f"wrote {written} events (log size {size}) to {out / EVENTS_FILE}, the checkpoint to "
          f"{out / CHECKPOINT_FILE}" + (f", the consistency proof from {trusted_size} to {out / PROOF_FILE}"
                                         if trusted_size is not None else ""))
    print(f"the server's verifier key is {cp.verifier_key} (saved in {out / KEY_FILE}); check it against the "
          f"one the operator published before relying on it")
    command = [f"entitlement audit verify {out / EVENTS_FILE}", f"--checkpoint {out / CHECKPOINT_FILE}",
               "--key <published verifier key>"]
    if trusted_size is not None:
        command += [f"--trusted {args.trusted}", f"--proof {out / PROOF_FILE}"]
    print("verify with: " + " ".join(command))
    return 0


def _write_events(path: Path, stream: Any) -> int:
    from entitlement import logformat
    tmp = path.with_name(path.name + ".part")
    n = 0
    with tmp.open("w", encoding="utf-8", newline="\n") as fh:
        for entry in stream:
            event = None
            if entry.HasField("event"):
                e = entry.event
                event = logformat.LogEvent(
                    seq=e.sequence, time_us=e.time.seconds * 1_000_000 + e.time.nanos // 1000, type=e.type,
                    actor=e.actor, subject=e.subject, program_id=e.program.removeprefix("programs/"),
                    reason=e.reason, payload_json=e.payload_json)
            fh.write(logformat.entry_line(entry.sequence, entry.leaf_hash, event) + "\n")
            n += 1
    tmp.replace(path)
    return n


# ---------------------------------------------------------------------------------------- parser

def add_commands(sub: Any) -> None:
    from entitlement.client_cli import seconds
    audit = sub.add_parser("audit", help="the Merkle event log: signing key, export, offline verification"
                           ).add_subparsers(dest="audit_command", required=True)

    audit.add_parser("keygen", help="create the checkpoint signing key (ENTITLEMENT_LOG_KEY_FILE) when missing, "
                     "print its verifier key").set_defaults(func=cmd_keygen)

    p = audit.add_parser(
        "export", help="funder: download the events up to a new signed checkpoint, and the consistency proof "
        "from the checkpoint you trusted, into DIR (what `audit verify` reads)")
    p.add_argument("dir", metavar="DIR", help=f"where to write {EVENTS_FILE}, {CHECKPOINT_FILE}, {KEY_FILE} "
                   f"and, with --trusted, {PROOF_FILE}")
    p.add_argument("--trusted", metavar="CHECKPOINT", help="the checkpoint you verified last time")
    p.add_argument("--address", help="server address (ENTITLEMENT_ADDRESS, default 127.0.0.1:50051)")
    p.add_argument("--token", help="bearer token (ENTITLEMENT_TOKEN)")
    p.add_argument("--ca", help="TLS: CA certificate of the server (ENTITLEMENT_CA_FILE); plaintext without")
    p.add_argument("--cert", help="mutual TLS: client certificate (ENTITLEMENT_CLIENT_CERT_FILE)")
    p.add_argument("--key", help="mutual TLS: client key (ENTITLEMENT_CLIENT_KEY_FILE)")
    p.add_argument("--timeout", type=seconds, default=600.0, help="deadline of each call in seconds (default 600)")
    p.set_defaults(func=cmd_export)

    p = audit.add_parser(
        "verify", help="offline, no database: check exported events against a signed checkpoint and the "
        "checkpoint you trusted before; names the first bad sequence number")
    p.add_argument("events", metavar="EVENTS.jsonl", help="the events file written by `audit export`")
    p.add_argument("--checkpoint", required=True, help="the signed checkpoint the events go up to")
    p.add_argument("--key", required=True, help="the log's verifier key (name+keyid+key), or a file holding it")
    p.add_argument("--trusted", metavar="CHECKPOINT", help="the checkpoint you verified before")
    p.add_argument("--proof", help=f"the consistency proof from --trusted to --checkpoint ({PROOF_FILE})")
    p.add_argument("--previous-events", metavar="EVENTS.jsonl",
                   help="the events file you verified against --trusted: locates a change even when the "
                        "leaf hashes were rewritten with it")
    p.set_defaults(func=cmd_verify)
