package main

// The ext_proc messages, with Envoy's generated types (go-control-plane):
// parsed with protobuf-go, encoded with the vtprotobuf marshallers
// go-control-plane generates beside the types (build tag vtprotobuf, which
// scripts/build-noise-processor.sh sets: half the CPU of proto.Marshal here).
// The gRPC stream itself carries raw bytes (rawCodec, main.go) so that a
// message that does not parse is refused like any other bad message
// instead of ending the stream with a gRPC error.

import (
	"errors"
	"strconv"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/protobuf/proto"
)

// The phases the processor tells apart (ProcessingRequest's `request` oneof).
const (
	phaseNone = iota
	phaseRequestHeaders
	phaseResponseHeaders
	phaseRequestBody
	phaseResponseBody
	phaseOther // trailers, flow control: never configured, refused
)

// phase is one ProcessingRequest: its kind; for a body phase the body; for
// the response headers, the :status, every header name and whether a body follows.
type phase struct {
	kind        int
	body        []byte
	status      int
	headerNames []string
	endOfStream bool
}

// decodeRequest tells which phase a ProcessingRequest is; attributes, metadata
// and protocol configuration are ignored.
func decodeRequest(data []byte) (phase, error) {
	var req extprocv3.ProcessingRequest
	if err := proto.Unmarshal(data, &req); err != nil {
		return phase{}, errors.New("malformed ext_proc message")
	}
	switch r := req.Request.(type) {
	case *extprocv3.ProcessingRequest_RequestHeaders:
		return phase{kind: phaseRequestHeaders, endOfStream: r.RequestHeaders.GetEndOfStream()}, nil
	case *extprocv3.ProcessingRequest_RequestBody:
		return phase{kind: phaseRequestBody, body: r.RequestBody.GetBody()}, nil
	case *extprocv3.ProcessingRequest_ResponseBody:
		return phase{kind: phaseResponseBody, body: r.ResponseBody.GetBody()}, nil
	case *extprocv3.ProcessingRequest_ResponseHeaders:
		p := phase{kind: phaseResponseHeaders, status: -1, endOfStream: r.ResponseHeaders.GetEndOfStream()}
		for _, h := range r.ResponseHeaders.GetHeaders().GetHeaders() {
			p.headerNames = append(p.headerNames, h.GetKey())
			if h.GetKey() != ":status" {
				continue
			}
			value := h.GetRawValue()
			if len(value) == 0 {
				value = []byte(h.GetValue())
			}
			n, err := strconv.Atoi(string(value))
			if err != nil || n < 100 || n > 999 {
				return phase{}, errors.New("malformed :status")
			}
			p.status = n
		}
		if p.status < 0 {
			return phase{}, errors.New("response headers without :status")
		}
		return p, nil
	case nil:
		return phase{}, errors.New("ext_proc message without a phase")
	default:
		return phase{kind: phaseOther}, nil
	}
}

type header struct {
	key   string
	value []byte
}

// headerMutation: each set header overwrites any copy already there; removed
// headers go first in Envoy's order of application.
func headerMutation(set []header, remove ...string) *extprocv3.HeaderMutation {
	m := &extprocv3.HeaderMutation{RemoveHeaders: remove}
	for _, h := range set {
		m.SetHeaders = append(m.SetHeaders, &corev3.HeaderValueOption{
			Header:       &corev3.HeaderValue{Key: h.key, RawValue: h.value},
			AppendAction: corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD,
		})
	}
	return m
}

func encode(r *extprocv3.ProcessingResponse) []byte {
	out, err := marshal(r) // marshal_vt.go, or marshal_proto.go without the vtprotobuf tag
	if err != nil {        // only for a message we built wrong
		panic(err)
	}
	return out
}

// bodyResponse answers a body phase: CONTINUE, replacing the body and
// mutating the headers (allowed because the body is buffered: the headers
// have not left Envoy yet).
func bodyResponse(kind int, body []byte, headers *extprocv3.HeaderMutation) []byte {
	common := &extprocv3.BodyResponse{Response: &extprocv3.CommonResponse{
		HeaderMutation: headers,
		BodyMutation:   &extprocv3.BodyMutation{Mutation: &extprocv3.BodyMutation_Body{Body: body}},
	}}
	if kind == phaseResponseBody {
		return encode(&extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseBody{ResponseBody: common}})
	}
	return encode(&extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestBody{RequestBody: common}})
}

// passBody answers a response body phase: CONTINUE, unchanged.
func passBody() []byte {
	return encode(&extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseBody{
		ResponseBody: &extprocv3.BodyResponse{}}})
}

// headersResponse answers a headers phase: CONTINUE with an optional mutation.
func headersResponse(kind int, headers *extprocv3.HeaderMutation) []byte {
	answer := &extprocv3.HeadersResponse{}
	if headers != nil {
		answer.Response = &extprocv3.CommonResponse{HeaderMutation: headers}
	}
	if kind == phaseResponseHeaders {
		return encode(&extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseHeaders{ResponseHeaders: answer}})
	}
	return encode(&extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestHeaders{RequestHeaders: answer}})
}

// replaceResponse answers response headers that end the stream (no body
// follows, so no body phase will come): CONTINUE_AND_REPLACE gives the
// answer the body it did not have.
func replaceResponse(body []byte, headers *extprocv3.HeaderMutation) []byte {
	return encode(&extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseHeaders{
		ResponseHeaders: &extprocv3.HeadersResponse{Response: &extprocv3.CommonResponse{
			Status:         extprocv3.CommonResponse_CONTINUE_AND_REPLACE,
			HeaderMutation: headers,
			BodyMutation:   &extprocv3.BodyMutation{Mutation: &extprocv3.BodyMutation_Body{Body: body}},
		}}}})
}

// immediateResponse ends the stream with an answer of our own.
func immediateResponse(status int, body []byte, contentType string) []byte {
	return encode(&extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ImmediateResponse{
		ImmediateResponse: &extprocv3.ImmediateResponse{
			Status:  &typev3.HttpStatus{Code: typev3.StatusCode(status)},
			Headers: headerMutation([]header{{"content-type", []byte(contentType)}}),
			Body:    body,
		}}})
}
