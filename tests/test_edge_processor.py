"""The Noise processor (services/edge/noise-processor, Go) as a real process,
spoken to over gRPC the way Envoy does, with Envoy's generated ext_proc
classes (envoy-data-plane) on our side: every message it reads and writes is
checked against the protobuf definitions, and its per-request logic without
Envoy in between. The whole path through Envoy is tests/test_edge_noise.py."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import socket
import struct
import sys
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from envoy_data_plane.envoy.config.core.v3 import HeaderMap, HeaderValue
from envoy_data_plane.envoy.service.ext_proc.v3 import (
    HttpBody,
    HttpHeaders,
    ProcessingRequest,
    ProcessingResponse,
    ProtocolConfiguration,
)

from bkv_dev.fleet import _processor_binary, wait_until
from bkv_protocol.noise import BadMessage, HandshakeFailed
from bkv_protocol.noise import SESSION_ID_LEN, Initiator, Session, StaticKey
from support import procs

METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
REQUEST_HEADERS = ProcessingRequest(request_headers=HttpHeaders(headers=HeaderMap(headers=[
    HeaderValue(key=":path", raw_value=b"/noise/v1"), HeaderValue(key="x-bkv-device-key", raw_value=b"forged")])))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processor:
    def __init__(self, tmp: Path, *flags: str) -> None:
        self.key = StaticKey.generate()
        key_file = tmp / "edge.key"
        key_file.write_bytes(base64.b64encode(self.key.reveal()) + b"\n")
        self.port, self.metrics_port = _port(), _port()
        self.proc = procs.spawn([_processor_binary(), "serve", "--listen", f"127.0.0.1:{self.port}",
                                      "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
                                      "--key-file", str(key_file), *flags], stderr=sys.stderr)
        wait_until(lambda: httpx.get(self.metrics_url).status_code == 200, 30, "the processor's metrics")
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self._process = self.channel.stream_stream(METHOD)  # raw bytes both ways

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def stream(self, route: str | None, *messages: ProcessingRequest | bytes) -> list[ProcessingResponse]:
        """One HTTP request's ext_proc stream: every answer, parsed."""
        raw = [m if isinstance(m, bytes) else bytes(m) for m in messages]
        metadata = [("x-bkv-edge-route", route)] if route else []
        return [ProcessingResponse().parse(a) for a in self._process(iter(raw), metadata=metadata, timeout=10)]

    def handshake(self, device: StaticKey | None = None) -> Session:
        initiator = Initiator(device or StaticKey.generate(), self.key.public)
        first, answer = self.stream("handshake", REQUEST_HEADERS,
                                    ProcessingRequest(request_body=HttpBody(body=initiator.first_message(),
                                                                            end_of_stream=True)))
        assert first.is_set("request_headers") and not bytes(first.request_headers)  # a bare CONTINUE
        imm = answer.immediate_response
        assert imm.status.code.value == 200, imm.body
        return initiator.finish(imm.body[:SESSION_ID_LEN], imm.body[SESSION_ID_LEN:])

    def transport(self, body: bytes, status_header: HeaderValue | None = None,
                  answer: bytes | None = b"", headers: list[HeaderValue] = ()) -> list[ProcessingResponse]:
        """``answer=None``: the upstream answer has no body, so its headers
        end the stream and no body phase follows (as Envoy does)."""
        status_header = status_header or HeaderValue(key=":status", raw_value=b"200")
        response_headers = ProcessingRequest(response_headers=HttpHeaders(headers=HeaderMap(headers=[
            HeaderValue(key="content-type", raw_value=b"application/json"), status_header, *headers]),
            end_of_stream=answer is None))
        tail = [] if answer is None else [ProcessingRequest(response_body=HttpBody(body=answer, end_of_stream=True))]
        return self.stream("transport", REQUEST_HEADERS,
                           ProcessingRequest(request_body=HttpBody(body=body, end_of_stream=True),
                                             protocol_config=ProtocolConfiguration()),
                           response_headers, *tail)

    def close(self) -> None:
        self.channel.close()
        procs.stop(self.proc)


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    p = Processor(tmp_path_factory.mktemp("processor"))
    yield p
    p.close()


