"""The island's HTTP face; its errors are answered by ``errors.TABLE``."""

from __future__ import annotations

from bkv_server.rpc import RpcApp
from bkv_protocol import island_api as api
from bkv_island import errors
from bkv_island.core import Island


def create_app(island: Island, **hooks) -> RpcApp:
    return RpcApp("vault-island", {
        "/island/v1/registration/start": (api.RegistrationStartIn, island.registration_start),
        "/island/v1/registration/finish": (api.RegistrationFinishIn, island.registration_finish),
        "/island/v1/login/start": (api.LoginStartIn, island.login_start),
        "/island/v1/login/finish": (api.LoginFinishIn, island.login_finish),
        "/island/v1/record/delete": (api.DeleteIn, island.delete),
        "/island/v1/admin/move": (api.MoveIn, island.move),
        "/island/v1/admin/move-in": (api.MoveInIn, island.move_in),
        "/island/v1/admin/migrate": (api.MigrateIn, island.migrate),
        "/island/v1/admin/list-refs": (api.ListRefsIn, island.list_refs),
    }, errors=errors.TABLE, **hooks)
