"""``python -m bkv_edge keygen | processor | render-envoy``."""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bkv-edge", description="The Noise edge beside Envoy.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    kg = sub.add_parser("keygen", help="make the edge's static key (0600) and print its public key")
    kg.add_argument("--out", type=Path, required=True)
    pr = sub.add_parser("processor", help="serve the ext_proc gRPC processor")
    pr.add_argument("--listen", default="127.0.0.1:9002", help="host:port")
    pr.add_argument("--key-file", type=Path, default=Path(os.environ.get("BKV_EDGE_KEY_FILE", "edge.key")))
    rv = sub.add_parser("render-envoy", help="write Envoy's configuration")
    rv.add_argument("--listen-host", default="127.0.0.1")
    rv.add_argument("--listen-port", type=int, required=True)
    rv.add_argument("--upstream-port", type=int, required=True)
    rv.add_argument("--processor-port", type=int, required=True)
    rv.add_argument("--admin-port", type=int, required=True)
    rv.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    from bkv_edge.noise import StaticKey

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

        args.out.write_text(render(args.listen_host, args.listen_port, args.upstream_port, args.processor_port,
                                   args.admin_port))
        return 0
    from bkv_edge.processor import serve

    logging.basicConfig(level=logging.WARNING)
    key = load_key(args.key_file)
    host, _, port = args.listen.rpartition(":")
    try:
        asyncio.run(serve(key, host, int(port)))
    except KeyboardInterrupt:
        pass
    return 0


def load_key(path: Path):
    from bkv_edge.noise import StaticKey

    raw = base64.b64decode(path.read_text().strip(), validate=True)
    if len(raw) != 32:
        raise SystemExit(f"{path}: not an X25519 key")
    return StaticKey(raw)


if __name__ == "__main__":
    sys.exit(main())
