"""The benchmark: server CPU per operation against the cryptographic floor,
both measured in the same run on the same machine.

    .venv/bin/python loadtest/bench.py --duration 20 --out docs/bench

1. Starts a local fleet (the same processes as ``bkv dev up``) with a high
   attempt limit so the guess flood keeps hitting live records.
2. Seeds accounts through the real protocol.
3. Measures the floor in-process on the fleet's own SoftHSM2 token: the
   hsm-proxy's cryptography for each operation (OPAQUE server steps, AES-GCM
   seals, ECDSA signatures) in a tight loop, plus etcd's own CPU per
   compare-and-swap transaction, plus the edge's Noise cryptography (the
   responder's half of an IK handshake, and opening a request and sealing
   its answer) for the handshakes and requests the operation makes.
4. Runs each Locust scenario for a fixed time, through Envoy and Noise as a
   real device (``--plaintext``: straight to the frontend), and sums the CPU
   time of every fleet process (etcd and Envoy included) from /proc; the
   Locust process's CPU is the client's (Argon2 and all) and is reported
   apart, never as server cost.
5. Runs the recovery scenario again, paced at half the throughput it just
   reached, for the latency at half saturation.

Writes ``<out>/bench.json`` and ``<out>/bench.md``. Numbers on a shared
2-core machine are noisy: read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "loadtest"))

CLK = os.sysconf("SC_CLK_TCK")


def stat_cpu_seconds(stat: Path) -> float:
    """utime + stime from a /proc ``stat`` file (a process's or a thread's);
    0 if it has ended."""
    try:
        fields = stat.read_text().rsplit(") ", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK
    except (OSError, IndexError):
        return 0.0


def cpu_seconds(pids: list[int]) -> float:
    return sum(stat_cpu_seconds(Path(f"/proc/{pid}/stat")) for pid in pids)


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpus": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "kernel": platform.release(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


# -- seeding -----------------------------------------------------------------------------------
async def seed(fleet, n: int, prefix: str) -> None:
    from bkv_protocol.encoding import b64d
    from seed import seed as seed_accounts

    await seed_accounts(n, prefix, url=fleet.frontend_url, fleet_key=b64d(fleet.fleet_params["fleet_public_key"]),
                        issuer=fleet.issuer())


# -- the floor -----------------------------------------------------------------------------------
def hsm_floor(fleet, iterations: int) -> dict[str, float]:
    """CPU seconds per operation of the hsm-proxy's cryptography, in-process."""
    import opaque_ke_py as opaque

    from bkv_dev.fleet import SOFTHSM_MODULE, TOKEN_LABEL
    from bkv_protocol import hsm_api as api
    from bkv_hsm_proxy.core import VaultHsm
    from bkv_hsm_proxy.hsm import Pkcs11Hsm
    from bkv_protocol.encoding import user_ref

    os.environ["SOFTHSM2_CONF"] = str(fleet.state / "hsm" / "softhsm2.conf")
    pin = json.loads((fleet.state / "hsm" / "pins.json").read_text())["user"]
    hsm = Pkcs11Hsm(SOFTHSM_MODULE, TOKEN_LABEL, pin)
    vault = VaultHsm(hsm, max_attempts=1000)  # inputs are reused, so the count never drains
    absent = api.Entry(state=api.EntryState.ABSENT, version=0)
    # A user the token's island set places on island-a: only there does the boundary make its record.
    placed = vault.island_set()
    floor_user = "floor" if placed is None else next(
        u for u in (f"floor-{i}" for i in range(10_000)) if placed.settled(user_ref(u), "island-a"))
    # One registration made once; its record is reused (restored) every loop.
    start = opaque.client_registration_start(b"pw")
    rs = vault.registration_start(api.RegistrationStartIn(user_id=floor_user, island="island-a", current=absent,
                                                          registration_request=start.get_message()))
    fin = opaque.client_registration_finish(b"pw", start.get_state(), rs.registration_response)
    reg_in = api.RegistrationFinishIn(user_id=floor_user, island="island-a", request_id=os.urandom(16), current=absent, challenge=rs.challenge,
                                      registration_upload=fin.get_message(), ek=os.urandom(48), k_nonce=os.urandom(12))
    entry, _, _ = vault.registration_finish(reg_in)  # (the next entry, the answer, the account's event)
    login = opaque.client_login_start(b"pw")
    ls_in = api.RecoverStartIn(user_id=floor_user, island="island-a", request_id=os.urandom(16), current=entry, credential_request=login.get_message())
    ls_entry, ls, _ = vault.recover_start(ls_in)
    cfin = opaque.client_login_finish(b"pw", login.get_state(), ls.credential_response).get_message()
    lf_in = api.RecoverFinishIn(user_id=floor_user, island="island-a", request_id=os.urandom(16), current=ls_entry,
                              login_state=ls.login_state, credential_finalization=cfin)
    req = start.get_message()

    def per_op(fn) -> float:
        fn()
        t = time.process_time()
        for _ in range(iterations):
            fn()
        return (time.process_time() - t) / iterations

    out = {
        "registration": per_op(lambda: (
            vault.registration_start(api.RegistrationStartIn(user_id=floor_user, island="island-a", current=absent,
                                                             registration_request=req)),
            vault.registration_finish(reg_in))),
        "guess": per_op(lambda: vault.recover_start(ls_in)),
        "recovery": per_op(lambda: (vault.recover_start(ls_in), vault.recover_finish(lf_in))),
    }
    hsm.close()
    return out


