"""Per-process server CPU of one guess (recovery start), without Locust.

    .venv/bin/python loadtest/hotpath.py [--ops 400]

Starts a fleet, sends guesses with the async SDK at concurrency 1 and 8, and
prints CPU milliseconds per guess for every fleet process. Used to measure
each optimisation before and after (docs/performance.md): check out the
commit before a change, run this, check out the change, run it again.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "loadtest")]

import opaque_ke_py as opaque  # noqa: E402

from bench import cpu_seconds  # noqa: E402
from bkv.sdk import VaultClient  # noqa: E402
from bkv_common.encoding import b64d  # noqa: E402
from bkv_common.secrets import BackupKey  # noqa: E402
from conftest import start_fleet  # noqa: E402


async def measure(fleet, ops: int) -> None:
    key = b64d(fleet.fleet_params["fleet_public_key"])
    async with VaultClient(fleet.frontend_url, key, "hotpath", fleet.issuer().mint("hotpath")) as c:
        await c.register(BackupKey(os.urandom(32)), "pw")
        pids = {n: p.pid for n, p in fleet.procs.items()}
        for conc in (1, 8):
            before = {k: cpu_seconds([v]) for k, v in pids.items()}
            t, c0 = time.perf_counter(), time.process_time()

            async def worker(m: int) -> None:
                for _ in range(m):
                    await c.recovery_start(opaque.client_login_start(os.urandom(8)).get_message())

            await asyncio.gather(*(worker(ops // conc) for _ in range(conc)))
            wall, client = time.perf_counter() - t, time.process_time() - c0
            spent = {k: 1000 * (cpu_seconds([v]) - before[k]) / ops for k, v in pids.items()}
            busy = {k: round(v, 2) for k, v in spent.items() if v > 0.1}
            print(f"concurrency {conc}: {ops / wall:.0f} guesses/s, client {1000 * client / ops:.2f} ms/op, "
                  f"server {sum(spent.values()):.2f} ms/op {busy}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", type=int, default=400)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bkv-hotpath-") as tmp:
        fleet = start_fleet(Path(tmp), max_attempts=1000)
        try:
            asyncio.run(measure(fleet, args.ops))
        finally:
            fleet.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
