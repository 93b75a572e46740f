"""The Noise processor: a gRPC service implementing Envoy's HTTP ``ext_proc``.

Per HTTP stream Envoy sends us the request headers, the buffered request
body, the response headers and the buffered response body. We

* answer ``POST /noise/handshake`` ourselves (an immediate response),
* on ``POST /noise/v1`` decrypt the body, rewrite path, authorization and
  body to the inner request, and set ``x-bkv-device-key`` to the session's
  authenticated device key (any client-supplied copy is removed first),
* seal the frontend's answer (status and body) for the same session,
* pass ``GET /v1/bundle`` through in clear: the validation bundle is public
  and signed by two roots, and a client needs it to learn the edge key it
  opens Noise with (docs/ota.md),
* refuse everything else with a 404, so nothing else reaches the frontend in clear.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections import OrderedDict
from typing import AsyncIterator

from envoy_data_plane.envoy.config.core.v3 import HeaderValue, HeaderValueOption
from envoy_data_plane.envoy.service.ext_proc.v3 import (
    BodyMutation,
    BodyResponse,
    CommonResponse,
    ExternalProcessorBase,
    HeaderMutation,
    HeadersResponse,
    ImmediateResponse,
    ProcessingRequest,
    ProcessingResponse,
)
from envoy_data_plane.envoy.type.v3 import HttpStatus, StatusCode

from bkv_common import metrics
from bkv_edge.errors import BadMessage, EdgeError, NotNoise, UnknownSession
from bkv_edge.noise import Session, StaticKey, respond

log = logging.getLogger(__name__)

DEVICE_HEADER = "x-bkv-device-key"
SESSION_HEADER = "x-bkv-noise-session"
HANDSHAKE_PATH = "/noise/handshake"
TRANSPORT_PATH = "/noise/v1"
BUNDLE_PATH = "/v1/bundle"


class Sessions:
    """Bounded, expiring session table (oldest dropped first)."""

    def __init__(self, max_sessions: int = 100_000, ttl_s: float = 3600.0) -> None:
        self._by_id: OrderedDict[bytes, Session] = OrderedDict()
        self._max = max_sessions
        self._ttl = ttl_s

    def add(self, s: Session) -> None:
        self._by_id[s.session_id] = s
        while len(self._by_id) > self._max:
            self._by_id.popitem(last=False)

    def get(self, session_id: bytes) -> Session:
        s = self._by_id.get(session_id)
        if s is None or time.monotonic() - s.created > self._ttl:
            self._by_id.pop(session_id, None)
            raise UnknownSession("unknown or expired Noise session: handshake again")
        return s

    def close(self, session_id: bytes) -> None:
        self._by_id.pop(session_id, None)


def _header(key: str, value: str | bytes) -> HeaderValueOption:
    raw = value if isinstance(value, bytes) else value.encode()
    return HeaderValueOption(header=HeaderValue(key=key, raw_value=raw))


def _immediate(status: int, body: bytes, content_type: str = "application/json") -> ProcessingResponse:
    return ProcessingResponse(immediate_response=ImmediateResponse(
        status=HttpStatus(code=StatusCode(status)), body=body,
        headers=HeaderMutation(set_headers=[_header("content-type", content_type)])))


def _error(exc: EdgeError) -> ProcessingResponse:
    body = json.dumps({"error": {"code": exc.code, "message": str(exc), "retryable": False}}).encode()
    return _immediate(exc.status, body)


class NoiseProcessor(ExternalProcessorBase):
    def __init__(self, edge_key: StaticKey, sessions: Sessions | None = None) -> None:
        self._key = edge_key
        self.sessions = sessions or Sessions()

    async def process(self, messages: AsyncIterator[ProcessingRequest]) -> AsyncIterator[ProcessingResponse]:
        path = ""
        session: Session | None = None
        counter = 0
        status = 200
        plain = False  # GET /v1/bundle: passed through unchanged
        async for msg in messages:
            try:
                if msg.request_headers is not None:
                    headers = {h.key: (h.raw_value or h.value.encode()).decode("latin-1")
                               for h in msg.request_headers.headers.headers}
                    path, method = headers.get(":path", ""), headers.get(":method", "")
                    if method == "GET" and path == BUNDLE_PATH:
                        plain = True
                        yield ProcessingResponse(request_headers=HeadersResponse(response=CommonResponse(
                            header_mutation=HeaderMutation(remove_headers=[DEVICE_HEADER, "authorization"]))))
                        continue
                    if method != "POST" or path not in (HANDSHAKE_PATH, TRANSPORT_PATH):
                        raise NotNoise("only POST /noise/handshake and POST /noise/v1 are served here")
                    if path == TRANSPORT_PATH:
                        try:
                            session = self.sessions.get(bytes.fromhex(headers.get(SESSION_HEADER, "")))
                        except ValueError:
                            raise UnknownSession("missing or malformed session id") from None
                    yield ProcessingResponse(request_headers=HeadersResponse(response=CommonResponse(
                        header_mutation=HeaderMutation(remove_headers=[DEVICE_HEADER]))))
                elif msg.request_body is not None:
                    body = msg.request_body.body
                    if path == HANDSHAKE_PATH:
                        new, message2 = respond(self._key, body)
                        self.sessions.add(new)
                        metrics.NOISE_HANDSHAKES.inc()
                        yield _immediate(200, new.session_id + message2, "application/octet-stream")
                        return
                    assert session is not None
                    try:
                        counter, inner_path, auth, payload = session.open_request(body)
                    except BadMessage:
                        self.sessions.close(session.session_id)  # tampering ends the session
                        raise
                    mutation = HeaderMutation(
                        set_headers=[_header(":path", inner_path), _header("authorization", auth),
                                     _header("content-type", "application/json"),
                                     _header("content-length", str(len(payload))),
                                     _header(DEVICE_HEADER, base64.b64encode(session.peer_static))],
                        remove_headers=[SESSION_HEADER])
                    yield ProcessingResponse(request_body=BodyResponse(response=CommonResponse(
                        header_mutation=mutation, body_mutation=BodyMutation(body=payload),
                        clear_route_cache=True)))
                elif plain and msg.response_headers is not None:
                    yield ProcessingResponse(response_headers=HeadersResponse())
                elif plain and msg.response_body is not None:
                    yield ProcessingResponse(response_body=BodyResponse())
                elif msg.response_headers is not None:
                    for h in msg.response_headers.headers.headers:
                        if h.key == ":status":
                            status = int((h.raw_value or h.value.encode()).decode())
                    yield ProcessingResponse(response_headers=HeadersResponse(response=CommonResponse(
                        header_mutation=HeaderMutation(set_headers=[
                            _header(":status", "200"), _header("content-type", "application/octet-stream")]))))
                elif msg.response_body is not None:
                    assert session is not None
                    sealed = session.seal_response(counter, status, msg.response_body.body)
                    yield ProcessingResponse(response_body=BodyResponse(response=CommonResponse(
                        header_mutation=HeaderMutation(set_headers=[_header("content-length", str(len(sealed)))]),
                        body_mutation=BodyMutation(body=sealed))))
                else:
                    yield ProcessingResponse()
            except EdgeError as exc:
                metrics.NOISE_REJECTIONS.labels(exc.code).inc()
                yield _error(exc)
                return


async def serve(edge_key: StaticKey, host: str, port: int) -> None:
    from grpclib.server import Server

    server = Server([NoiseProcessor(edge_key)])
    await server.start(host, port)
    log.info("noise processor on %s:%d", host, port)
    await server.wait_closed()
