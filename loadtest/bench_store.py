"""What group commit saves: the island's record store (bkv_island/store.py)
against a real etcd, with and without group commit, in one run.

    .venv/bin/python loadtest/bench_store.py [--seconds 4] [--concurrency 1,8,32]

Each of N concurrent writers keeps compare-and-swapping its own record (as
N users' guesses on one island replica do); CPU per swap is this process
(the island's side: aetcd, gRPC, the store) plus etcd's, from /proc. The
two modes alternate, twice each, so the machine's drift hits both.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "loadtest")]

from bench import cpu_seconds, machine  # noqa: E402
from bkv_dev.fleet import wait_until  # noqa: E402
from bkv_server.etcd import connect  # noqa: E402
from bkv_protocol.hsm_api import Entry, EntryState  # noqa: E402
from bkv_island.store import EtcdRecordStore  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def run(etcd, etcd_pid: int, group_commit: bool, writers: int, seconds: float) -> dict:
    store = EtcdRecordStore(etcd, "/bench", group_commit=group_commit)
    island = f"i{time.time_ns()}"
    done = 0
    stop = time.monotonic() + seconds

    async def writer(w: int) -> None:
        nonlocal done
        revision = version = 0
        while time.monotonic() < stop:
            version += 1
            # About the size of a real sealed entry.
            entry = Entry(state=EntryState.LIVE, version=version, sealed="c2VhbGVk" * 60, recent=[f"{version:032x}"])
            if not await store.swap(island, f"user{w}", revision, entry):
                raise RuntimeError("a writer lost a race on its own record")
            revision = (await store.read(island, f"user{w}")).revision
            done += 1

    mine, theirs = cpu_seconds([os.getpid()]), cpu_seconds([etcd_pid])
    t0 = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    wall = time.perf_counter() - t0
    island_ms = 1000 * (cpu_seconds([os.getpid()]) - mine) / done
    etcd_ms = 1000 * (cpu_seconds([etcd_pid]) - theirs) / done
    return {"swaps_per_s": done / wall, "island_ms": island_ms, "etcd_ms": etcd_ms}


async def main_async(args) -> list[tuple[int, str, dict]]:
    client_port, peer_port = _port(), _port()
    with tempfile.TemporaryDirectory(prefix="bkv-bench-store-") as tmp:
        etcd = subprocess.Popen(["etcd", "--name", "bench", "--data-dir", tmp,
                                 "--listen-client-urls", f"http://127.0.0.1:{client_port}",
                                 "--advertise-client-urls", f"http://127.0.0.1:{client_port}",
                                 "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
                                 "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
                                 "--initial-cluster", f"bench=http://127.0.0.1:{peer_port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: socket.create_connection(("127.0.0.1", client_port), 1).close() or True, 30, "etcd")
            client = await connect(f"127.0.0.1:{client_port}")
            await client.put(b"/bench/ready", b"1")
            rows = []
            for writers in args.concurrency:
                for group_commit in (False, True, False, True):
                    r = await run(client, etcd.pid, group_commit, writers, args.seconds)
                    rows.append((writers, "group commit" if group_commit else "one transaction per swap", r))
            await client.close()
            return rows
        finally:
            etcd.terminate()
            etcd.wait(timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=4)
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    args = ap.parse_args()
    rows = asyncio.run(main_async(args))
    m = machine()
    print(f"Machine: {m['cpus']} CPUs, {m['cpu_model']}, Python {m['python']}, {m['date']}; "
          f"{args.seconds:g} s per run, each mode twice, alternating.\n")
    print("| writers | mode | swaps/s | island CPU ms/swap | etcd CPU ms/swap | sum | × per-swap |")
    print("|---|---|---|---|---|---|---|")
    for writers in args.concurrency:
        mine = [(mode, r) for w, mode, r in rows if w == writers]
        base = [r["island_ms"] + r["etcd_ms"] for mode, r in mine if mode.startswith("one")]
        base_avg = sum(base) / len(base)
        for mode, r in mine:
            total = r["island_ms"] + r["etcd_ms"]
            print(f"| {writers} | {mode} | {r['swaps_per_s']:.0f} | {r['island_ms']:.3f} | {r['etcd_ms']:.3f} | "
                  f"{total:.3f} | {total / base_avg:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
