"""What the Noise edge costs: the same request direct to the frontend, as
plain HTTP through Envoy, and sealed with Noise through Envoy and the
processor -- in one run, on one fleet.

    .venv/bin/python loadtest/bench_edge.py [--requests 1000]

The request is ``/v1/fleet``, answered by the frontend alone, so the
difference between the rows is the edge. CPU is summed over Envoy, the
processor and the frontend (from /proc). Also times the IK handshake.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "loadtest")]

import httpx  # noqa: E402

from bench import cpu_seconds, machine, noise_floor  # noqa: E402
from bkv_dev.fleet import _envoy_binary, free_base_port, start_fleet, wait_until  # noqa: E402
from bkv.transport import NoiseTransport  # noqa: E402
from bkv_protocol.encoding import b64d  # noqa: E402
from bkv_edge.envoy import render  # noqa: E402
from bkv_protocol.noise import StaticKey  # noqa: E402


def measure(name: str, send, n: int, pids: list[int], processor: int | None = None) -> dict:
    send()
    c0, t0 = cpu_seconds(pids), time.perf_counter()
    p0 = cpu_seconds([processor]) if processor else 0.0
    for _ in range(n):
        send()
    wall = time.perf_counter() - t0
    row = {"path": name, "latency_ms": 1000 * wall / n, "server_cpu_ms": 1000 * (cpu_seconds(pids) - c0) / n}
    if processor:
        row["processor_cpu_ms"] = 1000 * (cpu_seconds([processor]) - p0) / n
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--processor", help="another bkv-noise-processor binary (an A/B of two builds)")
    args = ap.parse_args()
    if args.processor:
        import bkv_dev.fleet

        bkv_dev.fleet._processor_binary = lambda: args.processor
    with tempfile.TemporaryDirectory(prefix="bkv-bench-edge-") as tmp:
        fleet = start_fleet(Path(tmp), unlimited=True)
        plain_port, admin = free_base_port(), free_base_port()
        cfg = Path(tmp) / "plain-envoy.json"
        cfg.write_text(render("127.0.0.1", plain_port, fleet.ports.frontend, 1, admin, noise=False))
        plain = subprocess.Popen([_envoy_binary(), "-c", str(cfg), "--disable-hot-restart", "--log-level", "warn"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: httpx.get(f"http://127.0.0.1:{admin}/ready").status_code == 200, 30, "plain envoy")
            fe = fleet.procs["frontend"].pid
            envoy, proc = fleet.procs["envoy"].pid, fleet.procs["noise-processor"].pid
            http = httpx.Client()
            noise = httpx.Client(transport=NoiseTransport(fleet.edge_url, b64d(fleet.edge_public_key),
                                                          StaticKey.generate()), base_url=fleet.edge_url)
            rows = [
                measure("direct to the frontend", lambda: http.get(f"{fleet.frontend_url}/v1/fleet").raise_for_status(),
                        args.requests, [fe]),
                measure("plain HTTP through Envoy",
                        lambda: http.get(f"http://127.0.0.1:{plain_port}/v1/fleet").raise_for_status(),
                        args.requests, [fe, plain.pid]),
                measure("Noise through Envoy + processor", lambda: noise.get("/v1/fleet").raise_for_status(),
                        args.requests, [fe, envoy, proc], processor=proc),
            ]
            edge_half = 1000 * noise_floor(300)["handshake"]
        finally:
            plain.terminate()
            plain.wait()
            fleet.down()
    m = machine()
    base = rows[0]
    print(f"Machine: {m['cpus']} CPUs, {m['cpu_model']}, Python {m['python']}, {m['date']}; "
          f"{args.requests} sequential `/v1/fleet` requests per path.\n")
    print("| path | latency ms | × direct | server CPU ms/request | × direct |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['latency_ms']:.2f} | {r['latency_ms'] / base['latency_ms']:.2f} | "
              f"{r['server_cpu_ms']:.2f} | {r['server_cpu_ms'] / base['server_cpu_ms']:.2f} |")
    print(f"\nThe processor alone: {rows[2]['processor_cpu_ms']:.3f} ms CPU per Noise request"
          f"{' (' + args.processor + ')' if args.processor else ''}.")
    print(f"\nThe edge's half of an IK handshake (`bkv-noise-processor floor`): {edge_half:.2f} ms CPU, once per session.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
