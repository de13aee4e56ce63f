package ratelimit

import (
	"math"
	"math/rand/v2"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"
	"unsafe"

	"github.com/google/go-cmp/cmp"
)

var t0 = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

var perMinute10 = Rate{N: 10, Per: time.Minute} // T = 6s, burst 10

func TestAllowBurstThenDeny(t *testing.T) {
	l := NewLimiter()
	for i := int64(1); i <= 10; i++ {
		got := l.Allow("k", perMinute10, t0)
		want := Decision{OK: true, Limit: 10, Remaining: 10 - i, Reset: time.Duration(i) * 6 * time.Second}
		if diff := cmp.Diff(want, got); diff != "" {
			t.Fatalf("request %d (-want +got):\n%s", i, diff)
		}
	}
	got := l.Allow("k", perMinute10, t0)
	want := Decision{OK: false, Limit: 10, Remaining: 0, Reset: time.Minute, RetryAfter: 6 * time.Second}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Fatalf("request 11 (-want +got):\n%s", diff)
	}
	// A denial takes nothing: asking again changes nothing.
	if again := l.Allow("k", perMinute10, t0); again != got {
		t.Errorf("a second denied request = %+v, want %+v", again, got)
	}
}

func TestAllowRefill(t *testing.T) {
	l := NewLimiter()
	for range 10 {
		l.Allow("k", perMinute10, t0)
	}
	tests := []struct {
		name string
		at   time.Duration // since t0
		want Decision
	}{
		{"just before one token", 6*time.Second - 1, Decision{Limit: 10, Reset: 54*time.Second + 1, RetryAfter: 1}},
		{"one token back", 6 * time.Second, Decision{OK: true, Limit: 10, Remaining: 0, Reset: time.Minute}},
		{"taken again", 6 * time.Second, Decision{Limit: 10, Reset: time.Minute, RetryAfter: 6 * time.Second}},
		{"half a token later", 9 * time.Second, Decision{Limit: 10, Reset: 57 * time.Second, RetryAfter: 3 * time.Second}},
		{"two tokens back, one taken", 18 * time.Second, Decision{OK: true, Limit: 10, Remaining: 1, Reset: 54 * time.Second}},
		{"full bucket", 10 * time.Minute, Decision{OK: true, Limit: 10, Remaining: 9, Reset: 6 * time.Second}},
	}
	for _, tt := range tests {
		got := l.Allow("k", perMinute10, t0.Add(tt.at))
		if diff := cmp.Diff(tt.want, got); diff != "" {
			t.Errorf("%s, at t0+%v (-want +got):\n%s", tt.name, tt.at, diff)
		}
	}
}

func TestAllowSustainedRate(t *testing.T) {
	// After the burst, one request per T is allowed indefinitely, and never
	// two: N per minute sustained.
	l := NewLimiter()
	for range 10 {
		l.Allow("k", perMinute10, t0)
	}
	now := t0
	for i := range 100 {
		now = now.Add(6 * time.Second)
		if d := l.Allow("k", perMinute10, now); !d.OK {
			t.Fatalf("tick %d: denied %+v", i, d)
		}
		if d := l.Allow("k", perMinute10, now); d.OK {
			t.Fatalf("tick %d: a second request allowed %+v", i, d)
		}
	}
}

func TestAllowZeroRate(t *testing.T) {
	l := NewLimiter()
	for range 1000 {
		if got := l.Allow("k", Rate{}, t0); got != (Decision{OK: true}) {
			t.Fatalf("Allow with the zero Rate = %+v, want {OK: true}", got)
		}
	}
	if n := l.Len(); n != 0 {
		t.Errorf("the zero Rate made %d buckets, want none", n)
	}
}

