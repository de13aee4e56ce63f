package alert

import (
	"container/heap"
	"math/rand/v2"
	"time"
)

// schedule is a min-heap of waiting entries: earliest next attempt first,
// then first scheduled, so that alerts due together go out in order.
type schedule []*entry

func (s schedule) Len() int { return len(s) }

func (s schedule) Less(i, j int) bool {
	if !s[i].next.Equal(s[j].next) {
		return s[i].next.Before(s[j].next)
	}
	return s[i].seq < s[j].seq
}

func (s schedule) Swap(i, j int) {
	s[i], s[j] = s[j], s[i]
	s[i].index, s[j].index = i, j
}

// Push and Pop are heap.Interface's; use push and pop.
func (s *schedule) Push(x any) {
	e := x.(*entry)
	e.index = len(*s)
	*s = append(*s, e)
}

func (s *schedule) Pop() any {
	old := *s
	e := old[len(old)-1]
	old[len(old)-1] = nil
	*s = old[:len(old)-1]
	e.index = -1
	return e
}

func (s *schedule) push(e *entry) { heap.Push(s, e) }
func (s *schedule) pop() *entry   { return heap.Pop(s).(*entry) }

// recentIDs remembers the last IDs added, up to a bound: alerts acked
// lately, so that a Notify that comes after the outbox scan already
// delivered the alert sends nothing.
type recentIDs struct {
	ring []string
	next int // where the next ID goes once the ring is full
	set  map[string]struct{}
}

func newRecentIDs(size int) recentIDs {
	return recentIDs{ring: make([]string, 0, size), set: make(map[string]struct{}, size)}
}

func (r *recentIDs) has(id string) bool {
	_, ok := r.set[id]
	return ok
}

func (r *recentIDs) add(id string) {
	if r.has(id) {
		return
	}
	if len(r.ring) < cap(r.ring) {
		r.ring = append(r.ring, id)
	} else {
		delete(r.set, r.ring[r.next])
		r.ring[r.next] = id
		r.next = (r.next + 1) % len(r.ring)
	}
	r.set[id] = struct{}{}
}

// backoff is the wait after the nth failure in a row: the minimum doubling
// up to the maximum, less up to half of it at random, so that alerts that
// failed together do not all come back together.
func (n *Notifier) backoff(failures int) time.Duration {
	d := n.minWait
	for i := 1; i < failures && d < n.maxWait; i++ {
		if d > n.maxWait/2 {
			d = n.maxWait
		} else {
			d *= 2
		}
	}
	d = min(d, n.maxWait)
	return d - rand.N(d/2+1)
}
