"""Shared fixtures. ``fleet`` is a real local fleet (etcd, SoftHSM2 token,
hsm-proxy, two islands of two replicas, frontend) as processes on free
loopback ports, started once per test session."""

from __future__ import annotations

import json
import os
import random
import uuid

import httpx
import pytest

from support import procs

from bkv_dev.fleet import Fleet, start_fleet
from bkv.sdk import VaultClient
from bkv_protocol.encoding import b64d


# Every process the suite starts inherits this mark; pytest_sessionfinish ends
# whatever still carries it (tests/support/procs.py).
os.environ.setdefault(procs.SESSION_MARK, uuid.uuid4().hex)


def pytest_sessionfinish(session, exitstatus):
    """Nothing the suite started outlives it: after every fixture's own
    teardown, end spawned groups still alive and any process still marked."""
    ended = procs.stop_all() + procs.sweep_session(os.environ[procs.SESSION_MARK])
    if ended:
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_line(f"ended {len(ended)} process(es) the suite left running:", yellow=True)
            for line in ended:
                tr.write_line(f"  {line}")


@pytest.fixture(scope="session", autouse=True)
def reliability_report():
    """Fault tests add rows; the report is written once, after all of them."""
    from reliability_report import FULL_REPORT_ROWS, ROWS, write_report

    yield
    if len(ROWS) == FULL_REPORT_ROWS:
        write_report()


@pytest.fixture(scope="session")
def fleet(tmp_path_factory) -> Fleet:
    f = start_fleet(tmp_path_factory.mktemp("fleet"))
    yield f
    f.down()


class RecordingTransport(httpx.AsyncBaseTransport):
    """Passes requests through and keeps (path, request body, response body);
    ``mutate`` may rewrite a response body before the client sees it."""

    def __init__(self, mutate=None) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.exchanges: list[tuple[str, bytes, bytes]] = []
        self.mutate = mutate

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = request.content
        resp = await self._inner.handle_async_request(request)
        content = await resp.aread()
        if self.mutate is not None and resp.status_code == 200:
            content = self.mutate(request.url.path, content)
        self.exchanges.append((request.url.path, body, content))
        headers = [(k, v) for k, v in resp.headers.items() if k.lower() != "content-length"]
        return httpx.Response(resp.status_code, headers=headers, content=content)

    def body(self, path: str, which: int = 0) -> dict:
        return json.loads([e for e in self.exchanges if e[0] == path][which][1])

    def answer(self, path: str, which: int = 0) -> dict:
        return json.loads([e for e in self.exchanges if e[0] == path][which][2])

    async def aclose(self) -> None:
        await self._inner.aclose()


@pytest.fixture
async def make_client(fleet):
    """``make_client(user, transport=None)``: a brand-new device for ``user``."""
    clients: list[VaultClient] = []

    def make(user: str, **kwargs) -> VaultClient:
        c = VaultClient(fleet.frontend_url, b64d(fleet.fleet_params["fleet_public_key"]), user,
                        fleet.issuer().mint(user), **kwargs)
        clients.append(c)
        return c

    yield make
    for c in clients:
        await c.aclose()


async def read_entry(etcd, fleet, user: str):
    """The user's entry as etcd holds it: (Entry, raw bytes or None, key)."""
    from bkv_server.fleetmap import rendezvous
    from bkv_protocol.hsm_api import Entry, EntryState
    from bkv_island.store import user_key

    key = user_key("/bkv", rendezvous(user, fleet.spec.islands), user)
    got = await etcd.get(key)
    if got is None:
        return Entry(state=EntryState.ABSENT, version=0), None, key
    return Entry.model_validate_json(got.value), got.value, key


@pytest.fixture
async def etcd(fleet):
    from bkv_server.etcd import connect

    client = await connect(fleet.etcd_endpoints)
    yield client
    await client.close()


def unique_user(prefix: str = "u") -> str:
    return f"{prefix}-{random.getrandbits(48):012x}"
