"""Publishing a validation bundle (the operator's side of docs/ota.md).

Build the bundle that extends the one in etcd, sign it with the operator
root key, have the witness countersign it, and only then store it in etcd,
where the frontend serves it (``GET /v1/bundle``).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx

from bkv_common import bundle as bd
from bkv_common.encoding import b64d
from bkv_common.fleetmap import FLEET_BUNDLE_KEY


class PublishError(Exception):
    """Nothing was published; the message says why."""


def fleet_entry(params_file: Path, edge_public_key: str, valid_days: float, now: int) -> bd.Fleet:
    params = json.loads(params_file.read_text())
    return bd.Fleet(params["fleet_id"], b64d(params["fleet_public_key"]), b64d(edge_public_key),
                    now - 300, now + int(valid_days * 86400))


def publish_bundle(etcd_endpoints: str, prefix: str, operator_key: bd.RootKey, witness_url: str,
                   fleets: list[bd.Fleet], now: int | None = None) -> bd.SignedBundle:
    from bkv_common.etcd import connect

    now = int(time.time()) if now is None else now
    key = (prefix + FLEET_BUNDLE_KEY).encode()

    async def go() -> bd.SignedBundle:
        client = await connect(etcd_endpoints)
        try:
            got = await client.get(key)
            prev = bd.SignedBundle.from_json(got.value) if got is not None else None
            signed = bd.operator_sign(bd.next_bundle(prev, fleets, now), operator_key)
            async with httpx.AsyncClient(timeout=10) as http:
                res = await http.post(witness_url.rstrip("/") + "/witness/v1/countersign",
                                      json={"bundle": signed.to_json()})
            if res.status_code != 200:
                raise PublishError(f"the witness refused: {res.text[:300]}")
            out = signed.with_witness(b64d(res.json()["witness_signature"]))
            # Only if nobody published in between (compare-and-swap on the key).
            tx = client.transactions
            compare = [tx.mod(key) == got.mod_revision] if got is not None else [tx.version(key) == 0]
            ok, _ = await client.transaction(compare=compare, success=[tx.put(key, out.to_json().encode())],
                                             failure=[])
            if not ok:
                raise PublishError("another bundle was published meanwhile; run again")
            return out
        finally:
            await client.close()

    return asyncio.run(go())
