"""The service shell and what every service answers the same way: one
Retry-After rule (a retryable error answer, and only it, says Retry-After),
settings loaded once with bad ones said once (exit 2), subcommands
dispatched from their registry, and the client's one exit-code map, which
never prints a refusal's free text."""

from __future__ import annotations

import httpx
import pytest
from pydantic import BaseModel
from pydantic_settings import SettingsConfigDict

from bkv_server.rpc import ErrorTable, RpcApp
from bkv_server.service import error_response, passthrough_response
from bkv_server.settings import ServiceSettings
from bkv_server.shell import Shell, arg
from bkv_protocol.wire import ErrorCode as C


class In(BaseModel):
    x: int


class Busy(Exception):
    pass


class Closed(Exception):
    pass


async def test_an_rpc_answer_says_retry_after_exactly_when_it_is_retryable():
    async def handler(req: In) -> In:
        raise Busy() if req.x == 1 else Closed()

    app = RpcApp("test-retry-after", {"/t": (In, handler)},
                 errors=ErrorTable((Busy, C.CONFLICT, True), (Closed, C.LOG_DIVERGED, False)),
                 ready=lambda: False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        busy, closed = await c.post("/t", json={"x": 1}), await c.post("/t", json={"x": 2})
        not_ready = await c.get("/readyz")
    assert (busy.status_code, busy.headers.get("retry-after")) == (409, "1")
    assert (closed.status_code, closed.headers.get("retry-after")) == (503, None)
    assert (not_ready.status_code, not_ready.headers.get("retry-after")) == (503, "1")


def test_the_frontend_responses_follow_the_same_rule():
    assert error_response(503, C.UNAVAILABLE, "x", retryable=True).headers["retry-after"] == "1"
    assert "retry-after" not in error_response(503, C.LOG_DIVERGED, "x").headers
    from bkv_server.rpc import error_body

    kept = passthrough_response(401, error_body(C.UNAUTHENTICATED, "x"), {"WWW-Authenticate": "Bearer"})
    assert kept.headers["www-authenticate"] == "Bearer" and "retry-after" not in kept.headers


class ExampleSettingsFake(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="BKV_SHELLTEST_", extra="ignore", frozen=True)

    port: int = 1
    needed: str


def _shell() -> tuple[Shell, list]:
    cli, seen = Shell("bkv-test", "a test"), []

    @cli.command("plain", "no settings", arg("--n", type=int, default=3))
    def plain(args) -> int:
        seen.append(("plain", args.n))
        return 0

    @cli.command("with", "settings", settings=ExampleSettingsFake)
    def with_settings(args, settings) -> int:
        seen.append(("with", settings.needed, cli.settings(ExampleSettingsFake) is settings))
        return cli.fail("said", 5)

    return cli, seen


def test_a_subcommand_runs_from_the_registry_with_its_flags(monkeypatch):
    monkeypatch.delenv("BKV_SHELLTEST_NEEDED", raising=False)
    cli, seen = _shell()
    assert cli.main(["plain", "--n", "7"]) == 0  # no settings read: none needed
    assert seen == [("plain", 7)]


def test_bad_settings_are_said_once_with_exit_code_2(monkeypatch, capsys):
    monkeypatch.delenv("BKV_SHELLTEST_NEEDED", raising=False)
    cli, seen = _shell()
    assert cli.main(["with"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bkv-test: bad settings: ") and err.count("bad settings") == 1
    assert seen == []


def test_settings_are_loaded_once_and_handed_to_the_command(monkeypatch, capsys):
    monkeypatch.setenv("BKV_SHELLTEST_NEEDED", "yes")
    cli, seen = _shell()
    assert cli.main(["with"]) == 5
    assert seen == [("with", "yes", True)]
    assert capsys.readouterr().err == "bkv-test: said\n"


def test_the_client_map_prints_a_refusals_code_never_its_text(capsys):
    import typer

    from bkv import errors
    from bkv.exitcodes import ExitCode, outcomes

    with pytest.raises(typer.Exit) as got:
        with outcomes():
            raise errors.ProtocolError("bad_request", "run `bkv password forgot` now")
    assert got.value.exit_code == ExitCode.ERROR
    err = capsys.readouterr().err
    assert "bad_request" in err and "forgot" not in err
