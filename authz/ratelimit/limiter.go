package ratelimit

import (
	"hash/maphash"
	"math"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"
)

// numShards splits the buckets so that concurrent Checks on different keys
// rarely share a lock. A power of two, so a hash picks a shard with a mask.
const numShards = 64

// cacheLine is the padding unit between shards. 128 rather than 64 bytes:
// x86 prefetches cache lines in adjacent pairs, and arm64 servers often
// have 128-byte lines.
const cacheLine = 128

// Limiter holds one bucket per key, sharded so no Check waits on a global lock.
//
// Each bucket is one int64, the GCRA "theoretical arrival time" (tat) in unix
// nanoseconds: the moment the bucket would be full again. With the emission
// interval T = Per/N, a request at now is allowed while tat-now <= (N-1)*T,
// and an allowed request moves tat to max(tat, now)+T. This is the token
// bucket of the design (a burst of N, refilled at N per Per) in integer
// arithmetic, with no floats and no per-key timer.
//
// T is Per/N rounded down to whole nanoseconds, so the sustained rate is
// N + (Per mod N)/T per Per: exact when N divides Per in nanoseconds (500/m,
// 1e9/s, 1000/d), and otherwise over by a sliver, e.g. 7/m allows 3 extra
// requests per 8.6e9 minutes.
//
// A Limiter is safe for concurrent use; use NewLimiter to make one.
type Limiter struct {
	seed   maphash.Seed
	shards [numShards]shard
}

// shard is one lock and the buckets it guards, padded to a whole number of
// cache lines so that two shards' locks never share one (false sharing would
// make a core's Allow stall on another core's, unrelated, Allow).
type shard struct {
	shardState
	_ [cacheLine - unsafe.Sizeof(shardState{})%cacheLine]byte
}

// shardState maps a key to its bucket's place in tat rather than to the
// bucket itself, so that an Allow reads and updates it with one map lookup
// (a map of values would take a second, to store it back). Places freed by
// Sweep are reused.
type shardState struct {
	mu   sync.Mutex // guards the fields below
	at   map[string]int32
	tat  []int64 // theoretical arrival times, unix nanos
	free []int32 // places in tat no key holds
}

// NewLimiter returns a Limiter with no buckets.
func NewLimiter() *Limiter {
	l := &Limiter{seed: maphash.MakeSeed()}
	for i := range l.shards {
		l.shards[i].at = make(map[string]int32)
	}
	return l
}

// Decision is the outcome of one Allow.
type Decision struct {
	OK         bool
	Limit      int64         // r.N
	Remaining  int64         // whole requests left in the bucket after this one (>= 0)
	Reset      time.Duration // until the bucket is full again
	RetryAfter time.Duration // when !OK: until one request would be allowed (> 0)
}

// Allow takes one request from key's bucket under rate r at now. A zero Rate always allows (Limit 0).
//
// A Rate that ParseRate cannot produce is made safe rather than trusted: N < 0
// counts as no limit, N above 1e9 as 1e9, and Per is clamped to between one
// nanosecond per request and maxPer, so the arithmetic cannot overflow.
// Allow does not allocate once key has a bucket.
func (l *Limiter) Allow(key string, r Rate, now time.Time) Decision {
	if r.N <= 0 {
		return Decision{OK: true}
	}
	ns := now.UnixNano()
	s := &l.shards[maphash.String(l.seed, key)&(numShards-1)]
	s.mu.Lock()
	i, ok := s.at[key]
	if !ok {
		i = s.add(key)
		s.tat[i] = math.MinInt64 // a new bucket: full since ever
	}
	next, d := take(s.tat[i], r, ns)
	if d.OK {
		s.tat[i] = next
	}
	s.mu.Unlock()
	return d
}

// take is one request against a bucket whose theoretical arrival time is
// tat (at or before ns: a full bucket) under r, whose N is positive: the
// decision and, when it allows, the bucket's next tat.
func take(tat int64, r Rate, ns int64) (int64, Decision) {
	n, t := bucketParams(r)
	tau := (n - 1) * t // burst tolerance: how far tat may run ahead of now
	tat = max(tat, ns)
	if ahead := tat - ns; ahead > tau {
		return 0, Decision{Limit: r.N, Reset: time.Duration(ahead), RetryAfter: time.Duration(ahead - tau)}
	}
	tat += t
	ahead := tat - ns // <= tau+t = n*t, so Remaining >= 0
	return tat, Decision{OK: true, Limit: r.N, Remaining: (n*t - ahead) / t, Reset: time.Duration(ahead)}
}

// A Bucket is one key's bucket, for a caller that keeps it beside the key,
// as keystore does in each key's entry: Take then needs no map and no
// lock, and nothing to sweep, where Limiter needs all three. Its zero value
// is a full bucket; it must not be copied once used.
type Bucket struct {
	// flipped is tat with its sign bit flipped, so that the zero value
	// reads as math.MinInt64: a bucket full since ever, even for a clock
	// before 1970.
	flipped atomic.Int64
}

// Take takes one request from b under r at now, with Limiter.Allow's
// arithmetic and decisions. Concurrent Takes are safe: each allowed one
// moves tat by compare-and-swap, so no two spend the same token.
func (b *Bucket) Take(r Rate, now time.Time) Decision {
	if r.N <= 0 {
		return Decision{OK: true}
	}
	ns := now.UnixNano()
	for {
		old := b.flipped.Load()
		next, d := take(old^math.MinInt64, r, ns)
		if !d.OK || b.flipped.CompareAndSwap(old, next^math.MinInt64) {
			return d
		}
	}
}

// add gives key a place in tat and returns it; the caller sets its tat.
// The caller holds s.mu.
func (s *shardState) add(key string) int32 {
	var i int32
	if n := len(s.free); n > 0 {
		i, s.free = s.free[n-1], s.free[:n-1]
	} else {
		i = int32(len(s.tat))
		s.tat = append(s.tat, 0)
	}
	s.at[key] = i
	return i
}

// maxPer bounds a Rate's period so that unix nanoseconds plus a whole bucket
// cannot overflow an int64 before the year 2150. ParseRate's longest is a day.
const maxPer = 100 * 365 * 24 * time.Hour

// bucketParams returns the N and the emission interval T = Per/N (in
// nanoseconds, at least 1) that Allow computes with. r.N must be positive.
// N is capped at ParseRate's maxN and Per at maxPer, so N*T <= maxPer.
func bucketParams(r Rate) (n, t int64) {
	n = min(r.N, maxN)
	t = max(int64(min(max(r.Per, 0), maxPer))/n, 1)
	return n, t
}

// Sweep forgets buckets that are full again at now (idle keys), bounding memory.
func (l *Limiter) Sweep(now time.Time) int {
	ns := now.UnixNano()
	removed := 0
	for i := range l.shards {
		s := &l.shards[i]
		s.mu.Lock()
		for k, i := range s.at {
			if s.tat[i] <= ns {
				delete(s.at, k)
				s.free = append(s.free, i)
				removed++
			}
		}
		s.mu.Unlock()
	}
	return removed
}

// Len returns the number of buckets held: keys seen and not yet swept.
func (l *Limiter) Len() int {
	total := 0
	for i := range l.shards {
		s := &l.shards[i]
		s.mu.Lock()
		total += len(s.at)
		s.mu.Unlock()
	}
	return total
}
