"""``bkv-witness keygen | serve``."""

from __future__ import annotations

import sys
from pathlib import Path

from bkv_server.shell import Shell, arg
from bkv_witness.settings import WitnessSettings

cli = Shell("bkv-witness", "Countersigns validation bundles (docs/ota.md).")


@cli.command("keygen", "make an Ed25519 root key (0600) and print its public key",
             arg("--out", type=Path, required=True))
def keygen(args) -> int:
    from bkv_protocol import bundle as bd
    from bkv_protocol.encoding import b64e

    print(b64e(bd.new_root_key_file(args.out).public))
    return 0


@cli.command("serve", "serve the witness (settings from BKV_WITNESS_* variables)", settings=WitnessSettings)
def serve(args, settings: WitnessSettings) -> int:
    from bkv_protocol import bundle as bd
    from bkv_protocol.encoding import b64d
    from bkv_server.service import run
    from bkv_witness.app import create_app
    from bkv_witness.core import Witness

    witness = Witness(bd.load_root_key(settings.key_file), b64d(settings.operator_public_key), settings.log_file)
    run(create_app(witness), settings.host, settings.port, settings.metrics_port)
    return 0


main = cli.main

if __name__ == "__main__":
    sys.exit(main())