func TestAllowKeysIndependent(t *testing.T) {
	l := NewLimiter()
	one := Rate{N: 1, Per: time.Hour}
	if d := l.Allow("a", one, t0); !d.OK {
		t.Fatalf("a: first request denied: %+v", d)
	}
	if d := l.Allow("a", one, t0); d.OK {
		t.Fatalf("a: second request allowed: %+v", d)
	}
	for i := range 1000 {
		k := "b" + strconv.Itoa(i)
		if d := l.Allow(k, one, t0); !d.OK {
			t.Fatalf("%s: denied after a was exhausted: %+v", k, d)
		}
	}
	if d := l.Allow("a", one, t0); d.OK {
		t.Fatalf("a: allowed after other keys were used: %+v", d)
	}
}

func TestAllowConcurrentOneKey(t *testing.T) {
	l := NewLimiter()
	checkConcurrentOneKey(t, func(r Rate) Decision { return l.Allow("hot", r, t0) })
}

// checkConcurrentOneKey has 16 goroutines ask allow for one key's requests
// at the same instant: exactly N are allowed, and each allowed request
// sees a different Remaining, N-1 down to 0: no token is spent twice. The
// bucket is large, so that the goroutines contend for a while before it
// is empty.
func checkConcurrentOneKey(t *testing.T, allow func(Rate) Decision) {
	t.Helper()
	const n = 50_000
	r := Rate{N: n, Per: time.Minute}
	var (
		wg        sync.WaitGroup
		mu        sync.Mutex
		remaining []int64
		start     = make(chan struct{})
	)
	for range 16 {
		wg.Go(func() {
			<-start
			var mine []int64
			for range n / 10 {
				if d := allow(r); d.OK {
					mine = append(mine, d.Remaining)
				} else if d.RetryAfter <= 0 {
					t.Errorf("denied with RetryAfter %v", d.RetryAfter)
				}
			}
			mu.Lock()
			remaining = append(remaining, mine...)
			mu.Unlock()
		})
	}
	close(start)
	wg.Wait()
	if len(remaining) != n {
		t.Fatalf("allowed %d requests, want exactly %d", len(remaining), n)
	}
	slices.Sort(remaining)
	for i, got := range remaining {
		if got != int64(i) {
			t.Fatalf("Remaining values are not 0..%d: sorted[%d] = %d", n-1, i, got)
		}
	}
}

func TestAllowConcurrentManyKeys(t *testing.T) {
	// Keys spread over every shard, each asked from several goroutines.
	const keys, n = 256, 7
	r := Rate{N: n, Per: time.Hour}
	l := NewLimiter()
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		allowed = map[string]int{}
	)
	for g := range 16 {
		wg.Go(func() {
			got := map[string]int{}
			for i := range keys * 3 {
				k := "key-" + strconv.Itoa((i+g)%keys)
				if l.Allow(k, r, t0).OK {
					got[k]++
				}
			}
			mu.Lock()
			for k, c := range got {
				allowed[k] += c
			}
			mu.Unlock()
		})
	}
	wg.Wait()
	if len(allowed) != keys {
		t.Fatalf("%d keys allowed anything, want %d", len(allowed), keys)
	}
	for k, c := range allowed {
		if c != n {
			t.Errorf("%s: %d allowed, want %d", k, c, n)
		}
	}
}

