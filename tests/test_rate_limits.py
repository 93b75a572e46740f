"""Rate limits on the real fleet (docs/architecture.md, "Rate limits"):
per account on the island replica an island's requests converge on, under a
Locust flood (loadtest/locustfile.py: AccountFlood) across two frontend
replicas; a device that meets a 429 waits and succeeds; a
second phase is never refused; per-source limits refuse at the edge, before
the frontend sees anything."""

from __future__ import annotations

import asyncio
import base64
import csv
import os
import re
import socket
import sys
import time
from pathlib import Path

import httpx
import opaque_ke_py as opaque
import pytest

from conftest import RecordingTransport, unique_user
from support import procs

from bkv import errors
from bkv.sdk import VaultClient
from bkv_dev.fleet import _envoy_binary, wait_until
from bkv_dev.procs import Proc, Supervisor
from bkv_edge.envoy import SourceLimit, SourceLimits, render
from bkv_frontend.settings import FrontendSettings
from bkv_island.settings import IslandSettings
from bkv_protocol import operations as ops
from bkv_protocol.retry import Backoff
from bkv_protocol.secrets import BackupKey
from bkv_server.fleetmap import rendezvous
from bkv_server.ratelimit import Budget


ROOT = Path(__file__).resolve().parents[1]


def _default(settings, name: str):
    return settings.model_fields[name].default


ACCOUNT_GUESS = Budget(_default(IslandSettings, "account_guess_per_minute"),
                       _default(IslandSettings, "account_guess_burst"))
ACCOUNT_REGISTRATION = Budget(_default(IslandSettings, "account_registration_per_minute"),
                              _default(IslandSettings, "account_registration_burst"))
assert _default(FrontendSettings, "device_guess_burst") > 0  # the device limits are read the same way


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metric(url: str, name: str, **labels: str) -> float:
    """The sum of ``name`` over the series whose labels include ``labels``."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? ([0-9.e+-]+)$", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def _island_urls(fleet, user: str) -> list[str]:
    island = rendezvous(user, fleet.spec.islands)
    return [f"http://{p.host}:{p.port}" for name, p in sorted(fleet.procs.items())
            if re.fullmatch(rf"{re.escape(island)}-\d+", name)]


def _decisions(urls: list[str], budget: str, decision: str) -> list[float]:
    return [_metric(u, "bkv_rate_limit_decisions_total", scope="account", budget=budget, decision=decision)
            for u in urls]


@pytest.fixture(scope="module")
def second_frontend(fleet):
    """Another frontend replica beside the fleet's, on the same etcd and islands."""
    port = _free_port()
    first = fleet.procs["frontend"]
    proc = Proc("frontend-2", first.argv, {**first.env, "BKV_FRONTEND_PORT": str(port)}, port,
                f"http://127.0.0.1:{port}/readyz")
    Supervisor(fleet.state).start(proc)
    try:
        wait_until(lambda: httpx.get(proc.health, timeout=1.0).status_code == 200, 30, "the second frontend")
        yield f"http://127.0.0.1:{port}"
    finally:
        Supervisor.stop([proc])


def _recover_start(fleet, i: int) -> dict:
    req = opaque.client_login_start(f"flood guess {i}".encode()).get_message()
    return {"fleet_id": fleet.fleet_params["fleet_id"], "request_id": base64.b64encode(os.urandom(16)).decode(),
            "credential_request": base64.b64encode(req).decode()}


def _registration_start(fleet) -> dict:
    req = opaque.client_registration_start(b"some password").get_message()
    return {"fleet_id": fleet.fleet_params["fleet_id"], "registration_request": base64.b64encode(req).decode()}


async def _flood(urls: list[str], path: str, token: str, bodies: list[dict]) -> tuple[list[httpx.Response], float]:
    """Every body at once, spread over ``urls``: (answers, seconds from the first send to the last answer)."""
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=200)) as http:
        start = time.monotonic()
        answers = await asyncio.gather(*(
            http.post(urls[i % len(urls)] + path, json=body, headers={"authorization": f"Bearer {token}"})
            for i, body in enumerate(bodies)))
        return answers, time.monotonic() - start