def _refusal(answer: ProcessingResponse) -> tuple[int, str]:
    imm = answer.immediate_response
    return imm.status.code.value, json.loads(imm.body)["error"]["code"]


def _set_headers(mutation) -> dict[str, bytes]:
    assert all(h.append_action.name == "OVERWRITE_IF_EXISTS_OR_ADD" for h in mutation.set_headers)
    return {h.header.key: h.header.raw_value for h in mutation.set_headers}


def test_a_transport_request_opens_to_the_inner_request_and_its_answer_is_sealed_with_the_inner_status(processor):
    device = StaticKey.generate()
    session = processor.handshake(device)
    body = session.session_id + session.seal_request(7, "/v1/recover/start", "Bearer t", b'{"a":1}')
    headers, request, response_headers, response_body = processor.transport(
        body, HeaderValue(key=":status", raw_value=b"403"), b'{"error":{}}')

    assert headers.is_set("request_headers")
    common = request.request_body.response
    assert common.body_mutation.body == b'{"a":1}'
    inner = _set_headers(common.header_mutation)
    assert inner[":path"] == b"/v1/recover/start" and inner["authorization"] == b"Bearer t"
    assert inner["content-length"] == b"7" and inner["content-type"] == b"application/json"
    # Every client-supplied copy of the device header goes; ours is what the handshake proved.
    assert common.header_mutation.remove_headers == ["x-bkv-device-key"]
    assert inner["x-bkv-device-key"] == base64.b64encode(device.public)

    outer = response_headers.response_headers.response.header_mutation
    assert _set_headers(outer) == {":status": b"200", "content-type": b"application/octet-stream"}
    assert outer.remove_headers == []  # content-type, the only upstream header here, is overwritten
    sealed = response_body.response_body.response
    assert not sealed.is_set("header_mutation")  # no content-length: every sealed answer goes out chunked
    assert session.open_response(7, sealed.body_mutation.body) == (403, b'{"error":{}}')


UPSTREAM_HEADERS = [HeaderValue(key=k, raw_value=v) for k, v in (
    (b"www-authenticate", b"Bearer"), (b"location", b"/v1/fleet"), (b"retry-after", b"1"),
    (b"x-envoy-upstream-service-time", b"12"), (b"server", b"uvicorn"), (b"set-cookie", b"a=b"),
    (b"content-length", b"0"), (b"date", b"Sun, 29 Nov 2026 22:00:00 GMT"))]


def test_only_the_allow_listed_headers_stay_on_a_sealed_answer(processor):
    session = processor.handshake()
    body = session.session_id + session.seal_request(1, "/v1/recover/start", "Bearer x", b"")
    _, _, response_headers, _ = processor.transport(body, HeaderValue(key=":status", raw_value=b"401"),
                                                    b'{"error":{}}', UPSTREAM_HEADERS)
    mutation = response_headers.response_headers.response.header_mutation
    assert sorted(mutation.remove_headers) == sorted(
        ["www-authenticate", "location", "retry-after", "x-envoy-upstream-service-time", "server", "set-cookie",
         "content-length", "date"])
    assert _set_headers(mutation) == {":status": b"200", "content-type": b"application/octet-stream"}


def test_an_answer_without_a_body_is_sealed_at_its_headers(processor):
    """A bare 307 (a trailing slash) ends the stream at its headers: no body
    phase comes, so the sealed status and empty body replace the empty body there."""
    session = processor.handshake()
    body = session.session_id + session.seal_request(2, "/v1/fleet/", "", b"")
    stream = processor.transport(body, HeaderValue(key=":status", raw_value=b"307"), None, UPSTREAM_HEADERS)
    assert len(stream) == 3  # the stream ends at the response headers
    common = stream[-1].response_headers.response
    assert common.status.name == "CONTINUE_AND_REPLACE"
    sealed = common.body_mutation.body
    assert session.open_response(2, sealed) == (307, b"")
    assert _set_headers(common.header_mutation) == {":status": b"200", "content-type": b"application/octet-stream"}
    assert "location" in common.header_mutation.remove_headers
    assert len(sealed) == 2048 + 16