func TestAllowExtremeRates(t *testing.T) {
	tests := []struct {
		name  string
		rate  Rate
		now   time.Time
		first Decision
	}{
		{"1/d", Rate{N: 1, Per: 24 * time.Hour}, t0,
			Decision{OK: true, Limit: 1, Remaining: 0, Reset: 24 * time.Hour}},
		{"1e9/s", Rate{N: 1e9, Per: time.Second}, t0,
			Decision{OK: true, Limit: 1e9, Remaining: 1e9 - 1, Reset: 1}},
		{"1e9/d", Rate{N: 1e9, Per: 24 * time.Hour}, t0,
			Decision{OK: true, Limit: 1e9, Remaining: 1e9 - 1, Reset: 86400}},
		{"1/d in 2200", Rate{N: 1, Per: 24 * time.Hour}, time.Date(2200, 1, 1, 0, 0, 0, 0, time.UTC),
			Decision{OK: true, Limit: 1, Remaining: 0, Reset: 24 * time.Hour}},
		{"1/d before 1970", Rate{N: 1, Per: 24 * time.Hour}, time.Date(1960, 1, 1, 0, 0, 0, 0, time.UTC),
			Decision{OK: true, Limit: 1, Remaining: 0, Reset: 24 * time.Hour}},
		// Rates ParseRate refuses are made safe, not trusted.
		{"negative N", Rate{N: -5, Per: time.Second}, t0, Decision{OK: true}},
		{"zero Per", Rate{N: 5, Per: 0}, t0, Decision{OK: true, Limit: 5, Remaining: 4, Reset: 1}},
		{"negative Per", Rate{N: 5, Per: -time.Hour}, t0, Decision{OK: true, Limit: 5, Remaining: 4, Reset: 1}},
		{"N beyond 1e9", Rate{N: math.MaxInt64, Per: time.Second}, t0,
			Decision{OK: true, Limit: math.MaxInt64, Remaining: 1e9 - 1, Reset: 1}},
		{"huge Per", Rate{N: 2, Per: math.MaxInt64}, t0,
			Decision{OK: true, Limit: 2, Remaining: 1, Reset: maxPer / 2}},
		{"everything huge", Rate{N: math.MaxInt64, Per: math.MaxInt64}, time.Date(2150, 1, 1, 0, 0, 0, 0, time.UTC),
			Decision{OK: true, Limit: math.MaxInt64, Remaining: 1e9 - 1, Reset: maxPer / 1e9}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := NewLimiter()
			if diff := cmp.Diff(tt.first, l.Allow("k", tt.rate, tt.now)); diff != "" {
				t.Errorf("first request (-want +got):\n%s", diff)
			}
			// Drain whatever is left of a small bucket; a large one just
			// keeps answering sanely.
			for range 3 {
				d := l.Allow("k", tt.rate, tt.now)
				if d.Remaining < 0 || d.Reset < 0 || d.RetryAfter < 0 || (!d.OK && d.RetryAfter == 0) {
					t.Fatalf("insane decision %+v", d)
				}
			}
		})
	}
}

func TestAllowRateChange(t *testing.T) {
	// A key's limit can change between requests (an operator lowers it); the
	// bucket carries over without overflow or a negative Remaining.
	l := NewLimiter()
	fast, slow := Rate{N: 1e9, Per: time.Second}, Rate{N: 1, Per: 24 * time.Hour}
	for range 1000 {
		l.Allow("k", fast, t0)
	}
	// 1000 fast requests put tat 1µs ahead: the slow rate (no burst beyond
	// one) must wait that out, then allows one per day.
	if got, want := l.Allow("k", slow, t0), (Decision{Limit: 1, Reset: time.Microsecond, RetryAfter: time.Microsecond}); got != want {
		t.Fatalf("slow after fast = %+v, want %+v", got, want)
	}
	if d := l.Allow("k", slow, t0.Add(time.Microsecond)); !d.OK || d.Remaining != 0 || d.Reset != 24*time.Hour {
		t.Fatalf("slow, once the fast burst is paid = %+v", d)
	}
	d := l.Allow("k", fast, t0.Add(time.Microsecond))
	if d.OK || d.Remaining != 0 || d.RetryAfter <= 0 {
		t.Fatalf("fast after a day's slow token = %+v, want a denial (a day ahead is beyond a 1s burst)", d)
	}
}

