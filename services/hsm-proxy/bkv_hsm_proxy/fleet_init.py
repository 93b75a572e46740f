"""fleet-init: the admin step that creates the fleet inside the token.

Idempotent: keys and the sealed OPAQUE setup are created only if absent, and
never overwritten. Prints and writes the public fleet parameters.
"""

from __future__ import annotations

import json
from pathlib import Path

from bkv_protocol import islands, members
from bkv_protocol.encoding import fleet_id_for
from bkv_server.fleetmap import FLEET_PARAMS_KEY
from bkv_hsm_proxy.core import VaultHsm
from bkv_hsm_proxy.hsm import open_token
from bkv_hsm_proxy.islandset import store_island_set
from bkv_hsm_proxy.membership import fix_admin_key, fix_member_set
from bkv_hsm_proxy.settings import HsmProxySettings



def fleet_init(settings: HsmProxySettings, out: Path | None, new_generation: bool = False,
               admin_public_key: bytes | None = None, member_set: members.SignedMemberSet | None = None,
               island_set: islands.SignedIslandSet | None = None) -> dict:
    """Without ``new_generation``: make the first fleet if the token has none,
    and describe the oldest fleet (the one /v1/fleet names). With it
    (rotation): add a fleet -- new keys, the OPAQUE setup re-sealed for them --
    and describe that one; /v1/fleet keeps naming the old one until it retires.
    ``admin_public_key`` and ``member_set`` (signed by that key): fixed in
    the token the first time, checked against it after. ``island_set``
    (signed by that key): stored if it is the token's next one (the first,
    at a new fleet), nothing if the token holds it already, else refused
    (``errors.IslandSetRefused``)."""
    hsm = open_token(settings.pkcs11_module, settings.token_label, settings.user_pin.get_secret_value())
    try:
        if admin_public_key is not None:
            fix_admin_key(hsm, admin_public_key)
        if member_set is not None:
            fix_member_set(hsm, member_set)
        if island_set is not None:
            store_island_set(hsm, island_set)
        created = False
        gens = hsm.generations()
        if not gens:
            gen = 0
            hsm.generate_keys(gen)
            created = True
        elif new_generation:
            gen = max(gens) + 1
            hsm.generate_keys(gen)
            created = True
        else:
            gen = min(gens)
        VaultHsm.create_opaque_setup(hsm, gen)
        vault = VaultHsm(hsm, max_attempts=settings.max_attempts)
        params = vault.params(fleet_id_for(hsm.public_key_der(gen))).model_dump(mode="json")
        params["key_attributes"] = hsm.key_attributes(gen)
        params["token"] = hsm.token_info
    finally:
        hsm.close()
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(params, indent=2) + "\n")
    if settings.etcd_endpoints and not new_generation:
        import asyncio

        from bkv_server.etcd import connect

        from bkv_server.etcd import RETRYABLE
        from bkv_protocol.retry import Backoff, retry

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


class RetireRefused(Exception):
    """The fleet was not retired; the message says why."""


def retire_fleet(settings: HsmProxySettings, fleet_id: str) -> dict:
    """Destroy a fleet's keys in the token after its overlap window, once no
    record is sealed by it any more (run ``bkv-island migrate-fleet`` first),
    and publish the oldest remaining fleet's parameters."""
    import asyncio
    import json as _json

    from bkv_server.etcd import connect

    if not settings.etcd_endpoints:
        raise RetireRefused("BKV_HSM_ETCD_ENDPOINTS is needed to check that no record still uses the fleet")
    hsm = open_token(settings.pkcs11_module, settings.token_label, settings.user_pin.get_secret_value())
    try:
        fleets = {fleet_id_for(hsm.public_key_der(g)): g for g in hsm.generations()}
        if fleet_id not in fleets:
            raise RetireRefused(f"this token has no fleet {fleet_id}")
        if len(fleets) == 1:
            raise RetireRefused("it is the only fleet; bring up its successor first")
        oldest = min(fleets, key=fleets.get)

        async def records_still_sealed_by_it() -> int:
            client = await connect(settings.etcd_endpoints)
            try:
                count = 0
                for kv in await client.get_prefix((settings.etcd_prefix + "/records/").encode()):
                    entry = _json.loads(kv.value)
                    if entry.get("state") == "live" and (entry.get("fleet_id") or oldest) == fleet_id:
                        count += 1
                return count
            finally:
                await client.close()

        left = asyncio.run(records_still_sealed_by_it())
        if left:
            raise RetireRefused(f"{left} record(s) are still sealed by fleet {fleet_id}; run "
                                f"`bkv-island migrate-fleet <new fleet id>` first")
        hsm.destroy_keys(fleets[fleet_id])
    finally:
        hsm.close()
    return fleet_init(settings, None)  # publishes the oldest remaining fleet as /fleet/params


def missing_from_token(hsm) -> str | None:
    """What fleet-init has not put into the token yet (None: all of it).
    ``start`` waits on this: on a new install the chart starts the
    hsm-proxies while the fleet-init Job is still writing."""
    from bkv_hsm_proxy.hsm import OPAQUE_SETUP_LABEL, generation_label
    from bkv_hsm_proxy.membership import MEMBER_SET_LABEL, token_admin_key

    if token_admin_key(hsm) is None:
        return "the admin key"
    if hsm.load_blob(f"{MEMBER_SET_LABEL}1") is None:
        return "the first member set"
    gens = hsm.generations()
    if not gens or hsm.load_blob(generation_label(OPAQUE_SETUP_LABEL, min(gens))) is None:
        return "the fleet keys and OPAQUE setup"
    return None


def wait_for_fleet_init(open_hsm, wait_s: float, *, clock=None, sleep=None, say=print):
    """An open token that fleet-init has finished, opened by ``open_hsm(rescan)``;
    reopened while something is missing (another process writes the token:
    SoftHSM2 reads a token's objects when it is opened), until ``wait_s``
    has passed. Raises ``TokenNotInitialized`` then (the caller exits 4)."""
    import time

    clock, sleep = clock or time.monotonic, sleep or time.sleep
    deadline = clock() + wait_s
    from bkv_protocol.retry import DeadlineExceeded
    from bkv_hsm_proxy import errors

    told, reopen = None, False
    while True:
        try:
            hsm, reopen = open_hsm(reopen), True
        except (errors.HsmTokenUnavailable, DeadlineExceeded):  # the Job's init-token has not made it yet
            hsm, missing = None, "the token"
        else:
            missing = missing_from_token(hsm)
            if missing is None:
                return hsm
            hsm.close()
        if clock() >= deadline:
            raise TokenNotInitialized(f"fleet-init has not written {missing} yet: run fleet-init"
                                      + (f" (waited {wait_s:.0f} s)" if wait_s else ""))
        if missing != told:
            say(f"bkv-hsm-proxy: waiting for fleet-init ({missing} is not in the token yet)")
            told = missing
        sleep(1.0)


class TokenNotInitialized(Exception):
    """fleet-init has not (yet) made the fleet in this token."""
