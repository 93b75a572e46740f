"""Register the accounts the Locust scenarios use (``load-<i>``, password
``pw-load-<i>``), through the real protocol.

    BKV_LOAD_* environment (as for loadtest/locustfile.py) python loadtest/seed.py

Run by the chart's Locust master before it starts (an init container), and
usable by hand against any fleet whose dev token issuer key you hold. With
``BKV_LOAD_EDGE_URL`` every account is registered from a device of its own
through Envoy and Noise; otherwise straight to ``BKV_LOAD_URL``. Registering
an account again replaces its key and resets its attempts, so a rerun leaves
every account usable.
"""

from __future__ import annotations

import asyncio
import base64
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accounts import account  # noqa: E402
from bkv import errors  # noqa: E402
from bkv.sdk import VaultClient  # noqa: E402
from bkv.transport import AsyncNoiseTransport  # noqa: E402
from bkv_protocol.encoding import b64d  # noqa: E402
from bkv_protocol.retry import Backoff, retry  # noqa: E402
from bkv_protocol.secrets import BackupKey  # noqa: E402
from bkv_protocol.noise import StaticKey  # noqa: E402
from bkv_dev.issuer import DevIssuer  # noqa: E402


async def seed(n: int, prefix: str, *, url: str, fleet_key: bytes, issuer: DevIssuer, edge_url: str = "",
               edge_key: bytes = b"", parallel: int = 8) -> None:
    sem = asyncio.Semaphore(parallel)

    def client(user: str) -> VaultClient:
        if not edge_url:
            return VaultClient(url, fleet_key, user, issuer.mint(user))
        device = StaticKey.generate()
        token = issuer.mint(user, device_key_b64=base64.b64encode(device.public).decode())
        return VaultClient(edge_url, fleet_key, user, token,
                           transport=AsyncNoiseTransport(edge_url, edge_key, device))

    async def one(i: int) -> None:
        user, pw = account(i, prefix)
        async with sem, client(user) as c:
            await c.register(BackupKey(os.urandom(32)), pw)

    await asyncio.gather(*(one(i) for i in range(n)))


def main() -> int:
    env = os.environ
    issuer_dir = Path(env["BKV_LOAD_ISSUER_DIR"])
    issuer = DevIssuer.load(issuer_dir)
    edge_url = env.get("BKV_LOAD_EDGE_URL", "")
    n = int(env.get("BKV_LOAD_USERS", "100"))

    async def run() -> None:
        # The fleet may still be starting (a fresh install): wait for it, a minute at most.
        async def attempt(_: int) -> None:
            await seed(n, env.get("BKV_LOAD_PREFIX", "load"), url=env.get("BKV_LOAD_URL", ""),
                       fleet_key=b64d(env["BKV_LOAD_FLEET_KEY"]), issuer=issuer, edge_url=edge_url,
                       edge_key=b64d(env.get("BKV_LOAD_EDGE_KEY", "")))

        # Only "not answering yet" is retried; a wrong pinned key or a refused token fails at once.
        await retry(attempt, retry_on=lambda e: isinstance(e, errors.VaultUnavailable),
                    backoff=Backoff(deadline_s=60.0, first_delay_s=0.5, max_delay_s=5.0))

    asyncio.run(run())
    print(f"seeded {n} accounts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