// TestAllowModel drives random keys, rates and clock steps and checks each
// decision against the token bucket's contract.
func TestAllowModel(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	rates := []Rate{{N: 1, Per: time.Second}, {N: 3, Per: time.Second}, {N: 7, Per: time.Minute}, {N: 60, Per: time.Minute}, {N: 1000, Per: time.Hour}}
	for _, r := range rates {
		t.Run(r.String(), func(t *testing.T) {
			l := NewLimiter()
			T := r.Per / time.Duration(r.N)
			now := t0
			allowed := int64(0)
			for range 20000 {
				switch rng.IntN(4) {
				case 0:
					now = now.Add(time.Duration(rng.Int64N(int64(T))))
				case 1:
					now = now.Add(time.Duration(rng.Int64N(int64(3 * T))))
				}
				d := l.Allow("k", r, now)
				if d.Limit != r.N || d.Remaining < 0 || d.Remaining >= r.N || d.Reset < 0 || d.Reset > r.Per {
					t.Fatalf("at %v: out of range %+v", now.Sub(t0), d)
				}
				if !d.OK {
					if d.RetryAfter <= 0 || d.RetryAfter > T || d.Remaining != 0 {
						t.Fatalf("at %v: denial %+v", now.Sub(t0), d)
					}
					// Just before RetryAfter: still denied; at it: allowed.
					if d.RetryAfter > 1 {
						if e := l.Allow("k", r, now.Add(d.RetryAfter-1)); e.OK {
							t.Fatalf("at %v: allowed 1ns before RetryAfter %v", now.Sub(t0), d.RetryAfter)
						}
					}
					now = now.Add(d.RetryAfter)
					if e := l.Allow("k", r, now); !e.OK {
						t.Fatalf("at %v: denied at RetryAfter: %+v", now.Sub(t0), e)
					}
					allowed++
					continue
				}
				allowed++
				// Never more than the burst plus what refilled since t0.
				if limit := r.N + int64(now.Sub(t0)/T); allowed > limit {
					t.Fatalf("at %v: %d allowed, bucket allows at most %d", now.Sub(t0), allowed, limit)
				}
			}
		})
	}
}

func TestAllowRemainingIsExact(t *testing.T) {
	// Whatever the bucket's state, Remaining is how many more requests the
	// same instant allows.
	r := Rate{N: 7, Per: time.Minute}
	for step := time.Duration(0); step < 2*time.Minute; step += 1700 * time.Millisecond {
		l := NewLimiter()
		for range 7 {
			l.Allow("k", r, t0)
		}
		d := l.Allow("k", r, t0.Add(step))
		if !d.OK {
			continue
		}
		more := int64(0)
		for l.Allow("k", r, t0.Add(step)).OK {
			more++
		}
		if more != d.Remaining {
			t.Errorf("at t0+%v: Remaining %d, but %d more were allowed", step, d.Remaining, more)
		}
	}
}

func TestSweep(t *testing.T) {
	l := NewLimiter()
	for range 10 {
		l.Allow("busy", perMinute10, t0) // full again at t0+60s
	}
	l.Allow("idle", perMinute10, t0) // full again at t0+6s
	l.Allow("free", Rate{}, t0)      // no bucket at all

	tests := []struct {
		at          time.Duration
		wantRemoved int
		wantLen     int
	}{
		{0, 0, 2},
		{6*time.Second - 1, 0, 2},
		{6 * time.Second, 1, 1},
		{59 * time.Second, 0, 1},
		{time.Minute, 1, 0},
		{time.Hour, 0, 0},
	}
	for _, tt := range tests {
		if got := l.Sweep(t0.Add(tt.at)); got != tt.wantRemoved {
			t.Errorf("Sweep(t0+%v) = %d, want %d", tt.at, got, tt.wantRemoved)
		}
		if got := l.Len(); got != tt.wantLen {
			t.Errorf("after Sweep(t0+%v): Len = %d, want %d", tt.at, got, tt.wantLen)
		}
	}
	// A swept key starts again with a full bucket, as it had one anyway.
	if d := l.Allow("busy", perMinute10, t0.Add(time.Hour)); !d.OK || d.Remaining != 9 {
		t.Errorf("swept key = %+v, want a full bucket", d)
	}
}

