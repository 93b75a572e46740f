"""``bkv-witness keygen | serve``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bkv-witness", description="Countersigns validation bundles (docs/ota.md).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    kg = sub.add_parser("keygen", help="make an Ed25519 root key (0600) and print its public key")
    kg.add_argument("--out", type=Path, required=True)
    sub.add_parser("serve", help="serve the witness (settings from BKV_WITNESS_* variables)")
    args = ap.parse_args(argv)

    from bkv_protocol import bundle as bd
    from bkv_protocol.encoding import b64d, b64e

    if args.cmd == "keygen":
        print(b64e(bd.new_root_key_file(args.out).public))
        return 0

    from pydantic import ValidationError

    from bkv_witness.settings import WitnessSettings

    try:
        settings = WitnessSettings()
    except ValidationError as exc:
        print(f"bkv-witness: bad settings: {exc}", file=sys.stderr)
        return 2
    from bkv_server.service import run
    from bkv_witness.app import create_app
    from bkv_witness.core import Witness

    witness = Witness(bd.load_root_key(settings.key_file), b64d(settings.operator_public_key), settings.log_file)
    run(create_app(witness), settings.host, settings.port, settings.metrics_port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
