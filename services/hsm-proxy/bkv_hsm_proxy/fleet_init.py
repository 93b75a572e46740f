"""fleet-init: the admin step that creates the fleet inside the token.

Idempotent: keys and the sealed OPAQUE setup are created only if absent, and
never overwritten. Prints and writes the public fleet parameters.
"""

from __future__ import annotations

import json
from pathlib import Path

from bkv_common.fleetmap import FLEET_PARAMS_KEY
from bkv_hsm_proxy.core import VaultHsm
from bkv_hsm_proxy.hsm import Pkcs11Hsm
from bkv_hsm_proxy.settings import HsmProxySettings



def fleet_init(settings: HsmProxySettings, out: Path | None) -> dict:
    hsm = Pkcs11Hsm(settings.pkcs11_module, settings.token_label, settings.user_pin.get_secret_value())
    try:
        created = False
        if not hsm.keys_present():
            hsm.generate_keys()
            created = True
        VaultHsm.create_opaque_setup(hsm)
        vault = VaultHsm(hsm, max_attempts=settings.max_attempts)
        params = vault.params().model_dump(mode="json")
        params["key_attributes"] = hsm.key_attributes()
        params["token"] = hsm.token_info
    finally:
        hsm.close()
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(params, indent=2) + "\n")
    if settings.etcd_endpoints:
        import asyncio

        from bkv_common.etcd import connect

        from bkv_common.etcd import RETRYABLE
        from bkv_common.retry import Backoff, retry

        async def publish_once(_: int) -> None:
            client = await connect(settings.etcd_endpoints)
            try:
                await client.put((settings.etcd_prefix + FLEET_PARAMS_KEY).encode(), json.dumps(params).encode())
            finally:
                await client.close()

        # In a cluster the Job may start before etcd has a leader.
        asyncio.run(retry(publish_once, retry_on=lambda e: isinstance(e, RETRYABLE),
                          backoff=Backoff(deadline_s=120.0, first_delay_s=0.2, max_delay_s=2.0)))
    params["created"] = created
    return params
