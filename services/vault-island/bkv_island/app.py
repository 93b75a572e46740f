"""The island's HTTP face; its errors are answered by ``errors.TABLE``."""

from __future__ import annotations

from bkv_server.ratelimit import PHASES, Limiter
from bkv_server.rpc import Handler, RpcApp
from bkv_protocol import island_api as api
from bkv_protocol import operations as ops
from bkv_island import errors
from bkv_island.core import Island


def create_app(island: Island, limiter: Limiter | None = None, **hooks) -> RpcApp:
    """``limiter``: the per-account limits (scope ``account``), checked here
    because every frontend sends an island's requests to one preferred
    replica, so one account's requests meet in one process
    (docs/architecture.md, "Rate limits")."""
    def handler(op: ops.Operation) -> Handler:
        run = getattr(island, op.name)
        if limiter is None or op.name not in PHASES:
            return run
        admit, name = limiter.admit, op.name

        async def limited(req):
            admit(name, req.user_id)  # raises RateLimited: 429, nothing done
            return await run(req)

        return limited

    return RpcApp("vault-island", {
        # The client operations, each by its one name (bkv_protocol.operations).
        **{op.island_path: (op.island_request, handler(op)) for op in ops.CATALOGUE},
        "/island/v1/admin/move": (api.MoveIn, island.move),
        "/island/v1/admin/move-in": (api.MoveInIn, island.move_in),
        "/island/v1/admin/migrate": (api.MigrateIn, island.migrate),
        "/island/v1/admin/list-refs": (api.ListRefsIn, island.list_refs),
    }, errors=errors.TABLE, **hooks)