def _locust_flood(fleet, user: str, urls: list[str], out: Path, seconds: int = 6, users: int = 8) -> tuple[dict, float]:
    """Locust's ``AccountFlood`` at ``user`` across ``urls`` (loadtest/locustfile.py):
    (answers by status, seconds from before the first send to after the last answer)."""
    env = {**os.environ, "BKV_LOAD_ISSUER_DIR": str(fleet.state / "issuer"), "BKV_LOAD_FLOOD_USER": user,
           "BKV_LOAD_FLOOD_URLS": ",".join(urls), "BKV_LOAD_FLOOD_FLEET_ID": fleet.fleet_params["fleet_id"],
           "BKV_LOAD_FLEET_KEY": fleet.fleet_params["fleet_public_key"],
           "PYTHONPATH": os.pathsep.join([str(ROOT / "loadtest"), os.environ.get("PYTHONPATH", "")])}
    start = time.monotonic()
    run = procs.run([sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless",
                     "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--csv", str(out / "flood"),
                     "--only-summary", "--stop-timeout", "5", "AccountFlood"],
                    env=env, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 120)
    elapsed = time.monotonic() - start
    assert (out / "flood_stats.csv").exists(), run.stderr[-2000:]
    with open(out / "flood_stats.csv") as f:
        rows = {r["Name"]: int(r["Request Count"]) for r in csv.DictReader(f) if r["Name"] != "Aggregated"}
    return {name.removeprefix("account-flood "): n for name, n in rows.items()}, elapsed


def test_a_locust_flood_across_two_frontends_stays_within_the_per_account_limit(fleet, second_frontend, tmp_path):
    user = unique_user("flood")
    islands = _island_urls(fleet, user)
    before = _decisions(islands, "guess", "admitted")
    frontends = [fleet.frontend_url, second_frontend]
    served_before = [_recover_starts(u) for u in frontends]
    answers, elapsed = _locust_flood(fleet, user, frontends, tmp_path, users=8)
    admitted, refused = answers.get("404", 0), answers.get("429", 0)
    assert set(answers) <= {"404", "429"}, answers  # no record: each admitted one was asked of the island
    # Both frontends sent the account to the same island replica, which
    # counted every admitted one (and the few Locust stopped waiting for).
    admitted_by = [after - b for after, b in zip(_decisions(islands, "guess", "admitted"), before)]
    counted = max(admitted_by)
    assert sorted(admitted_by) == [0] * (len(islands) - 1) + [counted]
    assert admitted <= counted <= admitted + 8
    # Within the limit, with the margin the design states: burst + rate x window.
    assert counted <= ACCOUNT_GUESS.most_in(elapsed)
    # And the flood did exceed it while it ran: past the burst, it was refused.
    assert admitted >= ACCOUNT_GUESS.burst - 8 and refused > admitted
    # Both frontends carried it.
    assert all(_recover_starts(u) - b > ACCOUNT_GUESS.burst for u, b in zip(frontends, served_before))


async def test_a_refused_guess_is_the_one_error_shape_with_its_wait_and_no_user(fleet):
    user = unique_user("refused")
    token = fleet.issuer().mint(user)
    answers, _ = await _flood([fleet.frontend_url], ops.RECOVER_START.path, token,
                              [_recover_start(fleet, i) for i in range(ACCOUNT_GUESS.burst + 10)])
    refused = [a for a in answers if a.status_code == 429]
    assert refused
    for a in refused:
        error = a.json()["error"]
        assert error["code"] == "rate_limited" and error["retryable"] is True
        assert error["retry_after"] >= 1 and a.headers["retry-after"] == str(error["retry_after"])
        assert user not in a.text


def _recover_starts(url: str) -> float:
    return _metric(url, "bkv_http_requests_total", service="frontend", operation=ops.RECOVER_START.path)


async def test_a_device_that_meets_a_429_waits_it_out_and_succeeds(fleet, make_client):
    user = unique_user("waits")
    token = fleet.issuer().mint(user)
    answers, _ = await _flood([fleet.frontend_url], ops.REGISTRATION_START.path, token,
                              [_registration_start(fleet) for _ in range(ACCOUNT_REGISTRATION.burst + 5)])
    assert any(a.status_code == 429 for a in answers)
    # Past its deadline the SDK says so, with the wait.
    with pytest.raises(errors.RateLimited) as limited:
        await make_client(user, backoff=Backoff(deadline_s=0.5)).register(BackupKey(os.urandom(32)), "pw")
    assert limited.value.retry_after >= 1
    # Within it, the SDK waits as told and goes on.
    recording = RecordingTransport()
    started = time.monotonic()
    key = BackupKey(os.urandom(32))
    await make_client(user, transport=recording).register(key, "the password")
    assert any(b'"rate_limited"' in answer for _, _, answer in recording.exchanges)
    assert time.monotonic() - started >= 0.9  # it waited (at least a second: the smallest Retry-After)
    assert (await make_client(user).recover("the password")).record_status == "reset"