async def etcd_txn_floor(fleet, n: int) -> float:
    """etcd's own CPU seconds per compare-and-swap transaction."""
    from bkv_server.etcd import connect

    client = await connect(fleet.etcd_endpoints)
    etcd_pids = [p.pid for name, p in fleet.procs.items() if name.startswith("etcd")]
    key = b"/bench/floor"
    tx = client.transactions
    rev = 0
    value = os.urandom(400)  # about the size of a sealed entry
    before = cpu_seconds(etcd_pids)
    for _ in range(n):
        ok, _ = await client.transaction(compare=[tx.mod(key) == rev], success=[tx.put(key, value)], failure=[])
        rev = (await client.get(key)).mod_revision
    # The loop also did one read per write; count the pair as one round trip of each.
    spent = (cpu_seconds(etcd_pids) - before) / n
    await client.delete(key)
    await client.close()
    return spent


def noise_floor(iterations: int) -> dict[str, float]:
    """CPU seconds of the edge's own Noise cryptography, measured by the
    processor's binary with its own code (``bkv-noise-processor floor``): the
    responder's half of one IK handshake, and one request opened plus its
    answer sealed (a 200-byte body each way)."""
    from bkv_dev.fleet import _processor_binary

    out = subprocess.run([_processor_binary(), "floor", "--iterations", str(iterations)],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    return {k: float(v) for k, v in json.loads(out).items()}


# -- scenarios -----------------------------------------------------------------------------------
SCENARIOS = {
    # name: (locust user class, simulated users, etcd writes, Noise requests, Noise handshakes) per operation
    "recovery": ("HonestRecovery", 8, 2, 2, 1),  # a new device: one handshake, start and finish
    "guess": ("GuessFlood", 4, 1, 1, 0),         # the attacker keeps its sessions
    "registration": ("Registration", 4, 1, 2, 1),
}


HALF_USERS = 4


def floor_ms(floor: dict, name: str, noise: bool) -> float:
    _, _, writes, requests, handshakes = SCENARIOS[name]
    seconds = floor["hsm"][name] + writes * floor["etcd_txn"]
    if noise:
        seconds += requests * floor["noise"]["request"] + handshakes * floor["noise"]["handshake"]
    return round(1000 * seconds, 3)


def run_scenario(fleet, name: str, duration: int, users: int, seeded: int, out: Path, processes: int,
                 noise: bool = True, rate_per_user: float = 0.0, label: str = "") -> dict:
    cls, default_users = SCENARIOS[name][:2]
    users = users or default_users
    if name == "recovery":
        users = min(users, seeded)  # one account per simulated user: no two recover the same one
    env = {**os.environ, "BKV_LOAD_URL": fleet.frontend_url,
           "BKV_LOAD_FLEET_KEY": fleet.fleet_params["fleet_public_key"],
           "BKV_LOAD_ISSUER_DIR": str(fleet.state / "issuer"), "BKV_LOAD_USERS": str(seeded),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "loadtest"), os.environ.get("PYTHONPATH", "")])}
    if noise:
        env.update(BKV_LOAD_EDGE_URL=fleet.edge_url, BKV_LOAD_EDGE_KEY=fleet.edge_public_key)
    if rate_per_user:
        env["BKV_LOAD_RATE_PER_USER"] = str(rate_per_user)
    server = [p.pid for p in fleet.procs.values() if p.pid]
    groups = _groups(fleet)
    g0 = {g: cpu_seconds(pids) for g, pids in groups.items()}
    prefix = out / f"locust-{label or name}"
    argv = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless",
            "-u", str(users), "-r", str(users * 10), "-t", f"{duration}s", "--csv", str(prefix),
            "--html", f"{prefix}.html", "--only-summary", "--stop-timeout", "5", cls]
    if processes > 1:
        argv[3:3] = ["--processes", str(processes)]
        env["BKV_LOAD_WORKERS"] = str(processes)
    s0, w0, c0 = cpu_seconds(server), time.monotonic(), os.times()
    run = subprocess.run(argv, env=env, cwd=ROOT, check=False, capture_output=True, text=True,
                         timeout=duration + 120)
    if not Path(f"{prefix}_stats.csv").exists():
        raise RuntimeError(f"locust wrote no statistics for {label or name}: {run.stderr[-2000:]}")
    wall = time.monotonic() - w0
    c1 = os.times()
    server_cpu = cpu_seconds(server) - s0
    by_group = {g: cpu_seconds(pids) - g0[g] for g, pids in groups.items()}
    client_cpu = (c1.children_user + c1.children_system) - (c0.children_user + c0.children_system)
    with open(f"{prefix}_stats.csv") as f:
        stats = {r["Name"]: r for r in csv.DictReader(f)}
    row = stats[name]
    ok = int(row["Request Count"]) - int(row["Failure Count"])
    trips = stats.get(f"{name} round trips")
    extra = {f"round_trips_{q}_ms": float(trips[pct]) for q, pct in (("p50", "50%"), ("p95", "95%"), ("p99", "99%"))
             } if trips else {}
    return {**extra,
        "scenario": label or name, "users": users, "seconds": round(wall, 1), "ops": ok,
        "errors": int(row["Failure Count"]), "throughput_per_s": round(ok / duration, 1),
        "p50_ms": float(row["50%"]), "p95_ms": float(row["95%"]), "p99_ms": float(row["99%"]),
        "server_cpu_ms_per_op": round(1000 * server_cpu / max(ok, 1), 3),
        "client_cpu_ms_per_op": round(1000 * client_cpu / max(ok, 1), 3),
        "server_cpu_ms_per_op_by_process": {g: round(1000 * c / max(ok, 1), 3) for g, c in by_group.items()},
    }