@pytest.mark.parametrize("size,sealed", [(0, 2048), (500, 2048), (2042, 2048), (2043, 8192), (8186, 8192),
                                         (8187, 32768), (32762, 32768), (32763, 65536), (70000, 98304)])
def test_answers_are_padded_to_the_few_sizes_of_the_ladder(processor, size, sealed):
    session = processor.handshake()
    answer = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    body = session.session_id + session.seal_request(3, "/v1/fleet", "", b"")
    *_, last = processor.transport(body, answer=answer)
    out = last.response_body.response.body_mutation.body
    assert len(out) == sealed + 16  # the padded plaintext and the AEAD tag
    assert session.open_response(3, out) == (200, answer)


def _forged_answer(session: Session, counter: int, plain: bytes) -> bytes:
    """An answer sealed with the session's own key, as only the edge could."""
    return ChaCha20Poly1305(session.k_recv).encrypt(b"\0" * 4 + struct.pack("<Q", counter), plain, session.session_id)


@pytest.mark.parametrize("plain", [
    struct.pack(">HI", 200, 2043) + b"x" * 2042,  # a length past the end
    struct.pack(">HI", 200, 2) + b"ok" + b"\0" * 2039 + b"\1",  # padding that is not zeros
    struct.pack(">HI", 200, 2) + b"ok" + b"\0" * 1016,  # padded to a size not on the ladder
    struct.pack(">HI", 200, 2) + b"ok" + b"\0" * 8184,  # padded past the rung it belongs to
    b"\0\xc8",  # the old format: status and body only
])
def test_the_device_opens_only_an_answer_padded_as_agreed(plain):
    session = Session(os.urandom(SESSION_ID_LEN), os.urandom(32), os.urandom(32))
    good = struct.pack(">HI", 200, 2) + b"ok" + b"\0" * (2048 - 8)
    assert session.open_response(9, _forged_answer(session, 9, good)) == (200, b"ok")
    with pytest.raises(BadMessage):
        session.open_response(9, _forged_answer(session, 9, plain))


def test_the_inner_status_is_read_from_the_value_field_too(processor):
    session = processor.handshake()
    body = session.session_id + session.seal_request(1, "/v1/fleet", "", b"")
    *_, last = processor.transport(body, HeaderValue(key=":status", value="429"), b"slow down")
    assert session.open_response(1, last.response_body.response.body_mutation.body) == (429, b"slow down")


def test_a_replayed_request_is_refused_and_ends_the_session(processor):
    session = processor.handshake()
    body = session.session_id + session.seal_request(3, "/v1/fleet", "", b"")
    assert processor.transport(body)[-1].is_set("response_body")
    assert _refusal(processor.transport(body)[1]) == (400, "noise_bad_message")
    fresh = session.session_id + session.seal_request(4, "/v1/fleet", "", b"")
    assert _refusal(processor.transport(fresh)[1]) == (401, "noise_session_unknown")


def test_requests_out_of_order_are_accepted_within_the_window_and_refused_below_it(processor):
    def send(session: Session, counter: int) -> bool:
        stream = processor.transport(session.session_id + session.seal_request(counter, "/v1/fleet", "", b""))
        return not stream[1].is_set("immediate_response")

    session = processor.handshake()
    assert send(session, 5000) and send(session, 905) and send(session, 4999)  # 5000 - 905 < 4096
    assert not send(session, 905)  # seen: a replay
    late = processor.handshake()
    assert send(late, 5000) and not send(late, 904)  # 4096 below the highest: too old to tell