class _FloodBetweenPhases(VaultClient):
    """A client that, right after its registration_start was answered, has the
    account's registration budget spent by a flood (another device of the same
    account, or a thief), then goes on to its registration_finish."""

    flood: callable

    async def _send(self, call):
        out = await super()._send(call)
        if call.path == ops.REGISTRATION_START.path and self.flood is not None:
            flood, self.flood = self.flood, None
            await flood()
        return out


async def test_an_operations_second_phase_is_never_refused_once_its_first_was_admitted(fleet):
    user = unique_user("phases")
    token = fleet.issuer().mint(user)
    refused = []

    async def flood() -> None:
        answers, _ = await _flood([fleet.frontend_url], ops.REGISTRATION_START.path, token,
                                  [_registration_start(fleet) for _ in range(ACCOUNT_REGISTRATION.burst + 5)])
        refused.extend(a for a in answers if a.status_code == 429)

    recording = RecordingTransport()
    client = _FloodBetweenPhases(fleet.frontend_url, base64.b64decode(fleet.fleet_params["fleet_public_key"]),
                                 user, token, transport=recording)
    client.flood = flood
    try:
        await client.register(BackupKey(os.urandom(32)), "the password")
    finally:
        await client.aclose()
    assert refused, "the flood spent the account's registration budget"
    finishes = [answer for path, _, answer in recording.exchanges if path == ops.REGISTRATION_FINISH.path]
    assert finishes and not any(b"rate_limited" in answer for answer in finishes)


@pytest.fixture(scope="module")
def tight_edge(fleet):
    """A second Envoy in front of the fleet's processor and frontend, with
    per-source limits low enough for a test to cross."""
    port, admin = _free_port(), _free_port()
    limits = SourceLimits(handshake=SourceLimit(1, 3), transport=SourceLimit(1, 3), bundle=SourceLimit(1, 3))
    config = fleet.state / "edge" / "envoy-tight.json"
    config.write_text(render("127.0.0.1", port, fleet.ports.frontend, fleet.ports.processor, admin, limits=limits))
    proc = Proc("envoy-tight", [_envoy_binary(), "-c", str(config), "--disable-hot-restart", "--log-level", "warn"],
                {}, port, f"http://127.0.0.1:{admin}/ready")
    Supervisor(fleet.state).start(proc)
    try:
        wait_until(lambda: httpx.get(proc.health, timeout=1.0).status_code == 200, 30, "the tight Envoy")
        yield f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}", limits
    finally:
        Supervisor.stop([proc])


def _bundle_requests(fleet) -> float:
    return _metric(fleet.frontend_url, "bkv_http_requests_total", service="frontend", operation="/v1/bundle")


async def test_per_source_limits_refuse_at_the_edge_and_the_frontend_never_sees_the_refused(fleet, tight_edge):
    edge, admin, limits = tight_edge
    before = _bundle_requests(fleet)
    async with httpx.AsyncClient(timeout=30) as http:
        start = time.monotonic()
        answers = await asyncio.gather(*(http.get(f"{edge}/v1/bundle") for _ in range(20)))
        elapsed = time.monotonic() - start
        handshakes = await asyncio.gather(*(http.post(f"{edge}/noise/handshake", content=os.urandom(96))
                                            for _ in range(20)))
    admitted = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code == 429]
    assert len(admitted) + len(refused) == len(answers)
    assert 1 <= len(admitted) <= limits.bundle.burst + limits.bundle.per_second * (int(elapsed) + 1)
    assert refused
    for a in refused:
        assert a.json() == {"error": {"code": "rate_limited", "retryable": True, "retry_after": 1,
                                      "message": a.json()["error"]["message"]}}
        assert a.headers["retry-after"] == "1"
    # The frontend served exactly the admitted ones: the refused never reached it.
    wait_until(lambda: _bundle_requests(fleet) - before == len(admitted), 5, "the frontend's count")
    assert _bundle_requests(fleet) - before == len(admitted)
    # Handshakes have their own budget; past it, refused before the processor runs.
    assert sum(h.status_code == 429 for h in handshakes) >= len(handshakes) - limits.handshake.burst - 2
    stats = httpx.get(f"{admin}/stats/prometheus", timeout=10).text
    assert re.search(r'envoy_http_local_rate_limit_rate_limited\{envoy_local_http_ratelimit_prefix='
                     r'"bkv_source_handshake"\} [1-9]', stats), "Envoy counts the refused handshakes"


