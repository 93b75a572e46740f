package main

// The few parts of Envoy's ext_proc protobuf the processor uses, encoded and
// decoded by hand: it only ever reads which phase a message is, the buffered
// body and the response's :status, and only ever answers with a header or
// body mutation or an immediate response. Field numbers are those of
// envoy/service/ext_proc/v3/external_processor.proto and
// envoy/config/core/v3/base.proto; tests/test_edge_processor.py checks every
// message against the generated classes (envoy-data-plane).

import (
	"errors"
	"strconv"
)

// ProcessingRequest's `request` oneof.
const (
	phaseRequestHeaders  = 2
	phaseResponseHeaders = 3
	phaseRequestBody     = 4
	phaseResponseBody    = 5
	phaseRequestTrailers = 6
	phaseResponseTrail   = 7
)

// HeaderValueOption.HeaderAppendAction
const overwriteIfExistsOrAdd = 2

var errTruncated = errors.New("truncated ext_proc message")

// phase is one ProcessingRequest: its kind; for a body phase the body; for
// the response headers, the :status.
type phase struct {
	kind   int
	body   []byte
	status int
}

type field struct {
	number int
	wire   int
	varint uint64
	bytes  []byte
}

func readVarint(buf []byte, i int) (uint64, int, error) {
	var result uint64
	for shift := uint(0); ; shift += 7 {
		if i >= len(buf) || shift > 63 {
			return 0, 0, errTruncated
		}
		b := buf[i]
		i++
		result |= uint64(b&0x7f) << shift
		if b&0x80 == 0 {
			return result, i, nil
		}
	}
}

// fields walks the top-level fields of one message.
func fields(buf []byte, visit func(f field) error) error {
	for i := 0; i < len(buf); {
		key, next, err := readVarint(buf, i)
		if err != nil {
			return err
		}
		i = next
		f := field{number: int(key >> 3), wire: int(key & 7)}
		switch f.wire {
		case 0:
			if f.varint, i, err = readVarint(buf, i); err != nil {
				return err
			}
		case 2:
			var n uint64
			if n, i, err = readVarint(buf, i); err != nil {
				return err
			}
			if n > uint64(len(buf)-i) {
				return errTruncated
			}
			f.bytes, i = buf[i:i+int(n)], i+int(n)
		case 1, 5: // fixed64, fixed32
			width := 8
			if f.wire == 5 {
				width = 4
			}
			if width > len(buf)-i {
				return errTruncated
			}
			f.bytes, i = buf[i:i+width], i+width
		default:
			return errors.New("unsupported protobuf wire type")
		}
		if err := visit(f); err != nil {
			return err
		}
	}
	return nil
}

var errFound = errors.New("found") // stops a walk early

// decodeRequest tells which phase a ProcessingRequest is; attributes, metadata
// and protocol configuration are skipped.
func decodeRequest(data []byte) (phase, error) {
	var p phase
	err := fields(data, func(f field) error {
		if f.number < phaseRequestHeaders || f.number > phaseResponseTrail || f.wire != 2 {
			return nil
		}
		p.kind = f.number
		switch f.number {
		case phaseRequestBody, phaseResponseBody:
			if err := fields(f.bytes, func(g field) error {
				if g.number == 1 && g.wire == 2 {
					p.body = g.bytes
				}
				return nil
			}); err != nil {
				return err
			}
		case phaseResponseHeaders:
			status, err := statusOf(f.bytes)
			if err != nil {
				return err
			}
			p.status = status
		}
		return errFound
	})
	if err == errFound {
		return p, nil
	}
	if err == nil {
		err = errors.New("ext_proc message without a phase")
	}
	return p, err
}

// statusOf reads :status from HttpHeaders{1: HeaderMap{1: HeaderValue{1: key, 2: value, 3: raw_value}}}.
func statusOf(httpHeaders []byte) (int, error) {
	status := -1
	err := fields(httpHeaders, func(f field) error {
		if f.number != 1 || f.wire != 2 {
			return nil
		}
		return fields(f.bytes, func(h field) error {
			if h.number != 1 || h.wire != 2 {
				return nil
			}
			var key, value []byte
			if err := fields(h.bytes, func(v field) error {
				if v.wire == 2 && v.number == 1 {
					key = v.bytes
				} else if v.wire == 2 && (v.number == 2 || v.number == 3) && len(v.bytes) > 0 {
					value = v.bytes
				}
				return nil
			}); err != nil {
				return err
			}
			if string(key) != ":status" {
				return nil
			}
			n, err := strconv.Atoi(string(value))
			if err != nil || n < 100 || n > 999 {
				return errors.New("malformed :status")
			}
			status = n
			return errFound
		})
	})
	if err == errFound {
		return status, nil
	}
	if err == nil {
		err = errors.New("response headers without :status")
	}
	return 0, err
}

// -- encoding ---------------------------------------------------------------------------

func appendVarint(out []byte, n uint64) []byte {
	for n >= 0x80 {
		out = append(out, byte(n)|0x80)
		n >>= 7
	}
	return append(out, byte(n))
}

func bytesField(out []byte, number int, value []byte) []byte {
	out = appendVarint(out, uint64(number<<3|2))
	out = appendVarint(out, uint64(len(value)))
	return append(out, value...)
}

func intField(out []byte, number int, value uint64) []byte {
	if value == 0 {
		return out
	}
	return appendVarint(appendVarint(out, uint64(number<<3)), value)
}

type header struct {
	key   string
	value []byte
}

// headerMutation: each set header overwrites any copy already there; removed
// headers go first in Envoy's order of application.
func headerMutation(set []header, remove ...string) []byte {
	var out []byte
	for _, h := range set {
		value := bytesField(bytesField(nil, 1, []byte(h.key)), 3, h.value)
		option := intField(bytesField(nil, 1, value), 3, overwriteIfExistsOrAdd)
		out = bytesField(out, 1, option)
	}
	for _, key := range remove {
		out = bytesField(out, 2, []byte(key))
	}
	return out
}

// bodyResponse answers a body phase: CONTINUE, replacing the body and
// mutating the headers (allowed because the body is buffered: the headers
// have not left Envoy yet).
func bodyResponse(kind int, body []byte, headers []byte) []byte {
	var common []byte
	if len(headers) > 0 {
		common = bytesField(common, 2, headers)
	}
	common = bytesField(common, 3, bytesField(nil, 1, body))
	number := 3 // request_body
	if kind == phaseResponseBody {
		number = 4
	}
	return bytesField(nil, number, bytesField(nil, 1, common))
}

// headersResponse answers a headers phase: CONTINUE with an optional mutation.
func headersResponse(kind int, headers []byte) []byte {
	number := 1 // request_headers
	if kind == phaseResponseHeaders {
		number = 2
	}
	var inner []byte
	if len(headers) > 0 {
		inner = bytesField(nil, 1, bytesField(nil, 2, headers))
	}
	return bytesField(nil, number, inner)
}

// immediateResponse ends the stream with an answer of our own.
func immediateResponse(status int, body []byte, contentType string) []byte {
	immediate := bytesField(nil, 1, intField(nil, 1, uint64(status)))
	immediate = bytesField(immediate, 2, headerMutation([]header{{"content-type", []byte(contentType)}}))
	immediate = bytesField(immediate, 3, body)
	return bytesField(nil, 7, immediate)
}
