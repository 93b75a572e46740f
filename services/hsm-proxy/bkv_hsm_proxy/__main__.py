"""``bkv-hsm-proxy serve | fleet-init | publish-configmap``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bkv-hsm-proxy", description="The HSM boundary of Backup Key Vault.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve", help="serve the hsm-proxy API (settings from BKV_HSM_* variables)")
    init = sub.add_parser("fleet-init", help="create the fleet keys and OPAQUE setup in the token (idempotent)")
    init.add_argument("--out", type=Path, help="write the public fleet parameters here (JSON)")
    pub = sub.add_parser("publish-configmap", help="write the public fleet parameters to a Kubernetes ConfigMap "
                                                   "(run inside the cluster by the fleet-init Job)")
    pub.add_argument("--params", type=Path, required=True, help="the file fleet-init --out wrote")
    pub.add_argument("--name", required=True, help="the ConfigMap's name")
    pub.add_argument("--edge-public-key-file", type=Path, help="also publish the Noise edge public key")
    pub.add_argument("--serviceaccount-dir", type=Path, default=Path("/var/run/secrets/kubernetes.io/serviceaccount"))
    args = parser.parse_args(argv)

    if args.cmd == "publish-configmap":
        from bkv_common.retry import DeadlineExceeded
        from bkv_hsm_proxy.kube import PublishError, publish_configmap

        try:
            data = publish_configmap(args.params, args.name, edge_public_key_file=args.edge_public_key_file,
                                     serviceaccount_dir=args.serviceaccount_dir)
        except (PublishError, OSError, DeadlineExceeded) as exc:
            print(f"bkv-hsm-proxy: cannot publish the fleet ConfigMap: {exc}", file=sys.stderr)
            return 1
        print(json.dumps({"configmap": args.name, "fleet_id": data["fleet_id"]}))
        return 0

    from pydantic import ValidationError

    from bkv_common.retry import DeadlineExceeded
    from bkv_hsm_proxy.errors import HsmError
    from bkv_hsm_proxy.settings import HsmProxySettings

    try:
        settings = HsmProxySettings()
    except ValidationError as exc:
        print(f"bkv-hsm-proxy: bad settings: {exc}", file=sys.stderr)
        return 2
    try:
        if args.cmd == "fleet-init":
            from bkv_hsm_proxy.fleet_init import fleet_init

            params = fleet_init(settings, args.out)
            print(json.dumps({k: params[k] for k in ("fleet_id", "fleet_public_key", "max_attempts", "created")}))
            return 0
        from bkv_common.service import run
        from bkv_hsm_proxy.app import create_app
        from bkv_hsm_proxy.core import VaultHsm
        from bkv_hsm_proxy.hsm import Pkcs11Hsm

        from bkv_common.retry import Backoff, retry_sync
        from bkv_hsm_proxy.errors import HsmLoginFailed

        # SoftHSM2 now and then reports no token to a process that starts while
        # another opens the same token directory: try again for a few seconds.
        hsm = retry_sync(lambda _: Pkcs11Hsm(settings.pkcs11_module, settings.token_label,
                                             settings.user_pin.get_secret_value()),
                         retry_on=lambda e: isinstance(e, HsmLoginFailed),
                         backoff=Backoff(deadline_s=10.0, first_delay_s=0.1, max_delay_s=1.0))
        vault = VaultHsm(hsm, max_attempts=settings.max_attempts)
        run(create_app(vault), settings.host, settings.port, settings.metrics_port)
        return 0
    except HsmError as exc:
        print(f"bkv-hsm-proxy: HSM error: {exc}", file=sys.stderr)
        return 3
    except DeadlineExceeded as exc:
        print(f"bkv-hsm-proxy: HSM error: {exc.__cause__}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
