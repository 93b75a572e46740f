"""Per-process server CPU of one guess (recovery start), without Locust.

    .venv/bin/python loadtest/hotpath.py [--ops 400] [--noise] [--profile DIR]

Starts a fleet, sends guesses with the async SDK at concurrency 1 and 8, and
prints CPU milliseconds per guess for every fleet process. ``--noise`` goes
through Envoy and the Noise processor (the real path); ``--threads`` also
splits each Python service's CPU by thread, from /proc (the event loop's
thread apart from gRPC's and the others) -- py-spy counts a thread blocked
in native code, such as gRPC's poller in epoll, as busy, so its profiles
cannot say what those threads cost; ``--profile DIR``
records each Python service with py-spy (``pip install py-spy``) during the
concurrency-8 run (``--profile-at 1``: the concurrency-1 run) and writes one
raw (collapsed) profile per process, of the thread holding the GIL (a thread
descheduled in a system call still holds it: read /proc's CPU, ``--threads``,
for what things cost). Used to measure
each optimisation before and after (docs/performance.md): check out the
commit before a change, run this, check out the change, run it again.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "loadtest")]

import opaque_ke_py as opaque  # noqa: E402

from bench import cpu_seconds, stat_cpu_seconds  # noqa: E402
from bkv.sdk import VaultClient  # noqa: E402
from bkv.transport import AsyncNoiseTransport  # noqa: E402
from bkv_protocol.encoding import b64d  # noqa: E402
from bkv_protocol.secrets import BackupKey  # noqa: E402
from bkv_protocol.noise import StaticKey  # noqa: E402
from bkv_dev.fleet import start_fleet  # noqa: E402


def make_client(fleet, noise: bool) -> VaultClient:
    key = b64d(fleet.fleet_params["fleet_public_key"])
    if not noise:
        return VaultClient(fleet.frontend_url, key, "hotpath", fleet.issuer().mint("hotpath"))
    device = StaticKey.generate()
    token = fleet.issuer().mint("hotpath", device_key_b64=base64.b64encode(device.public).decode())
    return VaultClient(fleet.edge_url, key, "hotpath", token,
                       transport=AsyncNoiseTransport(fleet.edge_url, b64d(fleet.edge_public_key), device))


def start_profilers(fleet, out: Path, seconds: int) -> list[subprocess.Popen]:
    out.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen([shutil.which("py-spy") or "py-spy", "record", "-p", str(p.pid), "-d", str(seconds),
                              "-r", "200", "--gil", "-f", "raw", "-o", str(out / f"{name}.txt")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for name, p in fleet.procs.items()
            if p.pid and not name.startswith(("etcd", "envoy"))]


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of a process by thread: "main" (the event loop's) or the
    thread's name (gRPC names its threads "event_engine"; others inherit "python")."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = "main" if int(task.name) == pid else (task / "comm").read_text().strip()
        except OSError:
            continue  # the thread ended
        out[name] = out.get(name, 0.0) + stat_cpu_seconds(task / "stat")
    return out


async def measure(fleet, ops: int, noise: bool = False, profile: Path | None = None, threads: bool = False,
                  profile_at: int = 8) -> None:
    async with make_client(fleet, noise) as c:
        await c.register(BackupKey(os.urandom(32)), "pw")
        pids = {n: p.pid for n, p in fleet.procs.items()}
        for conc in (1, 8):
            spies = start_profilers(fleet, profile, 600) if profile and conc == profile_at else []
            before = {k: cpu_seconds([v]) for k, v in pids.items()}
            python = {k: v for k, v in pids.items() if k.startswith(("frontend", "island", "hsm"))}
            by_thread = {k: thread_cpu(v) for k, v in python.items()} if threads else {}
            t, c0 = time.perf_counter(), time.process_time()

            async def worker(m: int) -> None:
                for _ in range(m):
                    await c.recover_start(opaque.client_login_start(os.urandom(8)).get_message())

            await asyncio.gather(*(worker(ops // conc) for _ in range(conc)))
            wall, client = time.perf_counter() - t, time.process_time() - c0
            spent = {k: 1000 * (cpu_seconds([v]) - before[k]) / ops for k, v in pids.items()}
            busy = {k: round(v, 2) for k, v in spent.items() if v > 0.1}
            for spy in spies:
                spy.send_signal(signal.SIGINT)  # py-spy writes what it has on SIGINT
                spy.wait(timeout=60)
            print(f"concurrency {conc}: {ops / wall:.0f} guesses/s, client {1000 * client / ops:.2f} ms/op, "
                  f"server {sum(spent.values()):.2f} ms/op {busy}")
            for k, start in by_thread.items():
                now = thread_cpu(python[k])
                split = {t: round(1000 * (now[t] - start.get(t, 0.0)) / ops, 3) for t in now}
                if sum(split.values()) > 0.1:
                    print(f"  {k} by thread, ms/op: {dict(sorted(split.items(), key=lambda kv: -kv[1]))}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", type=int, default=400)
    ap.add_argument("--noise", action="store_true", help="through Envoy and the Noise processor")
    ap.add_argument("--profile", type=Path, help="write a py-spy profile of each service here")
    ap.add_argument("--profile-at", type=int, choices=(1, 8), default=8, help="the concurrency to profile")
    ap.add_argument("--threads", action="store_true", help="split each Python service's CPU by thread")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bkv-hotpath-") as tmp:
        fleet = start_fleet(Path(tmp), max_attempts=1000, unlimited=True)
        try:
            asyncio.run(measure(fleet, args.ops, args.noise, args.profile, args.threads, args.profile_at))
        finally:
            fleet.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
