package main

import (
	"math/rand"
	"testing"
)

// The bitmap window accepts exactly what a set of every accepted counter
// with the same "too old" rule would (the rule docs/edge.md states).
func TestReplayWindowAgreesWithASetOfSeenCounters(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	for run := 0; run < 200; run++ {
		var w replayWindow
		seen := map[uint64]bool{}
		var high uint64
		any := false
		base := uint64(rng.Intn(3)) * window
		for i := 0; i < 2000; i++ {
			var c uint64
			switch rng.Intn(4) {
			case 0:
				c = high + uint64(rng.Intn(3*window)) // ahead, sometimes far ahead
			case 1:
				c = base + uint64(rng.Intn(window)) // around the start
			default:
				c = high - uint64(rng.Intn(window+50)) // behind, sometimes too far
				if c > high {
					c = 0
				}
			}
			want := !seen[c] && !(any && high-c >= window && c <= high)
			if got := w.fresh(c); got != want {
				t.Fatalf("run %d step %d: counter %d (high %d): fresh=%v, want %v", run, i, c, high, got, want)
			}
			if want {
				w.mark(c)
				seen[c] = true
				if !any || c > high {
					high, any = c, true
				}
			}
		}
	}
}

// Envoy's own answer to a transport request that never reached us (the
// per-source limit's 429, made by a filter ahead of ours) passes through
// untouched: before, it met "not_found" here and the device saw a 404
// where the edge had said "retry after 1 s".
func TestEnvoysOwnAnswerToARequestWeNeverSawPassesThroughUnsealed(t *testing.T) {
	x := &exchange{p: &processor{}, route: routeTransport}
	answer, done := x.on(phase{kind: phaseResponseHeaders, status: 429, headerNames: []string{"retry-after"}})
	if done {
		t.Fatal("the body phase is still to come")
	}
	if want := headersResponse(phaseResponseHeaders, nil); string(answer) != string(want) {
		t.Fatalf("headers: got %x, want an unchanged CONTINUE %x", answer, want)
	}
	answer, done = x.on(phase{kind: phaseResponseBody, body: []byte(`{"error":{"code":"rate_limited"}}`)})
	if !done || string(answer) != string(passBody()) {
		t.Fatalf("body: got %x (done %v), want it passed unchanged", answer, done)
	}
	// A bodiless one ends the stream at its headers.
	x = &exchange{p: &processor{}, route: routeTransport}
	if _, done = x.on(phase{kind: phaseResponseHeaders, status: 429, endOfStream: true}); !done {
		t.Fatal("a bodiless local answer ends the stream")
	}
}
