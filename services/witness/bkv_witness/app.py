"""HTTP face of the witness: countersign, and the read-only log."""

from __future__ import annotations

import asyncio

from bkv_protocol import bundle as bd
from bkv_server.rpc import RpcApp
from bkv_protocol import witness_api as api
from bkv_witness import errors
from bkv_witness.core import Witness


def create_app(witness: Witness) -> RpcApp:
    async def countersign(req: api.CountersignIn) -> api.CountersignOut:
        signed = bd.SignedBundle.from_json(req.bundle)
        # The log append fsyncs: off the event loop.
        out = await asyncio.to_thread(witness.countersign, signed)
        return api.CountersignOut(witness_signature=out.witness_signature, sequence=out.bundle.sequence)

    async def log() -> api.LogOut:
        return api.LogOut(entries=witness.log())

    async def public_key() -> api.PublicKeyOut:
        return api.PublicKeyOut(witness_public_key=witness.public_key)

    return RpcApp("witness", {"/witness/v1/countersign": (api.CountersignIn, countersign)},
                  errors=errors.TABLE,
                  get_routes={"/witness/v1/log": log, "/witness/v1/public-key": public_key})
