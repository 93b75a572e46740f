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
