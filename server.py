"""Run the entitlement gRPC server. Every setting comes from ENTITLEMENT_* environment variables
(README "Configuration"). `make run` prepares a local demo and runs this."""

from __future__ import annotations

import sys

from entitlement import app, logs
from entitlement.config import Settings
from entitlement.programs import ProgramFileError
from entitlement.server_main import serve_forever
from entitlement.storage.migrate import SchemaNotCurrent


def main() -> int:
    settings = Settings.from_env()
    logs.configure(settings.log_level)
    try:
        ctx = app.build(settings)
    except (ProgramFileError, SchemaNotCurrent) as exc:
        print(f"entitlement: cannot start: {exc}", file=sys.stderr)
        return 2
    serve_forever(ctx)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
