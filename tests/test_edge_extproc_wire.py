"""The processor's hand-written ext_proc encoding agrees with the generated
protobuf classes (envoy-data-plane) in both directions."""

from __future__ import annotations

import pytest
from envoy_data_plane.envoy.config.core.v3 import HeaderMap, HeaderValue
from envoy_data_plane.envoy.service.ext_proc.v3 import (
    HttpBody,
    HttpHeaders,
    ProcessingRequest,
    ProcessingResponse,
    ProtocolConfiguration,
)

from bkv_edge import extproc
from bkv_edge.errors import BadMessage


def test_a_request_body_message_decodes_to_its_phase_and_body():
    raw = bytes(ProcessingRequest(request_body=HttpBody(body=b"\x00sealed\xff" * 50, end_of_stream=True),
                                  protocol_config=ProtocolConfiguration()))
    assert extproc.decode_request(raw) == extproc.Phase(extproc.REQUEST_BODY, b"\x00sealed\xff" * 50, True)


def test_a_response_body_message_decodes_with_an_empty_body():
    raw = bytes(ProcessingRequest(response_body=HttpBody(body=b"", end_of_stream=True)))
    assert extproc.decode_request(raw) == extproc.Phase(extproc.RESPONSE_BODY, b"", True)


def test_response_headers_decode_to_their_status_from_raw_value_or_value():
    for header in (HeaderValue(key=":status", raw_value=b"403"), HeaderValue(key=":status", value="403")):
        raw = bytes(ProcessingRequest(response_headers=HttpHeaders(headers=HeaderMap(headers=[
            HeaderValue(key="content-type", raw_value=b"application/json"), header]))))
        assert extproc.decode_request(raw) == extproc.Phase(extproc.RESPONSE_HEADERS, status=403)


def test_request_headers_are_recognised_without_being_read():
    raw = bytes(ProcessingRequest(request_headers=HttpHeaders(headers=HeaderMap(headers=[
        HeaderValue(key=":path", raw_value=b"/noise/v1")]), end_of_stream=False)))
    assert extproc.decode_request(raw).kind == extproc.REQUEST_HEADERS


@pytest.mark.parametrize("raw", [b"", b"\x22\x05ab", b"\x0f", b"\x09abc", bytes(ProcessingRequest())])
def test_truncated_or_phaseless_messages_are_refused(raw):
    with pytest.raises(BadMessage):
        extproc.decode_request(raw)


def test_a_request_body_answer_carries_the_body_and_overwriting_headers():
    mutation = extproc.header_mutation({":path": b"/v1/fleet", "x-bkv-device-key": b"k=="}, remove=("x-drop",))
    msg = ProcessingResponse.parse(extproc.body_response(extproc.REQUEST_BODY, b"{}", mutation))
    common = msg.request_body.response
    assert common.body_mutation.body == b"{}"
    assert [(h.header.key, h.header.raw_value, h.append_action.name) for h in common.header_mutation.set_headers] == [
        (":path", b"/v1/fleet", "OVERWRITE_IF_EXISTS_OR_ADD"), ("x-bkv-device-key", b"k==", "OVERWRITE_IF_EXISTS_OR_ADD")]
    assert common.header_mutation.remove_headers == ["x-drop"]


def test_a_bare_continue_is_an_empty_answer_for_its_phase():
    assert ProcessingResponse.parse(extproc.headers_response(extproc.REQUEST_HEADERS)).request_headers is not None
    assert ProcessingResponse.parse(extproc.body_response(extproc.RESPONSE_BODY)).response_body is not None


def test_an_immediate_response_has_status_content_type_and_body():
    msg = ProcessingResponse.parse(extproc.immediate_response(401, b'{"e":1}', "application/json"))
    imm = msg.immediate_response
    assert imm.status.code.value == 401 and imm.body == b'{"e":1}'
    assert [(h.header.key, h.header.raw_value) for h in imm.headers.set_headers] == [
        ("content-type", b"application/json")]
