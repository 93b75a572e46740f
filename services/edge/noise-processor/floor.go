package main

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"flag"
	"io"
	"strings"
	"syscall"

	"github.com/flynn/noise"
)

// floor measures, with this processor's own code, the responder's half of an
// IK handshake and opening one request (a 200-byte body and a 300-byte token)
// and sealing its answer: the edge's part of the cryptographic floor in
// loadtest/bench.py. CPU seconds of this process per operation, as JSON.
func floor(args []string, out io.Writer) error {
	fs := flag.NewFlagSet("floor", flag.ExitOnError)
	iterations := fs.Int("iterations", 300, "operations timed of each kind")
	_ = fs.Parse(args)
	n := *iterations

	edge, err := noise.DH25519.GenerateKeypair(rand.Reader)
	if err != nil {
		return err
	}
	key := staticKey{edge}
	device, _ := noise.DH25519.GenerateKeypair(rand.Reader)
	messages := make([][]byte, n)
	for i := range messages { // the initiator's half is the client's, not timed
		hs, _ := noise.NewHandshakeState(noise.Config{CipherSuite: cipherSuite, Pattern: noise.HandshakeIK,
			Initiator: true, Prologue: prologue, StaticKeypair: device, PeerStatic: edge.Public, Random: rand.Reader})
		messages[i], _, _, _ = hs.WriteMessage(nil, nil)
	}
	start := cpuSeconds()
	var s *session
	for _, m := range messages {
		if s, _, err = respond(key, m); err != nil {
			return err
		}
	}
	handshake := (cpuSeconds() - start) / float64(n)

	path, auth := "/v1/recover/start", "Bearer "+strings.Repeat("t", 300)
	inner := binary.BigEndian.AppendUint16(nil, uint16(len(path)))
	inner = binary.BigEndian.AppendUint16(append(inner, path...), uint16(len(auth)))
	inner = append(append(inner, auth...), make([]byte, 200)...)
	sealed := make([][]byte, n)
	for i := range sealed {
		counter := uint64(i)
		sealed[i] = binary.BigEndian.AppendUint64(nil, counter)
		sealed[i] = s.recv.Encrypt(sealed[i], counter, s.id[:], inner) // as the device seals it (same key)
	}
	answer := make([]byte, 200)
	start = cpuSeconds()
	for _, m := range sealed {
		counter, _, _, _, err := s.openRequest(m)
		if err != nil {
			return err
		}
		s.sealResponse(counter, 200, answer)
	}
	request := (cpuSeconds() - start) / float64(n)
	return json.NewEncoder(out).Encode(map[string]float64{"handshake": handshake, "request": request})
}

func cpuSeconds() float64 {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
}