def _groups(fleet) -> dict[str, list[int]]:
    """Fleet processes by kind (etcd, hsm-proxy, island, frontend, envoy, noise-processor, ...)."""
    out: dict[str, list[int]] = {}
    for name, p in fleet.procs.items():
        if p.pid:
            kind = next((k for k in ("etcd", "hsm", "island", "frontend", "envoy", "noise-processor", "witness")
                         if name.startswith(k)), name)
            out.setdefault(kind, []).append(p.pid)
    return out


# The targets for two cores (docs/performance.md, "Against the targets").
TARGET_RATIO = 2.5
TARGET_RATE = 1000  # full recoveries/s, and wrong guesses/s end to end
TARGET_P99_MS = 50.0


def targets(result: dict) -> list[dict]:
    """Each target against this run. At TARGET_RATE operations/s two cores
    allow 2000 / TARGET_RATE ms of CPU per operation; ``fixed`` holds what no
    change to our services removes -- the floor (cryptography and etcd's
    transactions), Envoy (the sidecar, unmodified) and, end to end on one
    machine, the load generator -- and ``fixed_ms`` their sum against that budget."""
    rows = {r["scenario"]: r for r in result["scenarios"]}

    def fixed(r: dict, client: bool = False) -> dict[str, float]:
        parts = {"floor": r["floor_ms_per_op"], "envoy": r["server_cpu_ms_per_op_by_process"].get("envoy", 0.0)}
        if client:
            parts["client"] = r["client_cpu_ms_per_op"]
        return parts

    def entry(target: str, measured: str, met: bool, parts: dict[str, float] | None = None) -> dict:
        parts = parts or {}
        return {"target": target, "measured": measured, "met": met, "fixed": parts,
                "fixed_ms": round(sum(parts.values()), 3)}

    out = []
    if (rec := rows.get("recovery")) is not None:
        out.append(entry(f"server CPU per full recovery <= {TARGET_RATIO}x the floor",
                         f"{rec['ratio_to_floor']}x ({rec['server_cpu_ms_per_op']} ms against "
                         f"{rec['floor_ms_per_op']} ms)", rec["ratio_to_floor"] <= TARGET_RATIO))
        out.append(entry(f">= {TARGET_RATE} full recoveries/s per two cores",
                         f"capacity {rec['capacity_per_2_cores']}/s",
                         rec["capacity_per_2_cores"] >= TARGET_RATE, fixed(rec)))
    if (guess := rows.get("guess")) is not None:
        # End to end on one machine: the load generator's CPU counts against the same two cores.
        limit_ok = result["limit_check"].endswith(": ok")
        out.append(entry(f">= {TARGET_RATE} wrong guesses/s end to end, attempt limit intact",
                         f"{guess['throughput_per_s']}/s driven, server capacity {guess['capacity_per_2_cores']}/s; "
                         f"limit {'intact' if limit_ok else 'BROKEN'}",
                         guess["throughput_per_s"] >= TARGET_RATE and limit_ok, fixed(guess, client=True)))
    if (half := rows.get("recovery at half saturation")) is not None and "round_trips_p99_ms" in half:
        out.append(entry(f"p99 recovery latency < {TARGET_P99_MS:.0f} ms at half saturation",
                         f"round trips {half['round_trips_p99_ms']:.0f} ms, end to end with the client's "
                         f"Argon2 {half['p99_ms']:.0f} ms, at {half['throughput_per_s']}/s",
                         half["round_trips_p99_ms"] < TARGET_P99_MS))
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"Machine: {m['cpus']} CPUs, {m['cpu_model']}, Python {m['python']}, Linux {m['kernel']}, {m['date']}.",
        f"Fleet: {result['fleet']}. Duration per scenario: {result['duration_s']} s.", "",
        "| scenario | ops/s | p50 ms | p95 ms | p99 ms | errors | server CPU ms/op | net of idle | floor ms/op | "
        "ratio | capacity/2 cores | client CPU ms/op |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["scenarios"]:
        lines.append(
            f"| {r['scenario']} | {r['throughput_per_s']} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | "
            f"{r['errors']} | {r['server_cpu_ms_per_op']:.2f} | {r['server_cpu_ms_per_op_net_of_idle']:.2f} | "
            f"{r['floor_ms_per_op']:.2f} | "
            f"**{r['ratio_to_floor']:.2f}x** | {r['capacity_per_2_cores']:.0f}/s | {r['client_cpu_ms_per_op']:.2f} |")
    trips = [r for r in result["scenarios"] if "round_trips_p99_ms" in r]
    if trips:
        lines += ["", "Recovery latency, end to end (with the client's Argon2) and in round trips only "
                      "(handshake, start and finish on the wire and in the vault):", "",
                  "| run | ops/s | end to end p50 / p95 / p99 ms | round trips p50 / p95 / p99 ms |", "|---|---|---|---|"]
        for r in trips:
            paced = f" (paced at {r['paced_at_per_s']})" if "paced_at_per_s" in r else ""
            lines.append(f"| {r['scenario']} | {r['throughput_per_s']}{paced} | {r['p50_ms']:.0f} / {r['p95_ms']:.0f} / "
                         f"{r['p99_ms']:.0f} | {r['round_trips_p50_ms']:.0f} / {r['round_trips_p95_ms']:.0f} / "
                         f"{r['round_trips_p99_ms']:.0f} |")
    lines += ["", "Server CPU ms per operation by process:", "",
              "| scenario | " + " | ".join(result["scenarios"][0]["server_cpu_ms_per_op_by_process"]) + " |",
              "|---|" + "---|" * len(result["scenarios"][0]["server_cpu_ms_per_op_by_process"])]
    for r in result["scenarios"]:
        lines.append(f"| {r['scenario']} | " + " | ".join(
            f"{v:.2f}" for v in r["server_cpu_ms_per_op_by_process"].values()) + " |")
    f = result["floor"]
    lines += ["", f"Floor parts (ms/op): hsm-proxy crypto — registration {1000 * f['hsm']['registration']:.3f}, "
              f"guess {1000 * f['hsm']['guess']:.3f}, recovery {1000 * f['hsm']['recovery']:.3f}; "
              f"etcd CPU per CAS transaction {1000 * f['etcd_txn']:.3f}; "
              f"Noise at the edge — responder's half of a handshake {1000 * f['noise']['handshake']:.3f}, "
              f"open a request and seal its answer {1000 * f['noise']['request']:.3f} "
              f"(counted only on the Noise path; per operation: recovery 1 handshake + 2 requests, "
              f"guess 1 request, registration 1 handshake + 2 requests).",
              f"Idle fleet CPU: {1000 * result['idle_fleet_cpu_per_s']:.0f} ms per second (subtracted in 'net of idle').",
              f"Guess-flood limit check: {result['limit_check']}"]
    if result.get("targets"):
        lines += ["", f"Against the targets (at {TARGET_RATE} operations/s, two cores allow "
                      f"{2000 / TARGET_RATE:.2f} ms of CPU per operation):", "",
                  "| target | this run | met? | floor + Envoy (+ client), ms/op: what our services cannot remove |",
                  "|---|---|---|---|"]
        for t in result["targets"]:
            parts = " + ".join(f"{k} {v:.2f}" for k, v in t["fixed"].items())
            parts = f"{parts} = {t['fixed_ms']:.2f}" if parts else "—"
            lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} | {parts} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=20, help="seconds per scenario")
    ap.add_argument("--seed-users", type=int, default=64)
    ap.add_argument("--users", type=int, default=0, help="simulated users per scenario (0: per-scenario default)")
    ap.add_argument("--processes", type=int, default=1, help="Locust processes")
    ap.add_argument("--scenarios", default="guess,recovery,registration")
    ap.add_argument("--plaintext", action="store_true",
                    help="clients straight to the frontend, skipping Envoy and Noise (not the real path)")
    ap.add_argument("--no-half", action="store_true", help="skip the recovery run at half saturation")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench")
    args = ap.parse_args()
    from bkv_dev.fleet import start_fleet  # the same fleet the tests use

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bkv-bench-") as tmp:
        fleet = start_fleet(Path(tmp), max_attempts=1000, unlimited=True)
        try:
            asyncio.run(seed(fleet, args.seed_users, "load"))
            floor = {"hsm": hsm_floor(fleet, 300), "etcd_txn": asyncio.run(etcd_txn_floor(fleet, 300)),
                     "noise": noise_floor(300)}
            noise = not args.plaintext
            idle = idle_cpu_per_s(fleet)
            rows = []
            limit = "not run (no guess scenario)"
            runs = [(name, 0.0) for name in args.scenarios.split(",")]
            for name, rate in runs:
                guesses_before = _guesses(fleet)
                if rate:
                    # One simulated user per Locust process: a user's Argon2 (22 ms of CPU, which
                    # holds its process) must not stall another user's request in flight.
                    r = run_scenario(fleet, name, args.duration, HALF_USERS, args.seed_users, args.out, HALF_USERS,
                                     noise, rate, "recovery at half saturation")
                    r["paced_at_per_s"] = round(rate * HALF_USERS, 1)  # asked; throughput_per_s is what came
                else:
                    r = run_scenario(fleet, name, args.duration, args.users, args.seed_users, args.out,
                                     args.processes, noise)
                r["server_cpu_ms_per_op_net_of_idle"] = round(
                    r["server_cpu_ms_per_op"] - 1000 * idle * r["seconds"] / max(r["ops"], 1), 3)
                if name == "guess":
                    limit = asyncio.run(check_limit(fleet, args.seed_users, _guesses(fleet) - guesses_before))
                if name == "recovery" and not rate and not args.no_half:
                    # Latency when the fleet is not saturated: the same users, paced to half this throughput.
                    runs.append((name, r["throughput_per_s"] / 2 / HALF_USERS))
                r["floor_ms_per_op"] = floor_ms(floor, name, noise)
                r["ratio_to_floor"] = round(r["server_cpu_ms_per_op"] / r["floor_ms_per_op"], 2)
                r["capacity_per_2_cores"] = round(2000 / r["server_cpu_ms_per_op"])
                rows.append(r)
                print(json.dumps(r), flush=True)
        finally:
            fleet.down()
    result = {"machine": machine(), "duration_s": args.duration, "scenarios": rows, "floor": floor,
              "idle_fleet_cpu_per_s": round(idle, 4),
              "fleet": "1 etcd, 1 hsm-proxy (SoftHSM2), 2 islands x 2 replicas, 1 frontend, Envoy + Noise processor; "
                       + ("clients on the plaintext path (--plaintext)" if args.plaintext
                          else "clients through Envoy and Noise, as devices"),
              "limit_check": limit}
    result["targets"] = targets(result)
    (args.out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "bench.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def idle_cpu_per_s(fleet, seconds: float = 5.0) -> float:
    """CPU the fleet burns with no load (refresh loops, leases, etcd heartbeats)."""
    pids = [p.pid for p in fleet.procs.values() if p.pid]
    before = cpu_seconds(pids)
    time.sleep(seconds)  # measuring an interval, not synchronizing
    return (cpu_seconds(pids) - before) / seconds


async def check_limit(fleet, seeded: int, evaluated: float) -> str:
    """After the flood, one more wrong guess per account reads its signed
    attempt count: the attempts used must add up to the guesses the islands
    evaluated (none uncounted), and none may exceed the limit."""
    import opaque_ke_py as opaque

    from accounts import account
    from bkv.sdk import VaultClient
    from bkv_protocol.encoding import b64d

    key, issuer, limit = b64d(fleet.fleet_params["fleet_public_key"]), fleet.issuer(), fleet.spec.max_attempts
    used = []
    for i in range(seeded):
        user, _ = account(i)
        async with VaultClient(fleet.frontend_url, key, user, issuer.mint(user)) as c:
            out = await c.recover_start(opaque.client_login_start(b"probe").get_message())
        used.append(limit - out.attempts_left - 1)
    ok = sum(used) == evaluated and max(used) <= limit
    return (f"{evaluated:.0f} guesses evaluated by the islands; the accounts' signed counts show {sum(used)} used, "
            f"at most {max(used)} on one account (limit {limit}): {'ok' if ok else 'MISMATCH'}")


def _guesses(fleet) -> float:
    import httpx

    total = 0.0
    for name, p in fleet.procs.items():
        if name.startswith("island"):
            for line in httpx.get(f"http://127.0.0.1:{p.port}/metrics").text.splitlines():
                if line.startswith("bkv_recover_attempts_spent_total "):
                    total += float(line.split()[1])
    return total


if __name__ == "__main__":
    sys.exit(main())
