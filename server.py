"""Run the entitlement gRPC server. Every setting comes from ENTITLEMENT_* environment variables
(README "Configuration"). `make run` prepares a local demo and runs this."""

from __future__ import annotations

import sys

from entitlement import app, logs
from entitlement.config import Settings
from entitlement.programs import ProgramFileError
from entitlement.server_main import serve_forever
from entitlement.storage.migrate import SchemaNotCurrent
from entitlement.tls import TransportError, check_transport, server_tls


def main() -> int:
    settings = Settings.from_env()
    logs.configure(settings.log_level)
    try:
        # Transport first: an unsafe listen address is refused before anything is loaded.
        check_transport(settings.listen, server_tls(settings.tls_cert_file, settings.tls_key_file,
                                                    settings.tls_client_ca_file), settings.insecure)
        ctx = app.build(settings)
    except (ProgramFileError, SchemaNotCurrent, TransportError) as exc:
        print(f"entitlement: cannot start: {exc}", file=sys.stderr)
        return 2
    serve_forever(ctx)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
