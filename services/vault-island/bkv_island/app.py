"""The island's HTTP face; its errors are answered by ``errors.TABLE``."""

from __future__ import annotations

from bkv_server.rpc import RpcApp
from bkv_protocol import island_api as api
from bkv_protocol import operations as ops
from bkv_island import errors
from bkv_island.core import Island


def create_app(island: Island, **hooks) -> RpcApp:
    return RpcApp("vault-island", {
        # The client operations, each by its one name (bkv_protocol.operations).
        **{op.island_path: (op.island_request, getattr(island, op.name)) for op in ops.CATALOGUE},
        "/island/v1/admin/move": (api.MoveIn, island.move),
        "/island/v1/admin/move-in": (api.MoveInIn, island.move_in),
        "/island/v1/admin/migrate": (api.MigrateIn, island.migrate),
        "/island/v1/admin/list-refs": (api.ListRefsIn, island.list_refs),
    }, errors=errors.TABLE, **hooks)
