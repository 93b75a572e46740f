package main

import (
	"container/list"
	"sync"
	"time"
)

// sessions is the bounded, expiring session table: oldest dropped first.
type sessions struct {
	mu    sync.Mutex
	byID  map[[sessionIDLen]byte]*list.Element
	order *list.List // of *session, oldest at the front
	max   int
	ttl   time.Duration
}

func newSessions(max int, ttl time.Duration) *sessions {
	return &sessions{byID: map[[sessionIDLen]byte]*list.Element{}, order: list.New(), max: max, ttl: ttl}
}

func (t *sessions) add(s *session) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.byID[s.id] = t.order.PushBack(s)
	for t.order.Len() > t.max {
		oldest := t.order.Remove(t.order.Front()).(*session)
		delete(t.byID, oldest.id)
	}
}

func (t *sessions) get(id []byte) (*session, error) {
	var key [sessionIDLen]byte
	copy(key[:], id)
	t.mu.Lock()
	defer t.mu.Unlock()
	e, ok := t.byID[key]
	if ok && time.Since(e.Value.(*session).created) <= t.ttl {
		return e.Value.(*session), nil
	}
	if ok {
		t.order.Remove(e)
		delete(t.byID, key)
	}
	return nil, errUnknownSession("unknown or expired Noise session: handshake again")
}

func (t *sessions) close(id [sessionIDLen]byte) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if e, ok := t.byID[id]; ok {
		t.order.Remove(e)
		delete(t.byID, id)
	}
}

func (t *sessions) len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.order.Len()
}
