"""Client commands of the `entitlement` CLI: one gRPC call each, over a real channel."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from google.type import date_pb2
from grpc_status import rpc_status

from entitlement.v1 import (activation_pb2, activation_pb2_grpc, audit_pb2, audit_pb2_grpc, common_pb2,
                            eligibility_pb2, eligibility_pb2_grpc)

DEFAULT_ADDRESS = "127.0.0.1:50051"


class ClientError(Exception):
    pass


def _date(text: str, what: str) -> date_pb2.Date:
    try:
        d = dt.date.fromisoformat(text)
    except ValueError:
        raise ClientError(f"{what}: expected a date YYYY-MM-DD, got {text!r}") from None
    return date_pb2.Date(year=d.year, month=d.month, day=d.day)


def _call(args: argparse.Namespace, stub_cls: Any, method: str, request: Message) -> Any:
    token = args.token or os.environ.get("ENTITLEMENT_TOKEN", "")
    address = args.address or os.environ.get("ENTITLEMENT_ADDRESS", DEFAULT_ADDRESS)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(address) as channel:
        stub = stub_cls(channel)
        try:
            return getattr(stub, method)(request, metadata=metadata, timeout=args.timeout)
        except grpc.RpcError as err:
            raise ClientError(_describe(err)) from None


def _describe(err: grpc.RpcError) -> str:
    code = err.code().name if hasattr(err, "code") else "UNKNOWN"
    message = err.details() if hasattr(err, "details") else str(err)
    parts = [f"{code}: {message}"]
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                parts.append(f"[{info.reason}]")
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                parts.extend(f"{v.field}: {v.description};" for v in bad.field_violations)
    return " ".join(parts)


def _print_json(msg: Message) -> None:
    print(json.dumps(json_format.MessageToDict(msg, preserving_proto_field_name=True), indent=2, ensure_ascii=False))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _fmt_date(d: date_pb2.Date) -> str:
    return f"{d.year:04d}-{d.month:02d}-{d.day:02d}" if d.year else "-"


def _identity(args: argparse.Namespace) -> common_pb2.JobSeekerIdentity:
    return common_pb2.JobSeekerIdentity(agency_id=args.agency_id, birth_date=_date(args.birth_date, "birth date"))


def _program_name(p: str) -> str:
    return p if not p or p.startswith("programs/") else f"programs/{p}"


# --------------------------------------------------------------------------------------- commands

def cmd_check(args: argparse.Namespace) -> int:
    req = eligibility_pb2.CheckEligibilityRequest(job_seeker=_identity(args), program=_program_name(args.program or ""))
    if args.as_of:
        req.as_of.CopyFrom(_date(args.as_of, "--as-of"))
    resp = _call(args, eligibility_pb2_grpc.EligibilityServiceStub, "CheckEligibility", req)
    if args.json:
        _print_json(resp)
        return 0
    for d in resp.decisions:
        verdict = "ELIGIBLE" if d.eligible else "NOT ELIGIBLE"
        print(f"{d.program}: {verdict} on {_fmt_date(d.as_of)} (program version {d.program_version}, "
              f"registry {d.registry_snapshot or 'none'} extracted {_fmt_date(d.registry_extracted_on)})")
        _table(["criterion", "ok", "reason", "detail"],
               [(c.criterion, "yes" if c.passed else "NO", c.reason_code or "-", c.detail) for c in d.criteria])
        print()
    return 0


def add_commands(sub: Any) -> None:
    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--address", help=f"server address (ENTITLEMENT_ADDRESS, default {DEFAULT_ADDRESS})")
        p.add_argument("--token", help="bearer token (ENTITLEMENT_TOKEN)")
        p.add_argument("--json", action="store_true", help="print the response as JSON")
        p.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds (default 10)")
        return p

    def client(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        def run(args: argparse.Namespace) -> int:
            try:
                return func(args)
            except ClientError as exc:
                print(f"entitlement: {exc}", file=sys.stderr)
                return 1
        return run

    p = common(sub.add_parser("check", help="advisor: check a job seeker's eligibility, with the reasons"))
    p.add_argument("agency_id")
    p.add_argument("birth_date", help="YYYY-MM-DD")
    p.add_argument("--program", help="program id (default: all programs)")
    p.add_argument("--as-of", help="evaluate as of this past date YYYY-MM-DD")
    p.set_defaults(func=client(cmd_check))