async def test_a_device_waits_out_the_edges_429_and_then_succeeds(fleet, tight_edge):
    from bkv.transport import AsyncNoiseTransport
    from bkv_protocol.noise import StaticKey

    edge, _, _ = tight_edge
    async with httpx.AsyncClient(timeout=30) as http:  # spend this address's handshake budget
        await asyncio.gather(*(http.post(f"{edge}/noise/handshake", content=os.urandom(96)) for _ in range(10)))
    device = StaticKey.generate()
    user = unique_user("edge")
    transport = AsyncNoiseTransport(edge, base64.b64decode(fleet.edge_public_key), device)
    client = VaultClient(edge, base64.b64decode(fleet.fleet_params["fleet_public_key"]), user,
                         fleet.issuer().mint(user, device_key_b64=base64.b64encode(device.public).decode()), transport=transport)
    started = time.monotonic()
    try:
        with pytest.raises(errors.NoRecord):  # an answer from the vault: the SDK got through
            await client.recover("whatever")
    finally:
        await client.aclose()
    assert time.monotonic() - started >= 0.9  # after waiting out the edge's Retry-After (1 s)


async def test_over_the_sealed_routes_source_limit_a_device_gets_the_edges_429_and_waits_it_out(fleet, tight_edge):
    """The sealed route's own budget: Envoy's 429 reaches the device as the
    edge's word (not a 404 from the processor, which sees no request), and
    the SDK waits it out and gets the vault's answer."""
    from bkv.transport import AsyncNoiseTransport, EdgeRefused
    from bkv_protocol.noise import StaticKey

    edge, admin, limits = tight_edge
    device = StaticKey.generate()
    user = unique_user("edge-sealed")
    token = fleet.issuer().mint(user, device_key_b64=base64.b64encode(device.public).decode())
    transport = AsyncNoiseTransport(edge, base64.b64decode(fleet.edge_public_key), device)
    raw = httpx.AsyncClient(base_url=edge, transport=transport, headers={"authorization": f"Bearer {token}"},
                            timeout=30)
    refusals: list[EdgeRefused] = []
    try:
        # Open the session first: the handshake budget is the same address's (other tests spend it).
        deadline = time.monotonic() + 15
        while True:
            try:
                await raw.post(ops.RECOVER_START.path, json=_recover_start(fleet, 0))
                break
            except EdgeRefused as exc:
                assert time.monotonic() < deadline, "the handshake was never admitted"
                await asyncio.sleep(exc.retry_after_s)  # the edge's own Retry-After, as the SDK waits
        for i in range(limits.transport.burst + 5):  # the same session, sealed requests one after another
            try:
                await raw.post(ops.RECOVER_START.path, json=_recover_start(fleet, i))
            except EdgeRefused as exc:
                refusals.append(exc)
                break
    finally:
        await raw.aclose()
    assert refusals, "the sealed route's budget was never crossed"
    assert "429" in str(refusals[0]) and refusals[0].retry_after_s == 1.0
    stats = httpx.get(f"{admin}/stats/prometheus", timeout=10).text
    assert re.search(r'envoy_http_local_rate_limit_rate_limited\{envoy_local_http_ratelimit_prefix='
                     r'"bkv_source_transport"\} [1-9]', stats), "Envoy refused it, on the sealed route's budget"
    client = VaultClient(edge, base64.b64decode(fleet.fleet_params["fleet_public_key"]), user, token,
                         transport=AsyncNoiseTransport(edge, base64.b64decode(fleet.edge_public_key), device))
    try:
        with pytest.raises(errors.NoRecord):  # the vault's own answer: the SDK waited and got through
            await client.recover("whatever")
    finally:
        await client.aclose()
