package main

// Refusals of the Noise edge; each becomes an immediate answer from Envoy
// (the same codes as the client side's EdgeError tree in protocol/src/bkv_protocol/noise.py):
//
//	edgeError
//	├── noise_handshake_failed  400 -- not for our key, or malformed
//	├── noise_session_unknown   401 -- expired or never existed: handshake again
//	├── noise_bad_message       400 -- tampered, replayed or malformed: session closed
//	└── not_found               404 -- only the Noise paths are served

import "encoding/json"

type edgeError struct {
	status  int
	code    string
	message string
}

func (e *edgeError) Error() string { return e.message }

func errHandshake(msg string) *edgeError      { return &edgeError{400, "noise_handshake_failed", msg} }
func errUnknownSession(msg string) *edgeError { return &edgeError{401, "noise_session_unknown", msg} }
func errBadMessage(msg string) *edgeError     { return &edgeError{400, "noise_bad_message", msg} }
func errNotNoise() *edgeError {
	return &edgeError{404, "not_found", "only POST /noise/handshake and POST /noise/v1 are served here"}
}

// asEdgeError turns anything into a refusal; an error of ours keeps its code.
func asEdgeError(err error) *edgeError {
	if e, ok := err.(*edgeError); ok {
		return e
	}
	return &edgeError{400, "noise_bad_message", err.Error()}
}

// refuse counts a refusal by its code and answers it: the stream ends there.
func (p *processor) refuse(err error) []byte {
	e := asEdgeError(err)
	p.metrics.rejected(e.code)
	return e.answer()
}

func (e *edgeError) answer() []byte {
	type body struct {
		Code      string `json:"code"`
		Message   string `json:"message"`
		Retryable bool   `json:"retryable"`
	}
	data, _ := json.Marshal(map[string]body{"error": {e.code, e.message, false}})
	return immediateResponse(e.status, data, "application/json")
}
