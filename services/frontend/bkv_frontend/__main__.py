"""``bkv-frontend serve``."""

from __future__ import annotations

import sys

from bkv_frontend.settings import FrontendSettings
from bkv_server.shell import Shell

cli = Shell("bkv-frontend", "The public API of Backup Key Vault.")


@cli.command("serve", "serve the public v1 API (settings from BKV_FRONTEND_* variables)", settings=FrontendSettings)
def serve(args, settings: FrontendSettings) -> int:
    from bkv_server.etcd import make_client
    from bkv_server.service import run
    from bkv_frontend.app import create_app
    from bkv_frontend.auth import TokenVerifier
    from bkv_frontend.routing import FleetView
    from bkv_server.ratelimit import Limiter, budgets

    verifier = TokenVerifier.from_pem_file(settings.token_public_key_file, settings.token_issuer,
                                           settings.token_audience)
    etcd = make_client(settings.etcd_endpoints)
    view = FleetView(etcd, settings.etcd_prefix)
    run(create_app(view, verifier, refresh_interval_s=settings.refresh_interval_s, on_shutdown=etcd.close,
                   require_device_binding=settings.require_device_binding,
                   edge_public_key=settings.edge_public_key_value(),
                   limiter=Limiter("device", budgets(settings, "device"))), settings.host, settings.port,
        settings.metrics_port)
    return 0


main = cli.main

if __name__ == "__main__":
    sys.exit(main())