def test_a_tampered_request_is_refused_and_ends_the_session(processor):
    session = processor.handshake()
    body = bytearray(session.session_id + session.seal_request(0, "/v1/fleet", "", b"{}"))
    body[-1] ^= 1
    assert _refusal(processor.transport(bytes(body))[1]) == (400, "noise_bad_message")
    fresh = session.session_id + session.seal_request(1, "/v1/fleet", "", b"{}")
    assert _refusal(processor.transport(fresh)[1]) == (401, "noise_session_unknown")


@pytest.mark.parametrize("path,auth", [("/healthz", ""), ("/v1/fleet\r\nx-bkv-device-key: forged", ""),
                                       ("/v1/fleet", "Bearer t\nx: y")])
def test_an_inner_request_off_the_v1_api_or_with_control_characters_is_refused(processor, path, auth):
    session = processor.handshake()
    body = session.session_id + session.seal_request(0, path, auth, b"")
    assert _refusal(processor.transport(body)[1]) == (400, "noise_bad_message")


def test_a_body_for_an_unknown_session_asks_for_a_new_handshake(processor):
    assert _refusal(processor.transport(b"\x01" * 64)[1]) == (401, "noise_session_unknown")
    assert _refusal(processor.transport(b"\x01" * SESSION_ID_LEN)[1]) == (401, "noise_session_unknown")


def test_a_handshake_made_for_another_edge_key_fails(processor):
    initiator = Initiator(StaticKey.generate(), StaticKey.generate().public)
    _, answer = processor.stream("handshake", REQUEST_HEADERS,
                                 ProcessingRequest(request_body=HttpBody(body=initiator.first_message())))
    assert _refusal(answer) == (400, "noise_handshake_failed")


def test_a_client_that_pinned_another_key_cannot_finish_the_handshake(processor):
    session = processor.handshake()  # the edge's real answer...
    initiator = Initiator(StaticKey.generate(), processor.key.public)
    _, answer = processor.stream("handshake", REQUEST_HEADERS, ProcessingRequest(
        request_body=HttpBody(body=initiator.first_message())))
    other = Initiator(StaticKey.generate(), StaticKey.generate().public)
    other.first_message()
    with pytest.raises(HandshakeFailed):  # ... read by a client that expected another edge
        other.finish(answer.immediate_response.body[:SESSION_ID_LEN], answer.immediate_response.body[SESSION_ID_LEN:])
    assert session.session_id != answer.immediate_response.body[:SESSION_ID_LEN]


def test_a_stream_without_a_route_from_envoy_is_refused(processor):
    assert _refusal(processor.stream(None, REQUEST_HEADERS)[0]) == (404, "not_found")
    assert _refusal(processor.stream("other", REQUEST_HEADERS)[0]) == (404, "not_found")


def test_a_response_phase_on_the_handshake_route_is_refused(processor):
    answer, = processor.stream("handshake", ProcessingRequest(response_body=HttpBody(body=b"x")))
    assert _refusal(answer) == (404, "not_found")


def test_response_phases_before_a_request_was_opened_are_refused(processor):
    answer, = processor.stream("transport", ProcessingRequest(response_body=HttpBody(body=b"x")))
    assert _refusal(answer) == (404, "not_found")
    # Headers seen, body never opened: whatever answer comes is not passed on.
    first, answer = processor.stream("transport", REQUEST_HEADERS, _local_reply_headers())
    assert _refusal(answer) == (404, "not_found")


def test_a_noise_request_without_a_body_is_refused_at_its_headers(processor):
    for route in ("handshake", "transport"):
        answer, = processor.stream(route, ProcessingRequest(request_headers=HttpHeaders(end_of_stream=True)))
        assert _refusal(answer) == (400, "noise_bad_message")


def _local_reply_headers(end_of_stream: bool = False) -> ProcessingRequest:
    return ProcessingRequest(response_headers=HttpHeaders(headers=HeaderMap(headers=[
        HeaderValue(key=":status", raw_value=b"429"), HeaderValue(key="retry-after", raw_value=b"1")]),
        end_of_stream=end_of_stream))


