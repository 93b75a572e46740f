"""The Noise processor: a gRPC service implementing Envoy's HTTP ``ext_proc``.

Envoy routes by path (bkv_edge/envoy.py) and tells us, in the gRPC stream's
initial metadata (``x-bkv-edge-route``), which of the two Noise routes a
stream belongs to; everything else is answered by Envoy itself (a 404, or
``GET /v1/bundle`` passed in clear with the processor disabled). Per HTTP
stream we then do only what we must:

* the request headers: answered with a constant, never read (Envoy sends
  them only so that it holds them back until we have seen the body);
* ``handshake``: the buffered request body (IK message 1), answered by us
  with an immediate response (session id and IK message 2);
* ``transport``: the buffered request body -- ``session_id | sealed`` --
  which we open and turn into the inner request (path, authorization, body,
  and ``x-bkv-device-key`` set to the session's authenticated device key,
  overwriting any client-supplied copy); the response headers, whose status
  we keep and replace with 200; and the buffered response body, which we
  seal with that status for the same session.

Messages are encoded by hand (bkv_edge/extproc.py) and served by grpcio's
C core; why: docs/performance.md, "Optimisation log".
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections import OrderedDict
from typing import AsyncIterator, Iterable

from bkv_common import metrics
from bkv_edge import extproc
from bkv_edge.errors import BadMessage, EdgeError, NotNoise, UnknownSession
from bkv_edge.extproc import Phase
from bkv_edge.noise import SESSION_ID_LEN, Session, StaticKey, respond

log = logging.getLogger(__name__)

DEVICE_HEADER = "x-bkv-device-key"
ROUTE_METADATA = "x-bkv-edge-route"  # set per route by Envoy (bkv_edge/envoy.py)
HANDSHAKE, TRANSPORT = "handshake", "transport"
SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"


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


def _error(exc: EdgeError) -> bytes:
    body = json.dumps({"error": {"code": exc.code, "message": str(exc), "retryable": False}}).encode()
    return extproc.immediate_response(exc.status, body, "application/json")


_CONTINUE_REQUEST_HEADERS = extproc.headers_response(extproc.REQUEST_HEADERS)
_SEALED_HEADERS = extproc.header_mutation({":status": b"200", "content-type": b"application/octet-stream"})


class Exchange:
    """One HTTP request through the edge: feed it each ext_proc message in
    order; it returns the answer and whether the stream is finished."""

    def __init__(self, processor: NoiseProcessor, route: str) -> None:
        self._p = processor
        self._route = route
        self._session: Session | None = None
        self._counter = 0
        self._status = 200

    def on(self, phase: Phase) -> tuple[bytes, bool]:
        try:
            if phase.kind == extproc.REQUEST_HEADERS and self._route in (HANDSHAKE, TRANSPORT):
                return _CONTINUE_REQUEST_HEADERS, False  # held by Envoy until we have the body
            if self._route == HANDSHAKE and phase.kind == extproc.REQUEST_BODY:
                return self._handshake(phase.body), True
            if self._route == TRANSPORT:
                if phase.kind == extproc.REQUEST_BODY:
                    return self._open(phase.body), False
                if phase.kind == extproc.RESPONSE_HEADERS:
                    self._status = phase.status  # sealed with the body, replaced by 200 outside
                    return extproc.headers_response(phase.kind, _SEALED_HEADERS), False
                if phase.kind == extproc.RESPONSE_BODY:
                    return self._seal(phase.body), True
            # Envoy sends nothing else in the modes it is configured with; refuse
            # rather than pass anything through that we did not look at.
            raise NotNoise("only POST /noise/handshake and POST /noise/v1 are served here")
        except EdgeError as exc:
            metrics.NOISE_REJECTIONS.labels(exc.code).inc()
            return _error(exc), True

    def _handshake(self, message1: bytes) -> bytes:
        new, message2 = respond(self._p.key, message1)
        self._p.sessions.add(new)
        metrics.NOISE_HANDSHAKES.inc()
        return extproc.immediate_response(200, new.session_id + message2, "application/octet-stream")

    def _open(self, body: bytes) -> bytes:
        if len(body) <= SESSION_ID_LEN:
            raise UnknownSession("missing session id")
        session = self._session = self._p.sessions.get(body[:SESSION_ID_LEN])
        try:
            self._counter, path, auth, payload = session.open_request(body[SESSION_ID_LEN:])
        except BadMessage:
            self._p.sessions.close(session.session_id)  # tampering ends the session
            raise
        # Every client-supplied copy of the device header goes (Envoy removes before it sets), then ours.
        headers = extproc.header_mutation(
            {":path": path.encode(), "authorization": auth.encode(), "content-type": b"application/json",
             "content-length": str(len(payload)).encode(), DEVICE_HEADER: base64.b64encode(session.peer_static)},
            remove=(DEVICE_HEADER,))
        return extproc.body_response(extproc.REQUEST_BODY, payload, headers)

    def _seal(self, body: bytes) -> bytes:
        assert self._session is not None
        sealed = self._session.seal_response(self._counter, self._status, body)
        return extproc.body_response(extproc.RESPONSE_BODY, sealed, extproc.header_mutation(
            {"content-length": str(len(sealed)).encode()}))


class NoiseProcessor:
    def __init__(self, edge_key: StaticKey, sessions: Sessions | None = None) -> None:
        self.key = edge_key
        self.sessions = sessions or Sessions()

    async def process(self, messages: AsyncIterator[bytes], route: str) -> AsyncIterator[bytes]:
        exchange = Exchange(self, route)
        async for raw in messages:
            try:
                phase = extproc.decode_request(raw)
            except BadMessage as exc:
                yield _error(exc)
                return
            answer, done = exchange.on(phase)
            yield answer
            if done:
                return


def route_of(metadata: Iterable[tuple[str, str | bytes]]) -> str:
    for key, value in metadata:
        if key == ROUTE_METADATA:
            return value if isinstance(value, str) else value.decode()
    return ""


async def serve(edge_key: StaticKey, host: str, port: int) -> None:
    import grpc

    processor = NoiseProcessor(edge_key)

    async def handler(requests, context):
        async for answer in processor.process(requests, route_of(context.invocation_metadata() or ())):
            yield answer

    # No (de)serializers: the handler gets and returns raw protobuf bytes (bkv_edge/extproc.py).
    rpc = grpc.stream_stream_rpc_method_handler(handler)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Process": rpc}),))
    if not server.add_insecure_port(f"{host}:{port}"):
        raise OSError(f"cannot listen on {host}:{port}")
    await server.start()
    log.info("noise processor on %s:%d", host, port)
    await server.wait_for_termination()