func TestSweepConcurrentWithAllow(t *testing.T) {
	l := NewLimiter()
	r := Rate{N: 1, Per: time.Second}
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 2000 {
				l.Allow(strconv.Itoa(g*10000+i%100), r, t0.Add(time.Duration(i)*time.Millisecond))
			}
		})
	}
	wg.Go(func() {
		for i := range 200 {
			l.Sweep(t0.Add(time.Duration(i) * 10 * time.Millisecond))
		}
	})
	wg.Wait()
	l.Sweep(t0.Add(time.Hour))
	if n := l.Len(); n != 0 {
		t.Errorf("after sweeping an hour later: %d buckets left", n)
	}
}

func TestAllowDoesNotAllocate(t *testing.T) {
	l := NewLimiter()
	r := Rate{N: 1e9, Per: time.Second}
	key := "existing-key"
	l.Allow(key, r, t0)
	now := t0
	allocs := testing.AllocsPerRun(1000, func() {
		now = now.Add(time.Microsecond)
		l.Allow(key, r, now)
	})
	if allocs != 0 {
		t.Errorf("Allow on an existing bucket: %v allocations, want 0", allocs)
	}
}

func TestShardPadding(t *testing.T) {
	if size := unsafe.Sizeof(shard{}); size%cacheLine != 0 {
		t.Errorf("shard is %d bytes, not a multiple of %d: neighbouring locks share a cache line", size, cacheLine)
	}
}

func BenchmarkAllow(b *testing.B) {
	r := Rate{N: 1e9, Per: time.Second}
	keys := make([]string, 10000)
	for i := range keys {
		keys[i] = "key-" + strconv.Itoa(i)
	}
	b.Run("serial", func(b *testing.B) {
		l := NewLimiter()
		l.Allow(keys[0], r, t0)
		now := t0
		b.ReportAllocs()
		for b.Loop() {
			now = now.Add(time.Microsecond)
			l.Allow(keys[0], r, now)
		}
	})
	b.Run("parallel/one_hot_key", func(b *testing.B) {
		l := NewLimiter()
		l.Allow(keys[0], r, t0)
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			now := t0
			for pb.Next() {
				now = now.Add(time.Microsecond)
				l.Allow(keys[0], r, now)
			}
		})
	})
	b.Run("parallel/many_keys", func(b *testing.B) {
		l := NewLimiter()
		for _, k := range keys {
			l.Allow(k, r, t0)
		}
		manyKeys(b, len(keys), func(i int, now time.Time) { l.Allow(keys[i], r, now) })
	})
	b.Run("parallel/denied", func(b *testing.B) {
		l := NewLimiter()
		slow := Rate{N: 1, Per: 24 * time.Hour}
		for _, k := range keys {
			l.Allow(k, slow, t0)
		}
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			i := rand.IntN(len(keys))
			for pb.Next() {
				l.Allow(keys[i], slow, t0)
				i++
				if i == len(keys) {
					i = 0
				}
			}
		})
	})
}

func BenchmarkSweep(b *testing.B) {
	r := Rate{N: 1, Per: time.Second}
	l := NewLimiter()
	for i := range 10000 {
		l.Allow("key-"+strconv.Itoa(i), r, t0)
	}
	b.ReportAllocs()
	for b.Loop() {
		l.Sweep(t0) // nothing idle yet: measures the scan
	}
}

// manyKeys has every goroutine call allow over n keys in turn, each from
// elsewhere, with a clock that moves a microsecond a call.
func manyKeys(b *testing.B, n int, allow func(i int, now time.Time)) {
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		now := t0
		i := rand.IntN(n)
		for pb.Next() {
			now = now.Add(time.Microsecond)
			allow(i, now)
			if i++; i == n {
				i = 0
			}
		}
	})
}