def test_envoys_own_answer_to_a_request_it_never_passed_us_goes_out_unchanged(processor):
    """A filter ahead of ours (the per-source limit) answered: the stream's
    first phase is the response's headers. Nothing reached the frontend, so
    it passes unchanged -- no header mutation, no body mutation -- and the
    device reads Envoy's 429 as the edge's word."""
    headers, body = processor.stream("transport", _local_reply_headers(),
                                     ProcessingRequest(response_body=HttpBody(body=b'{"error":{}}', end_of_stream=True)))
    assert headers.is_set("response_headers") and not bytes(headers.response_headers)
    assert body.is_set("response_body") and not bytes(body.response_body)
    bodiless, = processor.stream("transport", _local_reply_headers(end_of_stream=True))
    assert bodiless.is_set("response_headers") and not bytes(bodiless.response_headers)


@pytest.mark.parametrize("raw", [b"", b"\x22\x05ab", b"\x0f", b"\x09abc", bytes(ProcessingRequest()),
                                 bytes(ProcessingRequest(response_headers=HttpHeaders()))])
def test_truncated_phaseless_or_statusless_messages_are_refused(processor, raw):
    answer, = processor.stream("transport", raw)
    assert _refusal(answer) == (400, "noise_bad_message")


def test_concurrent_requests_on_one_session_are_each_accepted_once(processor):
    session = processor.handshake()
    bodies = [session.session_id + session.seal_request(c, "/v1/fleet", "", b"%d" % c) for c in range(40)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: processor.transport(b, answer=b"ok"), bodies))
    for counter, stream in enumerate(answers):
        assert session.open_response(counter, stream[-1].response_body.response.body_mutation.body) == (200, b"ok")


def test_metrics_count_handshakes_and_refusals_by_reason(processor):
    def value(text: str, name: str) -> float:
        return next((float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")), 0.0)

    before = httpx.get(processor.metrics_url).text
    processor.handshake()
    processor.transport(b"\x01" * 64)
    after = httpx.get(processor.metrics_url).text
    assert value(after, "bkv_noise_handshakes_total") == value(before, "bkv_noise_handshakes_total") + 1
    unknown = 'bkv_noise_rejections_total{reason="noise_session_unknown"}'
    assert value(after, unknown) == value(before, unknown) + 1
    assert value(after, "bkv_noise_sessions") >= 1


def test_the_oldest_session_goes_first_when_the_table_is_full(tmp_path):
    p = Processor(tmp_path, "--max-sessions", "2")
    try:
        first, second, third = p.handshake(), p.handshake(), p.handshake()

        def status(s: Session) -> bool:
            return p.transport(s.session_id + s.seal_request(0, "/v1/fleet", "", b""))[1].is_set("immediate_response")

        assert status(first) and not status(second) and not status(third)
    finally:
        p.close()


def test_an_expired_session_asks_for_a_new_handshake(tmp_path):
    p = Processor(tmp_path, "--session-ttl", "1ns")
    try:
        s = p.handshake()
        assert _refusal(p.transport(s.session_id + s.seal_request(0, "/v1/fleet", "", b""))[1]) == \
            (401, "noise_session_unknown")
    finally:
        p.close()


def test_the_floor_command_measures_the_edge_cryptography():
    out = procs.run([_processor_binary(), "floor", "--iterations", "20"], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    floor = json.loads(out)
    assert set(floor) == {"handshake", "request"} and 0 < floor["request"] < floor["handshake"] < 0.05


def test_a_key_file_that_is_not_an_x25519_key_stops_it_at_start(tmp_path):
    bad = tmp_path / "edge.key"
    bad.write_text(base64.b64encode(b"short").decode())
    res = procs.run([_processor_binary(), "serve", "--listen", f"127.0.0.1:{_port()}", "--key-file", str(bad)],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 1 and "not an X25519 key" in res.stderr
