"""The few parts of Envoy's ``ext_proc`` protobuf the Noise processor uses,
encoded and decoded by hand.

Why by hand: the generated betterproto2 classes validate every field with
pydantic and took about half of the processor's CPU per request
(docs/performance.md). The processor only ever reads which phase a message
is, the buffered body and the response's ``:status``, and only ever
answers with a header or body mutation or an immediate response, so a few
dozen lines of protobuf wire format replace them. ``tests/test_edge_extproc_wire.py`` checks every
encoder and decoder here against the generated classes.

Field numbers are those of ``envoy/service/ext_proc/v3/external_processor.proto``
and ``envoy/config/core/v3/base.proto``.
"""

from __future__ import annotations

from dataclasses import dataclass

from bkv_edge.errors import BadMessage

# ProcessingRequest: which phase a message is (the ``request`` oneof).
REQUEST_HEADERS, RESPONSE_HEADERS, REQUEST_BODY, RESPONSE_BODY, REQUEST_TRAILERS, RESPONSE_TRAILERS = 2, 3, 4, 5, 6, 7
_PHASES = frozenset((2, 3, 4, 5, 6, 7))

# HeaderValueOption.HeaderAppendAction
OVERWRITE_IF_EXISTS_OR_ADD = 2


@dataclass(frozen=True, slots=True)
class Phase:
    """One ProcessingRequest: its phase number; for a body phase, the body;
    for the response headers, the ``:status``."""

    kind: int
    body: bytes = b""
    end_of_stream: bool = False
    status: int = 0


# -- wire primitives --------------------------------------------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise BadMessage("truncated ext_proc message")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _fields(buf: bytes):
    """(field number, wire type, value) for each field; value is an int for
    varints and the bytes for length-delimited fields."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _read_varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(buf, i)
        elif wire == 2:
            length, i = _read_varint(buf, i)
            if i + length > n:
                raise BadMessage("truncated ext_proc message")
            value, i = buf[i:i + length], i + length
        elif wire in (1, 5):  # fixed64, fixed32
            width = 8 if wire == 1 else 4
            if i + width > n:
                raise BadMessage("truncated ext_proc message")
            value, i = buf[i:i + width], i + width
        else:
            raise BadMessage("unsupported protobuf wire type")
        yield number, wire, value


def _bytes_field(number: int, value: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _int_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value) if value else b""


# -- ProcessingRequest ------------------------------------------------------------------

def decode_request(data: bytes) -> Phase:
    """Which phase ``data`` is; the body for body phases. Attributes, metadata
    and protocol configuration are skipped: the processor does not use them."""
    for number, wire, value in _fields(data):
        if number in _PHASES and wire == 2:
            if number in (REQUEST_BODY, RESPONSE_BODY):
                body, eos = b"", False
                for n, w, v in _fields(value):
                    if n == 1 and w == 2:
                        body = v
                    elif n == 2 and w == 0:
                        eos = bool(v)
                return Phase(number, body, eos)
            if number == RESPONSE_HEADERS:
                return Phase(number, status=_status(value))
            return Phase(number)
    raise BadMessage("ext_proc message without a phase")


def _status(http_headers: bytes) -> int:
    """``:status`` from HttpHeaders{1: HeaderMap{1: HeaderValue{1: key, 2: value, 3: raw_value}}}."""
    for n, w, header_map in _fields(http_headers):
        if n == 1 and w == 2:
            for n2, w2, header in _fields(header_map):
                if n2 != 1 or w2 != 2:
                    continue
                key = value = b""
                for n3, w3, v in _fields(header):
                    if n3 == 1 and w3 == 2:
                        key = v
                    elif n3 in (2, 3) and w3 == 2 and v:
                        value = v
                if key == b":status":
                    try:
                        return int(value)
                    except ValueError:
                        raise BadMessage("malformed :status") from None
    raise BadMessage("response headers without :status")


# -- ProcessingResponse -----------------------------------------------------------------

def header_mutation(set_headers: dict[str, bytes] | None = None, remove: tuple[str, ...] = ()) -> bytes:
    """HeaderMutation: each set header overwrites any copy already there."""
    out = b""
    for key, value in (set_headers or {}).items():
        header_value = _bytes_field(1, key.encode()) + _bytes_field(3, value)
        out += _bytes_field(1, _bytes_field(1, header_value) + _int_field(3, OVERWRITE_IF_EXISTS_OR_ADD))
    for key in remove:
        out += _bytes_field(2, key.encode())
    return out


def body_response(phase: int, body: bytes | None = None, headers: bytes = b"") -> bytes:
    """ProcessingResponse answering a body phase (``REQUEST_BODY`` or
    ``RESPONSE_BODY``): CONTINUE, optionally replacing the body and mutating
    the headers (allowed because the body is buffered: the headers have not
    left Envoy yet)."""
    common = b""
    if headers:
        common += _bytes_field(2, headers)
    if body is not None:
        common += _bytes_field(3, _bytes_field(1, body))
    field = {REQUEST_BODY: 3, RESPONSE_BODY: 4}[phase]
    return _bytes_field(field, _bytes_field(1, common) if common else b"")


def headers_response(phase: int, headers: bytes = b"") -> bytes:
    """ProcessingResponse answering a headers phase: CONTINUE with an optional mutation."""
    field = {REQUEST_HEADERS: 1, RESPONSE_HEADERS: 2}[phase]
    return _bytes_field(field, _bytes_field(1, _bytes_field(2, headers)) if headers else b"")


def immediate_response(status: int, body: bytes, content_type: str) -> bytes:
    """ProcessingResponse ending the stream with an answer of our own."""
    immediate = (_bytes_field(1, _int_field(1, status))
                 + _bytes_field(2, header_mutation({"content-type": content_type.encode()}))
                 + _bytes_field(3, body))
    return _bytes_field(7, immediate)
