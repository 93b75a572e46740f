"""The Noise transport through real Envoy and the real processor, in front
of the real fleet."""

from __future__ import annotations

import base64
import os

import httpx
import pytest

from bkv import errors
from bkv.sdk import VaultClient
from bkv.transport import AsyncNoiseTransport
from bkv_protocol.encoding import b64d
from bkv_protocol.secrets import BackupKey
from bkv_protocol.noise import StaticKey
from conftest import RecordingTransport, read_entry, unique_user
from support import procs

PW = "noise is not a password"


def frontend_requests(fleet) -> float:
    text = httpx.get(f"{fleet.frontend_url}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("bkv_http_requests_total{") and 'operation="/v1/' in line)


@pytest.fixture
async def noise_client(fleet):
    made = []

    def make(user: str, *, device: StaticKey | None = None, token_device: StaticKey | None = None,
             edge_public: bytes | None = None, record: bool = False) -> VaultClient:
        device = device or StaticKey.generate()
        bound = token_device or device
        token = fleet.issuer().mint(user, device_key_b64=base64.b64encode(bound.public).decode())
        transport = AsyncNoiseTransport(fleet.edge_url, edge_public or b64d(fleet.edge_public_key), device)
        if record:
            transport._http = RecordingTransport()  # see the outer (encrypted) exchanges
        c = VaultClient(fleet.edge_url, b64d(fleet.fleet_params["fleet_public_key"]), user, token,
                        transport=transport)
        c.noise = transport
        made.append(c)
        return c

    yield make
    for c in made:
        await c.aclose()


async def test_register_and_recover_through_envoy_and_noise(noise_client):
    user, k = unique_user("noise"), BackupKey(os.urandom(32))
    await noise_client(user).register(k, PW)
    assert (await noise_client(user).recover(PW)).key == k  # a new device: a new handshake


async def test_a_client_with_a_wrong_pinned_key_aborts_before_sending_any_request(noise_client, fleet):
    before = frontend_requests(fleet)
    client = noise_client(unique_user("noise"), edge_public=StaticKey.generate().public, record=True)
    with pytest.raises(errors.BadSignature, match="Noise edge"):
        await client.register(BackupKey(os.urandom(32)), PW)
    paths = [e[0] for e in client.noise._http.exchanges]
    assert paths == ["/noise/handshake"]  # only the handshake left the device
    assert frontend_requests(fleet) == before


async def test_a_replayed_message_changes_nothing(noise_client, fleet, etcd):
    user = unique_user("noise")
    await noise_client(user).register(BackupKey(os.urandom(32)), PW)
    client = noise_client(user, record=True)
    with pytest.raises(errors.WrongPassword) as wrong:
        await client.recover("wrong")
    assert wrong.value.attempts_left == 9
    path, body, _ = [e for e in client.noise._http.exchanges if e[0] == "/noise/v1"][0]  # the recovery start
    before = await read_entry(etcd, fleet, user)
    replay = httpx.post(fleet.edge_url + "/noise/v1", content=body,
                        headers={"content-type": "application/octet-stream"})
    assert replay.status_code == 400 and replay.json()["error"]["code"] == "noise_bad_message"
    assert await read_entry(etcd, fleet, user) == before  # no extra decrement
    with pytest.raises(errors.WrongPassword) as again:
        await noise_client(user).recover("wrong")
    assert again.value.attempts_left == 8


async def test_tampered_ciphertext_is_rejected_and_closes_the_session(noise_client, fleet):
    user = unique_user("noise")
    client = noise_client(user, record=True)
    await client.fleet()  # opens the session
    session = client.noise._session
    body = bytearray(session.session_id + session.seal_request(999, "/v1/fleet", "", b""))
    body[-1] ^= 1
    headers = {"content-type": "application/octet-stream"}
    bad = httpx.post(fleet.edge_url + "/noise/v1", content=bytes(body), headers=headers)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "noise_bad_message"
    good = httpx.post(fleet.edge_url + "/noise/v1",
                      content=session.session_id + session.seal_request(1000, "/v1/fleet", "", b""), headers=headers)
    assert good.status_code == 401 and good.json()["error"]["code"] == "noise_session_unknown"


async def test_a_token_for_one_device_is_refused_over_another_devices_session(noise_client):
    user = unique_user("noise")
    with pytest.raises(errors.Unauthorized):
        await noise_client(user, token_device=StaticKey.generate()).register(BackupKey(os.urandom(32)), PW)


async def test_a_client_supplied_device_header_never_reaches_the_frontend(noise_client, fleet):
    """The token names a forged device key and the outer request carries that
    key in the header: the processor replaces it with the session's real key."""
    user, forged = unique_user("noise"), StaticKey.generate()
    client = noise_client(user, token_device=forged)
    forged_b64 = base64.b64encode(forged.public).decode()
    client.noise._http = _AddHeader(client.noise._http, "x-bkv-device-key", forged_b64)
    with pytest.raises(errors.Unauthorized):
        await client.register(BackupKey(os.urandom(32)), PW)


class _AddHeader(httpx.AsyncBaseTransport):
    def __init__(self, inner, key, value):
        self._inner, self._key, self._value = inner, key, value

    async def handle_async_request(self, request):
        # Two copies: every copy must go, not only the first.
        request.headers = httpx.Headers(request.headers.multi_items() + [(self._key, self._value)] * 2)
        return await self._inner.handle_async_request(request)

    async def aclose(self):
        await self._inner.aclose()


def test_nothing_in_clear_passes_envoy(fleet):
    for method, path in (("POST", "/v1/recover/start"), ("GET", "/v1/fleet"), ("GET", "/healthz"),
                         ("GET", "/noise/v1"), ("PUT", "/noise/handshake"), ("POST", "/v1/bundle")):
        resp = httpx.request(method, fleet.edge_url + path, json={} if method == "POST" else None)
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"


def _listeners() -> dict[int, str]:
    """Listening port -> address, IPv4 and IPv6 (grpcio listens on an IPv6
    socket with the v4-mapped address ::ffff:127.0.0.1)."""
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state != "0A":  # LISTEN
                continue
            ip_hex, port_hex = local.split(":")
            if len(ip_hex) == 32:  # IPv6: four little-endian 32-bit words
                raw = b"".join(bytes.fromhex(ip_hex[i:i + 8])[::-1] for i in range(0, 32, 8))
                ip = ".".join(map(str, raw[12:])) if raw[:12] == b"\0" * 10 + b"\xff\xff" else raw.hex()
            else:
                ip = ".".join(str(int(ip_hex[i:i + 2], 16)) for i in (6, 4, 2, 0))
            out[int(port_hex, 16)] = ip
    return out


def test_the_frontend_and_the_processor_listen_on_loopback_only(fleet):
    listening = _listeners()
    for name in ("frontend", "noise-processor"):
        assert listening[fleet.procs[name].port] == "127.0.0.1", name
    assert listening[fleet.ports.envoy_admin] == "127.0.0.1"


def test_the_rendered_envoy_config_validates_with_envoy_itself(fleet):
    from bkv_dev.fleet import _envoy_binary

    res = procs.run([_envoy_binary(), "--mode", "validate", "-c", str(fleet.state / "edge" / "envoy.json")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "OK" in res.stdout + res.stderr


def test_envoy_exposes_its_own_prometheus_stats(fleet):
    text = httpx.get(f"http://127.0.0.1:{fleet.ports.envoy_admin}/stats/prometheus").text
    assert "envoy_http_downstream_rq_total" in text


# -- what an observer on the network sees of an answer (security issue #15) --------------
# Only these headers leave Envoy on a sealed answer: the processor removes every
# other upstream header (content-length too: every sealed answer goes out
# chunked, a bodiless one as well), and Envoy adds only its date and its
# constant server name.
OUTER_ALLOWED = {"content-type", "transfer-encoding", "date", "server"}


async def _session(noise_client):
    client = noise_client(unique_user("noise"))
    await client.fleet()  # opens the session
    return client.noise._session


def _sealed_post(fleet, session, counter: int, path: str, auth: str = "", body: bytes = b"") -> httpx.Response:
    return httpx.post(fleet.edge_url + "/noise/v1", content=session.session_id + session.seal_request(
        counter, path, auth, body), headers={"content-type": "application/octet-stream"})


def _assert_outer_is_bare(resp: httpx.Response) -> None:
    assert resp.status_code == 200
    assert set(resp.headers.keys()) <= OUTER_ALLOWED, resp.headers
    assert resp.headers["content-type"] == "application/octet-stream"
    assert resp.headers["transfer-encoding"] == "chunked"
    assert resp.headers.get("server", "envoy") == "envoy"
    assert len(resp.content) in (2048 + 16, 8192 + 16, 32768 + 16)


@pytest.mark.parametrize("path,auth,inner_status,upstream_header", [
    ("/v1/fleet", "", 200, None),  # a vault answer
    ("/v1/fleet/", "", 307, "location"),  # a trailing slash: a bare redirect
    ("/v1/no/such/call", "", 404, None),
    ("/v1/recover/start", "Bearer not-a-token", 401, "www-authenticate"),
])
async def test_a_sealed_answer_leaves_envoy_with_only_the_allow_listed_headers(
        noise_client, fleet, path, auth, inner_status, upstream_header):
    session = await _session(noise_client)
    resp = _sealed_post(fleet, session, 100, path, auth, b"{}")
    _assert_outer_is_bare(resp)
    status, body = session.open_response(100, resp.content)
    assert status == inner_status, body
    if upstream_header:  # the frontend did say it: inside the seal its effect is the status
        assert upstream_header not in resp.headers


async def test_an_upstream_answer_without_a_body_arrives_sealed(noise_client, fleet):
    """FastAPI's redirect for a trailing slash is a 307 with no body: no body
    phase reaches the processor, which seals the status at the headers."""
    session = await _session(noise_client)
    resp = _sealed_post(fleet, session, 200, "/v1/fleet/")
    _assert_outer_is_bare(resp)
    assert session.open_response(200, resp.content) == (307, b"")


async def test_no_record_and_a_live_record_answer_a_recovery_start_with_the_same_outer_size(noise_client):
    """In clear the two answers are ~100 and ~970 bytes: an observer would
    know whether an account has a key escrowed. Padded, both are one rung."""
    live = unique_user("noise")
    await noise_client(live).register(BackupKey(os.urandom(32)), PW)
    with_record, without = noise_client(live, record=True), noise_client(unique_user("noise"), record=True)
    await with_record.recover(PW)
    with pytest.raises(errors.NoRecord):
        await without.recover(PW)

    def recover_start(client) -> bytes:
        return [e for e in client.noise._http.exchanges if e[0] == "/noise/v1"][0][2]

    assert len(recover_start(with_record)) == len(recover_start(without)) == 2048 + 16
