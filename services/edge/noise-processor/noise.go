package main

// Noise_IK_25519_ChaChaPoly_SHA256, the responder's side; the wire format is
// docs/edge.md's and the initiator is bkv_edge/noise.py (the SDK's).
//
//	request body  = session_id | u64 counter | ChaCha20-Poly1305(k_c2s, nonce(counter), inner, aad = session_id)
//	inner         = u16 len | path | u16 len | authorization | body
//	response body = ChaCha20-Poly1305(k_s2c, nonce(counter), padded, aad = session_id)
//	padded        = u16 status | u32 len | body | zero bytes up to paddedSize (below)
//
// Counters are explicit because requests on one session may arrive out of
// order; each is accepted once, within a window below the highest seen.

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"sync"
	"time"

	"github.com/flynn/noise"
	"golang.org/x/crypto/curve25519"
)

const (
	sessionIDLen = 16
	window       = 4096
)

var (
	prologue    = []byte("bkv/v1/noise")
	cipherSuite = noise.NewCipherSuite(noise.DH25519, noise.CipherChaChaPoly, noise.HashSHA256)
)

// staticKey is the edge's X25519 static key pair; its String never shows the key.
type staticKey struct{ pair noise.DHKey }

func (staticKey) String() string { return "staticKey(redacted)" }

func newStaticKey(private []byte) (staticKey, error) {
	public, err := curve25519.X25519(private, curve25519.Basepoint)
	if err != nil {
		return staticKey{}, err
	}
	return staticKey{noise.DHKey{Private: append([]byte(nil), private...), Public: public}}, nil
}

type session struct {
	id         [sessionIDLen]byte
	recv, send noise.Cipher
	peer       []byte
	created    time.Time

	mu     sync.Mutex
	replay replayWindow
}

// replayWindow remembers which of the last `window` counters below the
// highest one were accepted: a fixed 512-byte bitmap per session, so a
// client cannot grow the processor's memory by spreading its counters.
type replayWindow struct {
	bits [window / 64]uint64
	high uint64
	any  bool // a counter has been accepted (high is meaningful)
}

func (w *replayWindow) fresh(c uint64) bool {
	if !w.any || c > w.high {
		return true
	}
	if w.high-c >= window {
		return false // too old to tell: refused
	}
	return w.bits[(c/64)%(window/64)]&(1<<(c%64)) == 0
}

func (w *replayWindow) mark(c uint64) {
	if !w.any || c > w.high {
		if !w.any || c-w.high >= window {
			w.bits = [window / 64]uint64{}
		} else {
			for n := w.high + 1; n < c; n++ { // counters skipped over are not seen yet
				w.bits[(n/64)%(window/64)] &^= 1 << (n % 64)
			}
		}
		w.high, w.any = c, true
	}
	w.bits[(c/64)%(window/64)] |= 1 << (c % 64)
}

func (s *session) String() string { return "session(keys redacted)" }

// respond reads IK message 1 and answers with message 2.
func respond(key staticKey, message1 []byte) (*session, []byte, error) {
	hs, err := noise.NewHandshakeState(noise.Config{CipherSuite: cipherSuite, Pattern: noise.HandshakeIK,
		Initiator: false, Prologue: prologue, StaticKeypair: key.pair, Random: rand.Reader})
	if err != nil {
		return nil, nil, err
	}
	payload, _, _, err := hs.ReadMessage(nil, message1)
	if err != nil {
		return nil, nil, errHandshake("the handshake does not verify for this edge key")
	}
	if len(payload) > 0 {
		return nil, nil, errHandshake("no application data is accepted in the handshake")
	}
	message2, c2s, s2c, err := hs.WriteMessage(nil, nil)
	if err != nil || c2s == nil {
		return nil, nil, errHandshake("the handshake does not verify for this edge key")
	}
	s := &session{recv: c2s.Cipher(), send: s2c.Cipher(), peer: hs.PeerStatic(), created: time.Now()}
	if _, err := rand.Read(s.id[:]); err != nil {
		return nil, nil, err
	}
	return s, message2, nil
}

// openRequest authenticates one request and returns its counter and inner parts.
func (s *session) openRequest(sealed []byte) (counter uint64, path, auth string, payload []byte, err error) {
	if len(sealed) < 8+16 {
		return 0, "", "", nil, errBadMessage("message too short")
	}
	counter = binary.BigEndian.Uint64(sealed[:8])
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.replay.fresh(counter) {
		return 0, "", "", nil, errBadMessage("replayed or too old")
	}
	inner, err := s.recv.Decrypt(nil, counter, s.id[:], sealed[8:])
	if err != nil {
		return 0, "", "", nil, errBadMessage("ciphertext failed authentication")
	}
	s.replay.mark(counter) // only once it authenticated
	rawPath, rest, ok := cut(inner)
	rawAuth, body, ok2 := cut(rest)
	if !ok || !ok2 || !headerSafe(rawPath) || !headerSafe(rawAuth) {
		return 0, "", "", nil, errBadMessage("malformed inner request")
	}
	if !bytes.HasPrefix(rawPath, []byte("/v1/")) {
		return 0, "", "", nil, errBadMessage("only the v1 API is reachable through Noise")
	}
	return counter, string(rawPath), string(rawAuth), body, nil
}

// Answers are padded inside the seal to a few sizes so that their outer
// length tells no outcome apart (a missing record from a live one, a wrong
// guess from a right one): 2 KiB holds every vault answer with room to grow
// (the largest, a recovery start on a live record, is under 1 KiB), then
// each rung is 4x the last, then multiples of the last rung.
const (
	answerHeaderLen = 2 + 4
	largestRung     = 32 << 10
)

var paddingRungs = [...]int{2 << 10, 8 << 10, largestRung}

// paddedSize is the sealed plaintext's length for n bytes of status, length and body.
func paddedSize(n int) int {
	for _, rung := range paddingRungs {
		if n <= rung {
			return rung
		}
	}
	return (n + largestRung - 1) / largestRung * largestRung
}

// sealResponse seals the inner status and body, padded, with the request's
// counter under the other key.
func (s *session) sealResponse(counter uint64, status int, body []byte) []byte {
	plain := make([]byte, answerHeaderLen, paddedSize(answerHeaderLen+len(body)))
	binary.BigEndian.PutUint16(plain, uint16(status))
	binary.BigEndian.PutUint32(plain[2:], uint32(len(body)))
	plain = append(plain, body...)
	plain = plain[:cap(plain)] // the padding: zeros, as make left them
	return s.send.Encrypt(make([]byte, 0, len(plain)+16), counter, s.id[:], plain)
}

// cut splits a u16-length-prefixed field off the front.
func cut(b []byte) ([]byte, []byte, bool) {
	if len(b) < 2 {
		return nil, nil, false
	}
	n := int(binary.BigEndian.Uint16(b))
	if len(b) < 2+n {
		return nil, nil, false
	}
	return b[2 : 2+n], b[2+n:], true
}

// headerSafe: printable ASCII only -- these become HTTP header values.
func headerSafe(b []byte) bool {
	for _, c := range b {
		if c < 0x20 || c > 0x7e {
			return false
		}
	}
	return true
}
