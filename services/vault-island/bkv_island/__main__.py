"""``bkv-island serve``, ``set-map ID [ID...]``, ``add-island ID`` and ``migrate-fleet FLEET_ID``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path


async def _with_etcd(fn):
    """``await fn(client, prefix)`` with an etcd client from BKV_ISLAND_ETCD_ENDPOINTS /
    BKV_ISLAND_ETCD_PREFIX, closed afterwards (the admin commands)."""
    from bkv_server.etcd import connect

    client = await connect(os.environ.get("BKV_ISLAND_ETCD_ENDPOINTS", "127.0.0.1:2379"))
    try:
        return await fn(client, os.environ.get("BKV_ISLAND_ETCD_PREFIX", "/bkv"))
    finally:
        await client.close()


def _matching(pattern: str, what: str):
    """An argparse type: the whole argument matches ``pattern`` (fullmatch:
    Python's `$` would let a trailing newline through)."""
    import re

    rx = re.compile(pattern)

    def check(value: str) -> str:
        if not rx.fullmatch(value):
            raise argparse.ArgumentTypeError(f"not a valid {what}: {value!r}")
        return value

    return check


ISLAND_ARG = _matching(r"[a-z0-9][a-z0-9\-]{0,62}", "island id (lowercase letters, digits and dashes)")
FLEET_ARG = _matching(r"[0-9a-f]{32}", "fleet id (32 hex digits)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bkv-island", description="A vault island of Backup Key Vault.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve", help="serve this island replica (settings from BKV_ISLAND_* variables)")
    sm = sub.add_parser("set-map", help="write the island map to etcd (BKV_ISLAND_ETCD_ENDPOINTS/PREFIX)")
    sm.add_argument("islands", nargs="+", type=ISLAND_ARG)
    sm.add_argument("--if-absent", action="store_true",
                    help="only write a first map; an existing one changes through add-island, which moves records")
    ai = sub.add_parser("add-island", help="add a running island: store the admin's two signed island sets in "
                                           "every hsm-proxy, and move the users that now hash to it between them")
    ai.add_argument("island", type=ISLAND_ARG)
    ai.add_argument("--island-sets", type=Path, nargs=2, required=True, metavar=("MOVING", "FINAL"),
                    help="the two sets `bkv-hsm-proxy sign-islands` made for this island: the islands with it "
                         "and the old ones as --previous, then the same islands alone (the next epoch)")
    ai.add_argument("--hsm-url", action="append", default=None,
                    help="an hsm-proxy to store them in; repeat for each (default: $BKV_ISLAND_HSM_URLS)")
    mf = sub.add_parser("migrate-fleet", help="rotation: re-seal every record under a new fleet's keys")
    mf.add_argument("fleet_id", type=FLEET_ARG)
    args = parser.parse_args(argv)

    if args.cmd == "migrate-fleet":
        import json

        from bkv_island.rebalance import migrate_fleet

        print(json.dumps(asyncio.run(_with_etcd(lambda c, prefix: migrate_fleet(c, prefix, args.fleet_id)))))
        return 0

    if args.cmd == "add-island":
        import json

        from bkv_island.rebalance import add_island
        from bkv_protocol import islands as isl
        from bkv_server.http import UpstreamError, UpstreamUnavailable
        from bkv_server.settings import split_list

        urls = args.hsm_url or split_list(os.environ.get("BKV_ISLAND_HSM_URLS", ""))
        try:
            moving, final = (isl.SignedIslandSet.from_json(p.read_bytes()) for p in args.island_sets)
            print(json.dumps(asyncio.run(_with_etcd(lambda c, prefix: add_island(c, prefix, args.island, moving,
                                                                                 final, urls)))))
        except (RuntimeError, isl.IslandSetError, OSError, UpstreamError, UpstreamUnavailable) as exc:
            print(f"bkv-island: {exc}", file=sys.stderr)
            return 1
        return 0

    if args.cmd == "set-map":
        from bkv_server.etcd import RETRYABLE
        from bkv_server.fleetmap import read_map, set_first_island_map, set_island_map
        from bkv_protocol.retry import Backoff, retry

        async def set_map(client, prefix: str) -> str:
            if args.if_absent and not await set_first_island_map(client, prefix, args.islands):
                current, _ = await read_map(client, prefix)
                return "island map kept: " + " ".join(current)
            await set_island_map(client, prefix, args.islands)
            return "island map: " + " ".join(sorted(set(args.islands)))

        # In a cluster this runs from a Job that may start before etcd has a leader.
        print(asyncio.run(retry(lambda _: _with_etcd(set_map), retry_on=lambda e: isinstance(e, RETRYABLE),
                                backoff=Backoff(deadline_s=120.0, first_delay_s=0.2, max_delay_s=2.0))))
        return 0

    from pydantic import ValidationError

    from bkv_island.settings import IslandSettings

    try:
        settings = IslandSettings()
    except ValidationError as exc:
        print(f"bkv-island: bad settings: {exc}", file=sys.stderr)
        return 2
    from bkv_server.service import run
    from bkv_island.server import build_app

    run(build_app(settings), settings.host, settings.port, settings.metrics_port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
