"""The chart's `helm test`: register and recover a throwaway account through
the public Service, Envoy and Noise, as a new device would, then delete it.

    BKV_TEST_EDGE_URL, BKV_TEST_EDGE_KEY, BKV_TEST_FLEET_KEY (from the fleet
    ConfigMap), BKV_TEST_ISSUER_DIR (the dev token issuer's key)
    python -m bkv_dev.helmtest

Run by the test pod of charts/backup-key-vault/templates/tests/. Exits 0 only
if the recovered key is the registered one; prints no secret.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import sys
from pathlib import Path

from bkv import errors
from bkv.sdk import VaultClient
from bkv.transport import AsyncNoiseTransport
from bkv_protocol.encoding import b64d
from bkv_protocol.retry import Backoff, retry
from bkv_protocol.secrets import BackupKey
from bkv_protocol.noise import StaticKey
from bkv_dev.issuer import DevIssuer


async def register_and_recover(edge_url: str, edge_key: bytes, fleet_key: bytes, issuer: DevIssuer) -> str:
    user = f"helm-test-{secrets.token_hex(8)}"
    password = secrets.token_urlsafe(18)
    key = BackupKey(os.urandom(32))

    def client() -> VaultClient:
        # A device key of its own for each phase: recovery is what a new phone does.
        device = StaticKey.generate()
        token = issuer.mint(user, device_key_b64=base64.b64encode(device.public).decode())
        return VaultClient(edge_url, fleet_key, user, token,
                           transport=AsyncNoiseTransport(edge_url, edge_key, device))

    async with client() as c:
        await c.register(key, password)
    async with client() as c:
        recovered = await c.recover(password)
        if recovered.key != key:
            raise SystemExit("helm test: the recovered key is not the registered one")
        await c.delete(recovered.ticket)  # the recovery's proof of the password
    return user


def main() -> int:
    env = os.environ
    issuer = DevIssuer.load(Path(env["BKV_TEST_ISSUER_DIR"]))

    async def run() -> str:
        async def attempt(_: int) -> str:
            return await register_and_recover(env["BKV_TEST_EDGE_URL"], b64d(env["BKV_TEST_EDGE_KEY"]),
                                              b64d(env["BKV_TEST_FLEET_KEY"]), issuer)

        # Only "not answering yet" is retried; a wrong pinned key or a refused token fails at once.
        return await retry(attempt, retry_on=lambda e: isinstance(e, errors.VaultUnavailable),
                           backoff=Backoff(deadline_s=60.0, first_delay_s=0.5, max_delay_s=5.0))

    user = asyncio.run(run())
    print(f"helm test: registered, recovered and deleted {user} through {env['BKV_TEST_EDGE_URL']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
