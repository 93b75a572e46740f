"""``python -m bkv_edge keygen | pubkey | render-envoy``.

The processor itself is a Go binary, ``bkv-noise-processor serve``
(services/edge/noise-processor; scripts/build-noise-processor.sh)."""

from __future__ import annotations

import argparse
import base64
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bkv-edge", description="The Noise edge beside Envoy.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    kg = sub.add_parser("keygen", help="make the edge's static key (0600) and print its public key")
    kg.add_argument("--out", type=Path, required=True)
    pk = sub.add_parser("pubkey", help="derive the public key from the edge's static key")
    pk.add_argument("--key-file", type=Path, required=True)
    pk.add_argument("--out", type=Path, help="write it here (default: print it)")
    rv = sub.add_parser("render-envoy", help="write Envoy's configuration")
    rv.add_argument("--listen-host", default="127.0.0.1")
    rv.add_argument("--listen-port", type=int, required=True)
    rv.add_argument("--upstream-port", type=int, required=True)
    rv.add_argument("--processor-port", type=int, required=True)
    rv.add_argument("--admin-port", type=int, required=True)
    rv.add_argument("--ops-port", type=int, default=0,
                    help="a plaintext listener for probes and metrics only (no vault API); off if 0")
    rv.add_argument("--upstream-host", default="127.0.0.1")
    rv.add_argument("--processor-host", default="127.0.0.1")
    rv.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    from bkv_protocol.noise import StaticKey

    if args.cmd == "keygen":
        key = StaticKey.generate()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(base64.b64encode(key.reveal()) + b"\n")
        print(base64.b64encode(key.public).decode())
        return 0
    if args.cmd == "render-envoy":
        from bkv_edge.envoy import render

        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(render(args.listen_host, args.listen_port, args.upstream_port, args.processor_port,
                                   args.admin_port, processor_host=args.processor_host,
                                   upstream_host=args.upstream_host, ops_port=args.ops_port))
        return 0
    public = base64.b64encode(load_key(args.key_file).public).decode()  # pubkey
    if args.out is None:
        print(public)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(public + "\n")
    return 0


def load_key(path: Path):
    from bkv_protocol.noise import StaticKey

    raw = base64.b64decode(path.read_text().strip(), validate=True)
    if len(raw) != 32:
        raise SystemExit(f"{path}: not an X25519 key")
    return StaticKey(raw)


if __name__ == "__main__":
    sys.exit(main())
