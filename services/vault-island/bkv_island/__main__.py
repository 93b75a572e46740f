"""``bkv-island serve``, ``set-map ID [ID...]``, ``add-island ID`` and ``migrate-fleet FLEET_ID``."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from pathlib import Path

from bkv_island.settings import ISLAND_ID, IslandAdminSettings, IslandSettings
from bkv_server.shell import Shell, arg

cli = Shell("bkv-island", "A vault island of Backup Key Vault.")


async def _with_etcd(settings: IslandAdminSettings, fn):
    """``await fn(client, prefix)`` with an etcd client from BKV_ISLAND_ETCD_ENDPOINTS /
    BKV_ISLAND_ETCD_PREFIX, closed afterwards (the admin commands)."""
    from bkv_server.etcd import connect

    client = await connect(settings.etcd_endpoints)
    try:
        return await fn(client, settings.etcd_prefix)
    finally:
        await client.close()


def _matching(pattern: str, what: str):
    """An argparse type: the whole argument matches ``pattern`` (fullmatch:
    Python's `$` would let a trailing newline through)."""
    rx = re.compile(pattern)

    def check(value: str) -> str:
        if not rx.fullmatch(value):
            raise argparse.ArgumentTypeError(f"not a valid {what}: {value!r}")
        return value

    return check


ISLAND_ARG = _matching(ISLAND_ID, "island id (lowercase letters, digits and dashes)")
FLEET_ARG = _matching(r"[0-9a-f]{32}", "fleet id (32 hex digits)")


@cli.command("serve", "serve this island replica (settings from BKV_ISLAND_* variables)", settings=IslandSettings)
def serve(args, settings: IslandSettings) -> int:
    from bkv_server.service import run
    from bkv_island.server import build_app

    run(build_app(settings), settings.host, settings.port, settings.metrics_port)
    return 0


@cli.command("set-map", "write the island map to etcd (BKV_ISLAND_ETCD_ENDPOINTS/PREFIX)",
             arg("islands", nargs="+", type=ISLAND_ARG),
             arg("--if-absent", action="store_true",
                 help="only write a first map; an existing one changes through add-island, which moves records"),
             settings=IslandAdminSettings)
def set_map(args, settings: IslandAdminSettings) -> int:
    from bkv_server.etcd import RETRYABLE
    from bkv_server.fleetmap import read_map, set_first_island_map, set_island_map
    from bkv_protocol.retry import Backoff, retry

    async def write(client, prefix: str) -> str:
        if args.if_absent and not await set_first_island_map(client, prefix, args.islands):
            current, _ = await read_map(client, prefix)
            return "island map kept: " + " ".join(current)
        await set_island_map(client, prefix, args.islands)
        return "island map: " + " ".join(sorted(set(args.islands)))

    # In a cluster this runs from a Job that may start before etcd has a leader.
    print(asyncio.run(retry(lambda _: _with_etcd(settings, write), retry_on=lambda e: isinstance(e, RETRYABLE),
                            backoff=Backoff(deadline_s=120.0, first_delay_s=0.2, max_delay_s=2.0))))
    return 0


@cli.command("add-island", "add a running island: store the admin's two signed island sets in every hsm-proxy, "
                           "and move the users that now hash to it between them",
             arg("island", type=ISLAND_ARG),
             arg("--island-sets", type=Path, nargs=2, required=True, metavar=("MOVING", "FINAL"),
                 help="the two sets `bkv-hsm-proxy sign-islands` made for this island: the islands with it "
                      "and the old ones as --previous, then the same islands alone (the next epoch)"),
             arg("--hsm-url", action="append", default=None,
                 help="an hsm-proxy to store them in; repeat for each (default: $BKV_ISLAND_HSM_URLS)"),
             settings=IslandAdminSettings)
def add_island(args, settings: IslandAdminSettings) -> int:
    from bkv_island.rebalance import add_island as add
    from bkv_protocol import islands as isl
    from bkv_server.http import UpstreamError, UpstreamUnavailable

    urls = args.hsm_url or settings.hsm_url_list
    try:
        moving, final = (isl.SignedIslandSet.from_json(p.read_bytes()) for p in args.island_sets)
        print(json.dumps(asyncio.run(_with_etcd(settings, lambda c, prefix: add(c, prefix, args.island, moving,
                                                                                  final, urls)))))
    except (RuntimeError, isl.IslandSetError, OSError, UpstreamError, UpstreamUnavailable) as exc:
        return cli.fail(exc)
    return 0


@cli.command("migrate-fleet", "rotation: re-seal every record under a new fleet's keys",
             arg("fleet_id", type=FLEET_ARG), settings=IslandAdminSettings)
def migrate_fleet(args, settings: IslandAdminSettings) -> int:
    from bkv_island.rebalance import migrate_fleet as migrate

    print(json.dumps(asyncio.run(_with_etcd(settings, lambda c, prefix: migrate(c, prefix, args.fleet_id)))))
    return 0


main = cli.main

if __name__ == "__main__":
    sys.exit(main())
