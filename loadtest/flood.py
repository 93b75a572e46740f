"""Server CPU per request of a guess flood at a dead account, as an abuser sends it.

    .venv/bin/python loadtest/flood.py [--requests 300] [--target destroyed|absent|both] [--unlimited]
    .venv/bin/python loadtest/ab.py --rounds 3 4650c2f HEAD -- flood --requests 300

One device (its own Noise session through Envoy, the real path) sends
``--requests`` recovery starts one after another, as fast as they are
answered, at an account whose record was destroyed by wrong guesses
(``destroyed``) or that never registered (``absent``). It talks HTTP itself
rather than through the SDK: an abuser does not honour a 429's
``retry_after`` the way the SDK does, so every refused request is sent on
at once. Prints, per target, the answers by status and the server CPU per
request for every fleet process (``flood <target>: ... server X ms/req {...}``,
the line loadtest/ab.py reads).

The same file runs against any commit's sources (ab.py's ``flood`` tool runs
this file with the commit's PYTHONPATH): it posts to ``/v1/login/start``,
the path every vault since the first has served (the catalogue keeps it as
an alias of ``/v1/recover/start``), with the body both shapes share, and
uses only the fleet API that has not changed. ``--unlimited`` lifts the
rate limits where the commit has them (FleetSpec.unlimited), which leaves
what the record-state refusals alone save (issue #27).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import os
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "loadtest")]

import httpx  # noqa: E402
import opaque_ke_py as opaque  # noqa: E402

from bench import cpu_seconds  # noqa: E402
from bkv.sdk import VaultClient  # noqa: E402
from bkv.transport import AsyncNoiseTransport  # noqa: E402
from bkv_dev import fleet as dev_fleet  # noqa: E402
from bkv_protocol.encoding import b64d  # noqa: E402
from bkv_protocol.noise import StaticKey  # noqa: E402
from bkv_protocol.secrets import BackupKey  # noqa: E402


def device_client(fleet, user: str) -> tuple[VaultClient, httpx.AsyncClient]:
    """The SDK client (to set the account up) and a raw HTTP client on the
    same device's Noise session (to flood it)."""
    key = b64d(fleet.fleet_params["fleet_public_key"])
    device = StaticKey.generate()
    token = fleet.issuer().mint(user, device_key_b64=base64.b64encode(device.public).decode())
    edge_key = b64d(fleet.edge_public_key)
    sdk = VaultClient(fleet.edge_url, key, user, token,
                      transport=AsyncNoiseTransport(fleet.edge_url, edge_key, device))
    raw = httpx.AsyncClient(base_url=fleet.edge_url, transport=AsyncNoiseTransport(fleet.edge_url, edge_key, device),
                            headers={"authorization": f"Bearer {token}"}, timeout=30)
    return sdk, raw


async def destroy(sdk: VaultClient) -> None:
    """Register, then guess wrong until the record is gone (the fleet allows one attempt)."""
    await sdk.register(BackupKey(os.urandom(32)), "the right password")
    for _ in range(3):
        try:
            await sdk.recover("a wrong password")
        except Exception as exc:  # noqa: BLE001 -- the names differ across commits; the flood checks the state
            if "destroy" in type(exc).__name__.lower() or "locked" in type(exc).__name__.lower():
                return
    # max_attempts=1: the first wrong guess destroyed it, and the second said so


async def flood(fleet, target: str, requests: int) -> None:
    user = f"flood-{target}-{os.urandom(4).hex()}"
    sdk, raw = device_client(fleet, user)
    async with sdk, raw:
        if target == "destroyed":
            await destroy(sdk)
        fleet_id = sdk.fleet_id
        # Warm the session (its handshake is not the flood's cost) and see the account is dead.
        body = {"fleet_id": fleet_id, "request_id": base64.b64encode(os.urandom(16)).decode(),
                "credential_request": base64.b64encode(opaque.client_login_start(b"x").get_message()).decode()}
        first = await raw.post("/v1/login/start", json=body)
        if first.status_code not in (404, 410, 429):
            raise SystemExit(f"flood {target}: the account is not dead: {first.status_code} {first.text[:200]}")
        pids = {n: p.pid for n, p in fleet.procs.items() if p.pid}
        before = {n: cpu_seconds([pid]) for n, pid in pids.items()}
        statuses: Counter[str] = Counter()
        credential_request = base64.b64encode(opaque.client_login_start(b"guess").get_message()).decode()
        t = time.perf_counter()
        for _ in range(requests):
            body = {"fleet_id": fleet_id, "request_id": base64.b64encode(os.urandom(16)).decode(),
                    "credential_request": credential_request}
            try:
                statuses[str((await raw.post("/v1/login/start", json=body)).status_code)] += 1
            except Exception as exc:  # noqa: BLE001 -- the edge's answers in clear (its 429) raise in the transport
                code = re.search(r"\b(\d{3})\b", str(exc))
                statuses[f"edge {code.group(1)}" if code else type(exc).__name__] += 1
        wall = time.perf_counter() - t
        spent = {n: 1000 * (cpu_seconds([pid]) - before[n]) / requests for n, pid in pids.items()}
        busy = {n: round(ms, 3) for n, ms in spent.items() if ms > 0.005}
        print(f"flood {target}: {requests / wall:.0f} req/s, answers {dict(sorted(statuses.items()))}, "
              f"server {sum(spent.values()):.2f} ms/req {busy}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--target", choices=("destroyed", "absent", "both"), default="both")
    ap.add_argument("--unlimited", action="store_true", help="lift the rate limits (where the commit has them)")
    args = ap.parse_args()
    spec = {"max_attempts": 1}
    if args.unlimited and "unlimited" in {f.name for f in dataclasses.fields(dev_fleet.FleetSpec)}:
        spec["unlimited"] = True
    with tempfile.TemporaryDirectory(prefix="bkv-flood-") as tmp:
        fleet = dev_fleet.start_fleet(Path(tmp), **spec)
        try:
            for target in (("destroyed", "absent") if args.target == "both" else (args.target,)):
                asyncio.run(flood(fleet, target, args.requests))
        finally:
            fleet.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
