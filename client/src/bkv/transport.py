"""The client end of the Noise edge: httpx transports (async and blocking)
that do the IK handshake against the pinned edge key, then seal each
request and open each answer. The SDK uses them by default; plain HTTP is
only for a dev fleet started with ``--plaintext``.

A wrong pinned key fails at the handshake, before any request is sent: the
first handshake message carries no application data.

Only what opens under the session's key is the vault's answer. Anything in
clear -- the edge's own refusals, and whatever someone on the path forges --
is a transport failure (:class:`EdgeRefused`, an ``httpx.TransportError``),
never a vault outcome: the SDK sends the same request again, which the vault
answers from what it committed (docs/protocol.md, "Resends").
"""

from __future__ import annotations

import functools
import itertools
import ssl
import threading

import httpx

from bkv_protocol.noise import HandshakeFailed
from bkv_protocol.noise import SESSION_ID_LEN, Initiator, Session, StaticKey

HANDSHAKE = "/noise/handshake"
TRANSPORT = "/noise/v1"
_OCTETS = {"content-type": "application/octet-stream"}


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One verifying TLS context per process, shared by every client: httpx
    builds a new one (loading the CA bundle, ~20 ms of CPU) for each client
    and transport otherwise, which a device recovering once would not notice
    but a load generator does. Used only for https URLs; the Noise edge
    itself speaks plain HTTP and needs no TLS."""
    return httpx.create_ssl_context()


class NoiseError(Exception):
    """The edge could not be authenticated at the handshake. Never retried:
    it means a wrong pinned key or someone in the middle."""


class EdgeRefused(httpx.TransportError):
    """A clear answer outside the seal (the edge's refusal, or a forgery), or
    a sealed one that did not open: no word from the vault. Carries only the
    outer status, never the clear body's claims; on a 429 (the edge's
    per-source limit) the clear Retry-After too, as ``retry_after_s``, capped
    at EDGE_WAIT_CAP_S: whoever forged it could as well drop the request."""

    retry_after_s: float | None = None


# The longest clear Retry-After the SDK honours from the edge (unauthenticated).
EDGE_WAIT_CAP_S = 30.0


def _refused(message: str, answer: httpx.Response, **kwargs) -> EdgeRefused:
    exc = EdgeRefused(message, **kwargs)
    if answer.status_code == 429:
        try:
            exc.retry_after_s = min(EDGE_WAIT_CAP_S, max(0.0, float(answer.headers.get("retry-after", "1"))))
        except ValueError:
            exc.retry_after_s = 1.0
    return exc


def _sealed(request: httpx.Request, session: Session, counter: int) -> bytes:
    if request.method not in ("POST", "GET", "DELETE"):
        raise NoiseError(f"{request.method} is not carried over Noise")
    path = request.url.raw_path.decode()
    # Over Noise every call is a POST: reads and deletes have POST twins (docs/edge.md).
    path = {("GET", "/v1/fleet"): "/v1/fleet", ("DELETE", "/v1/record"): "/v1/record/delete"}.get(
        (request.method, path), path)
    return session.seal_request(counter, path, request.headers.get("authorization", ""), request.content)


def _inner_response(session: Session, counter: int, answer: httpx.Response, content: bytes,
                    request) -> httpx.Response:
    if answer.status_code != 200:
        raise _refused(f"the edge answered {answer.status_code} in clear (not the vault's word)", answer,
                       request=request)
    try:
        status, body = session.open_response(counter, content)
    except Exception as exc:  # noqa: BLE001 - garbled on the way, or forged: no answer at all
        raise EdgeRefused("the edge's answer did not open under the session key", request=request) from exc
    return httpx.Response(status, content=body, headers={"content-type": "application/json"}, request=request)


class _Base:
    def __init__(self, base_url: str, edge_public: bytes, device_key: StaticKey) -> None:
        self._base = base_url.rstrip("/")
        self._edge = edge_public
        self._device = device_key
        self._session: Session | None = None
        self._counter = itertools.count()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._base}, device_key=(redacted))"

    def _handshake_request(self) -> tuple[Initiator, httpx.Request]:
        initiator = Initiator(self._device, self._edge)
        return initiator, httpx.Request("POST", self._base + HANDSHAKE, content=initiator.first_message(),
                                        headers=_OCTETS)

    def _outer_request(self, request: httpx.Request, session: Session, counter: int) -> httpx.Request:
        # The session id leads the body: the edge reads only bodies (docs/edge.md).
        return httpx.Request("POST", self._base + TRANSPORT,
                             content=session.session_id + _sealed(request, session, counter), headers=_OCTETS)

    def _start(self, answer: httpx.Response, initiator: Initiator) -> Session:
        if answer.status_code == 400:
            # What the edge answers a first message made for another key: most
            # likely a wrong pinned key. Not retried; it changes nothing on the
            # device either way (forged or not, it is no vault outcome).
            raise NoiseError("the edge refused the handshake (400): is the pinned edge key right?")
        if answer.status_code != 200:
            raise _refused(f"the edge refused the handshake ({answer.status_code})", answer)
        if len(answer.content) <= SESSION_ID_LEN:
            raise NoiseError("the edge's handshake answer is too short")
        try:
            session = initiator.finish(answer.content[:SESSION_ID_LEN], answer.content[SESSION_ID_LEN:])
        except HandshakeFailed as exc:
            raise NoiseError(str(exc)) from exc
        self._counter = itertools.count()
        return session

    def _forget_closed(self, session: Session, outer_status: int) -> None:
        # The edge closes a session on a message it refuses (400): start a new one next time.
        if outer_status == 400 and self._session is session:
            self._session = None


class AsyncNoiseTransport(_Base, httpx.AsyncBaseTransport):
    def __init__(self, base_url: str, edge_public: bytes, device_key: StaticKey) -> None:
        super().__init__(base_url, edge_public, device_key)
        self._http = httpx.AsyncHTTPTransport(verify=tls_context())

    async def _ensure_session(self) -> Session:
        if self._session is None:
            initiator, req = self._handshake_request()
            answer = await self._http.handle_async_request(req)
            await answer.aread()
            self._session = self._start(answer, initiator)
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        for attempt in range(2):
            session = await self._ensure_session()
            counter = next(self._counter)
            answer = await self._http.handle_async_request(self._outer_request(request, session, counter))
            content = await answer.aread()
            if answer.status_code == 401 and attempt == 0:
                # The edge forgot us (restart, expiry) -- or someone says so: one new
                # handshake and the same request again, which the vault answers from its commit.
                self._session = None
                continue
            self._forget_closed(session, answer.status_code)
            return _inner_response(session, counter, answer, content, request)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await self._http.aclose()


class NoiseTransport(_Base, httpx.BaseTransport):
    """Blocking twin (Locust, scripts)."""

    def __init__(self, base_url: str, edge_public: bytes, device_key: StaticKey) -> None:
        super().__init__(base_url, edge_public, device_key)
        self._http = httpx.HTTPTransport(verify=tls_context())
        self._lock = threading.Lock()

    def _session_sync(self) -> Session:
        with self._lock:
            if self._session is None:
                initiator, req = self._handshake_request()
                answer = self._http.handle_request(req)
                answer.read()
                self._session = self._start(answer, initiator)
            return self._session

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for attempt in range(2):
            session = self._session_sync()
            counter = next(self._counter)
            answer = self._http.handle_request(self._outer_request(request, session, counter))
            content = answer.read()
            if answer.status_code == 401 and attempt == 0:
                self._session = None
                continue
            self._forget_closed(session, answer.status_code)
            return _inner_response(session, counter, answer, content, request)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._http.close()
