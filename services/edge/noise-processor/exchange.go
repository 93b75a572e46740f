package main

// One HTTP request through the edge. Envoy routes by path
// (bkv_edge/envoy.py) and names the route in the stream's initial metadata
// (x-bkv-edge-route); per stream we then do only what we must:
//
//   - the request headers: answered with a constant, never read (Envoy sends
//     them only so that it holds them back until we have seen the body);
//   - handshake: the buffered body (IK message 1), answered by us with an
//     immediate response (session id | IK message 2);
//   - transport: the buffered body (session id | sealed request), opened into
//     the inner request (path, authorization, body, and x-bkv-device-key set
//     to the session's authenticated device key after every client-supplied
//     copy is removed); the response headers, whose status we keep and
//     replace with 200, and every header but the allow-list removed; the
//     buffered response body, sealed and padded with that status -- or, when
//     the answer has no body (no body phase comes), the sealed status and
//     empty body put in its place at the headers;
//   - an answer Envoy made itself before the request reached us (a filter
//     ahead of us refused it: the per-source limit's 429), passed through
//     untouched -- no session was opened, so no vault answer can be in it.

import (
	"encoding/base64"
	"strconv"
	"strings"

	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
)

const (
	deviceHeader   = "x-bkv-device-key"
	routeMetadata  = "x-bkv-edge-route"
	routeHandshake = "handshake"
	routeTransport = "transport"
)

var (
	continueRequestHeaders = headersResponse(phaseRequestHeaders, nil)
	sealedHeaders          = []header{{":status", []byte("200")}, {"content-type", []byte("application/octet-stream")}}
)

// outerAllowed: the only upstream response header left in a sealed answer
// is content-type, overwritten. Everything else the upstream said --
// www-authenticate, location, retry-after, set-cookie, server, x-envoy-* --
// would tell the network what the seal hides, so it goes; content-length
// too: Envoy drops it from an answer whose body we supply at the headers
// (a bodiless one) and sends that one chunked, so every sealed answer goes
// out chunked, framed alike. Pseudo-headers are Envoy's (:status is set).
func outerAllowed(name string) bool {
	return name == "content-type" || strings.HasPrefix(name, ":")
}

// outerHeaders: the mutation that leaves only the allow-list and sets the
// sealed answer's own headers (Envoy removes before it sets).
func outerHeaders(names []string) *extprocv3.HeaderMutation {
	var remove []string
	for _, name := range names {
		if !outerAllowed(name) {
			remove = append(remove, name)
		}
	}
	return headerMutation(sealedHeaders, remove...)
}

type processor struct {
	key      staticKey
	sessions *sessions
	metrics  *metrics
}

type exchange struct {
	p       *processor
	route   string
	session *session
	counter uint64
	status  int
	seen    bool // the request's headers came to us (Envoy's own early answers come without them)
	local   bool // passing such an early answer through
}

// on answers one ext_proc message; done means the stream is finished.
func (x *exchange) on(p phase) (answer []byte, done bool) {
	answer, done, err := x.step(p)
	if err != nil {
		return x.p.refuse(err), true
	}
	return answer, done
}

func (x *exchange) step(p phase) ([]byte, bool, error) {
	switch {
	case p.kind == phaseRequestHeaders && (x.route == routeHandshake || x.route == routeTransport):
		x.seen = true
		if p.endOfStream { // no body phase would come: refused here, never passed on unopened
			return nil, true, errBadMessage("a Noise message has a body")
		}
		return continueRequestHeaders, false, nil // held by Envoy until we have the body
	case x.route == routeHandshake && p.kind == phaseRequestBody:
		answer, err := x.handshake(p.body)
		return answer, true, err
	case x.route == routeTransport && p.kind == phaseRequestBody:
		answer, err := x.open(p.body)
		return answer, false, err
	case x.route == routeTransport && p.kind == phaseResponseHeaders && x.session != nil:
		x.status = p.status // sealed with the body, replaced by 200 outside
		if p.endOfStream {
			// No body follows (a 204, a bare redirect): no body phase will
			// come, so the sealed answer replaces the empty body now.
			sealed := x.session.sealResponse(x.counter, x.status, nil)
			return replaceResponse(sealed, outerHeaders(p.headerNames)), true, nil
		}
		return headersResponse(phaseResponseHeaders, outerHeaders(p.headerNames)), false, nil
	case x.route == routeTransport && p.kind == phaseResponseBody && x.session != nil:
		sealed := x.session.sealResponse(x.counter, x.status, p.body)
		return bodyResponse(phaseResponseBody, sealed, nil), true, nil
	case x.route == routeTransport && !x.seen && p.kind == phaseResponseHeaders:
		// Envoy's own answer to a request we never saw, not even its
		// headers: a filter ahead of us replied (the per-source limit's
		// 429), so nothing reached the frontend and there is nothing to
		// seal. It goes out as Envoy made it, the edge's word in clear.
		x.local = true
		return headersResponse(phaseResponseHeaders, nil), p.endOfStream, nil
	case x.route == routeTransport && x.local && p.kind == phaseResponseBody:
		return passBody(), true, nil
	}
	// Envoy sends nothing else in the modes it is configured with; refuse
	// rather than pass anything through that we did not look at.
	return nil, true, errNotNoise()
}

func (x *exchange) handshake(message1 []byte) ([]byte, error) {
	s, message2, err := respond(x.p.key, message1)
	if err != nil {
		return nil, err
	}
	x.p.sessions.add(s)
	x.p.metrics.handshake()
	body := append(append(make([]byte, 0, sessionIDLen+len(message2)), s.id[:]...), message2...)
	return immediateResponse(200, body, "application/octet-stream"), nil
}

func (x *exchange) open(body []byte) ([]byte, error) {
	if len(body) <= sessionIDLen {
		return nil, errUnknownSession("missing session id")
	}
	s, err := x.p.sessions.get(body[:sessionIDLen])
	if err != nil {
		return nil, err
	}
	counter, path, auth, payload, err := s.openRequest(body[sessionIDLen:])
	if err != nil {
		x.p.sessions.close(s.id) // tampering ends the session
		return nil, err
	}
	x.session, x.counter = s, counter
	headers := headerMutation([]header{
		{":path", []byte(path)}, {"authorization", []byte(auth)},
		{"content-type", []byte("application/json")},
		{"content-length", []byte(strconv.Itoa(len(payload)))},
		{deviceHeader, []byte(base64.StdEncoding.EncodeToString(s.peer))},
	}, deviceHeader) // Envoy removes before it sets: every client copy goes, then ours
	return bodyResponse(phaseRequestBody, payload, headers), nil
}
