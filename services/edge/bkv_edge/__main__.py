"""``python -m bkv_edge keygen | pubkey | render-envoy``.

The processor itself is a Go binary, ``bkv-noise-processor serve``
(services/edge/noise-processor; scripts/build-noise-processor.sh)."""

from __future__ import annotations

import base64
import os
import sys
from pathlib import Path

from bkv_server.shell import Shell, arg

cli = Shell("bkv-edge", "The Noise edge beside Envoy.")


@cli.command("keygen", "make the edge's static key (0600) and print its public key",
             arg("--out", type=Path, required=True))
def keygen(args) -> int:
    from bkv_protocol.noise import StaticKey

    key = StaticKey.generate()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(base64.b64encode(key.reveal()) + b"\n")
    print(base64.b64encode(key.public).decode())
    return 0


@cli.command("pubkey", "derive the public key from the edge's static key",
             arg("--key-file", type=Path, required=True),
             arg("--out", type=Path, help="write it here (default: print it)"))
def pubkey(args) -> int:
    public = base64.b64encode(load_key(args.key_file).public).decode()
    if args.out is None:
        print(public)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(public + "\n")
    return 0


@cli.command("render-envoy", "write Envoy's configuration",
             arg("--listen-host", default="127.0.0.1"),
             arg("--listen-port", type=int, required=True),
             arg("--upstream-port", type=int, required=True),
             arg("--processor-port", type=int, required=True),
             arg("--admin-port", type=int, required=True),
             arg("--ops-port", type=int, default=0,
                 help="a plaintext listener for probes and metrics only (no vault API); off if 0"),
             arg("--upstream-host", default="127.0.0.1"),
             arg("--processor-host", default="127.0.0.1"),
             arg("--source-limit", action="append", default=[], metavar="BUDGET=PER_SECOND/BURST",
                 help="a per-source-address budget (handshake, transport, bundle), e.g. handshake=20/100; "
                      "PER_SECOND 0 turns it off (default: bkv_edge.envoy.SourceLimits)"),
             arg("--out", type=Path, required=True))
def render_envoy(args) -> int:
    from bkv_edge.envoy import render

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(args.listen_host, args.listen_port, args.upstream_port, args.processor_port,
                               args.admin_port, processor_host=args.processor_host,
                               upstream_host=args.upstream_host, ops_port=args.ops_port,
                               limits=source_limits(args.source_limit)))
    return 0


def source_limits(specs: list[str]):
    """``BUDGET=PER_SECOND/BURST`` each, over the defaults."""
    import dataclasses

    from bkv_edge.envoy import SourceLimit, SourceLimits

    given = {}
    budgets = {f.name for f in dataclasses.fields(SourceLimits)}
    for spec in specs:
        name, _, value = spec.partition("=")
        rate, _, burst = value.partition("/")
        if name not in budgets or not rate.isdigit() or not burst.isdigit() or int(burst) < 1:
            raise SystemExit(f"--source-limit {spec!r}: expected one of {sorted(budgets)}=PER_SECOND/BURST")
        given[name] = SourceLimit(int(rate), int(burst))
    return dataclasses.replace(SourceLimits(), **given)


def load_key(path: Path):
    from bkv_protocol.noise import StaticKey

    raw = base64.b64decode(path.read_text().strip(), validate=True)
    if len(raw) != 32:
        raise SystemExit(f"{path}: not an X25519 key")
    return StaticKey(raw)


main = cli.main

if __name__ == "__main__":
    sys.exit(main())
