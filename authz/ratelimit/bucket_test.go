package ratelimit

import (
	"math"
	"math/rand/v2"
	"strconv"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// Bucket must decide exactly as Limiter does, whose arithmetic the tests
// above pin down: the same random requests (several keys, rates that
// change, clocks that jump forwards, backwards and before 1970) get the
// same decisions from both.
func TestBucketMatchesLimiter(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	rates := []Rate{
		{N: 1, Per: time.Second}, {N: 7, Per: time.Minute}, {N: 1000, Per: time.Hour},
		{N: 1, Per: 24 * time.Hour}, {N: 1e9, Per: time.Second},
		{N: 0, Per: time.Second}, {N: -3, Per: time.Second}, {N: 5, Per: 0}, {N: math.MaxInt64, Per: math.MaxInt64},
	}
	starts := []time.Time{t0, time.Date(1960, 1, 1, 0, 0, 0, 0, time.UTC), time.Unix(0, 0), time.Date(2149, 1, 1, 0, 0, 0, 0, time.UTC)}
	for _, start := range starts {
		l := NewLimiter()
		buckets := make([]Bucket, 4)
		now := start
		for i := range 20000 {
			switch rng.IntN(8) {
			case 0, 1, 2:
				now = now.Add(time.Duration(rng.Int64N(int64(2 * time.Second))))
			case 3:
				now = now.Add(-time.Duration(rng.Int64N(int64(time.Second)))) // a clock stepped back
			case 4:
				now = now.Add(time.Duration(rng.Int64N(int64(48 * time.Hour))))
			}
			k, r := rng.IntN(len(buckets)), rates[rng.IntN(len(rates))]
			want := l.Allow(strconv.Itoa(k), r, now)
			if got := buckets[k].Take(r, now); got != want {
				t.Fatalf("from %v, request %d (key %d, %v at %v): Bucket %+v, Limiter %+v", start, i, k, r, now.Sub(start), got, want)
			}
		}
	}
}

func TestBucketZeroIsFull(t *testing.T) {
	for _, now := range []time.Time{t0, time.Date(1960, 1, 1, 0, 0, 0, 0, time.UTC), time.Unix(0, 0)} {
		var b Bucket
		want := Decision{OK: true, Limit: 10, Remaining: 9, Reset: 6 * time.Second}
		if diff := cmp.Diff(want, b.Take(perMinute10, now)); diff != "" {
			t.Errorf("first Take at %v (-want +got):\n%s", now, diff)
		}
	}
}

func TestBucketConcurrent(t *testing.T) {
	var b Bucket
	checkConcurrentOneKey(t, func(r Rate) Decision { return b.Take(r, t0) })
}

func TestBucketDoesNotAllocate(t *testing.T) {
	var b Bucket
	r := Rate{N: 1e9, Per: time.Second}
	now := t0
	if allocs := testing.AllocsPerRun(1000, func() {
		now = now.Add(time.Microsecond)
		b.Take(r, now)
	}); allocs != 0 {
		t.Errorf("Take: %v allocations, want 0", allocs)
	}
}

func BenchmarkBucketTake(b *testing.B) {
	r := Rate{N: 1e9, Per: time.Second}
	buckets := make([]Bucket, 10000)
	b.Run("parallel/one_hot_key", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			now := t0
			for pb.Next() {
				now = now.Add(time.Microsecond)
				buckets[0].Take(r, now)
			}
		})
	})
	b.Run("parallel/many_keys", func(b *testing.B) {
		manyKeys(b, len(buckets), func(i int, now time.Time) { buckets[i].Take(r, now) })
	})
}
