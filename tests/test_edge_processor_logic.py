"""The processor's per-request logic (bkv_edge/processor.py: Exchange) fed
ext_proc messages directly: no Envoy, no gRPC. The real path is covered by
tests/test_edge_noise.py."""

from __future__ import annotations

import base64
import json

from envoy_data_plane.envoy.service.ext_proc.v3 import ProcessingResponse

from bkv_edge import extproc
from bkv_edge.extproc import Phase
from bkv_edge.noise import SESSION_ID_LEN, Initiator, StaticKey
from bkv_edge.processor import HANDSHAKE, TRANSPORT, Exchange, NoiseProcessor, route_of


def _handshake(processor: NoiseProcessor, device: StaticKey):
    initiator = Initiator(device, processor.key.public)
    ex = Exchange(processor, HANDSHAKE)
    assert ex.on(Phase(extproc.REQUEST_HEADERS)) == (extproc.headers_response(extproc.REQUEST_HEADERS), False)
    answer, done = ex.on(Phase(extproc.REQUEST_BODY, initiator.first_message(), True))
    imm = ProcessingResponse.parse(answer).immediate_response
    assert done and imm.status.code.value == 200
    return initiator.finish(imm.body[:SESSION_ID_LEN], imm.body[SESSION_ID_LEN:])


def test_a_stream_without_a_route_from_envoy_is_refused():
    ex = Exchange(NoiseProcessor(StaticKey.generate()), route_of([("other", "x")]))
    answer, done = ex.on(Phase(extproc.REQUEST_HEADERS))
    imm = ProcessingResponse.parse(answer).immediate_response
    assert done and imm.status.code.value == 404 and json.loads(imm.body)["error"]["code"] == "not_found"


def test_a_transport_request_opens_to_the_inner_request_and_its_answer_is_sealed_with_the_inner_status():
    processor, device = NoiseProcessor(StaticKey.generate()), StaticKey.generate()
    session = _handshake(processor, device)
    ex = Exchange(processor, route_of([("x-bkv-edge-route", b"transport")]))
    ex.on(Phase(extproc.REQUEST_HEADERS))
    body = session.session_id + session.seal_request(7, "/v1/recovery/start", "Bearer t", b'{"a":1}')
    answer, done = ex.on(Phase(extproc.REQUEST_BODY, body, True))
    common = ProcessingResponse.parse(answer).request_body.response
    headers = {h.header.key: h.header.raw_value for h in common.header_mutation.set_headers}
    assert not done and common.body_mutation.body == b'{"a":1}'
    assert headers[":path"] == b"/v1/recovery/start" and headers["authorization"] == b"Bearer t"
    assert headers["x-bkv-device-key"] == base64.b64encode(device.public)  # what the handshake proved

    answer, _ = ex.on(Phase(extproc.RESPONSE_HEADERS, status=403))
    outer = {h.header.key: h.header.raw_value for h in
             ProcessingResponse.parse(answer).response_headers.response.header_mutation.set_headers}
    assert outer[":status"] == b"200"  # the real status travels sealed
    answer, done = ex.on(Phase(extproc.RESPONSE_BODY, b'{"error":{}}', True))
    sealed = ProcessingResponse.parse(answer).response_body.response.body_mutation.body
    assert done and session.open_response(7, sealed) == (403, b'{"error":{}}')


def test_a_body_for_an_unknown_session_asks_for_a_new_handshake():
    ex = Exchange(NoiseProcessor(StaticKey.generate()), TRANSPORT)
    answer, done = ex.on(Phase(extproc.REQUEST_BODY, b"\x01" * 64, True))
    imm = ProcessingResponse.parse(answer).immediate_response
    assert done and imm.status.code.value == 401
    assert json.loads(imm.body)["error"]["code"] == "noise_session_unknown"


def test_a_response_phase_on_the_handshake_route_is_refused():
    ex = Exchange(NoiseProcessor(StaticKey.generate()), HANDSHAKE)
    answer, done = ex.on(Phase(extproc.RESPONSE_BODY, b"x", True))
    assert done and ProcessingResponse.parse(answer).immediate_response.status.code.value == 404
