package rlease

import (
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keygate/keygate/authz/ratelimit"
	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/money"
	"github.com/keygate/keygate/keystore/rconn/rconntest"
)

// benchKeys is how many keys the parallel benchmarks spread over: each
// goroutine takes its own, as Checks of different keys do.
const benchKeys = 64

// BenchmarkSpend measures Spend: "covered" when the key's lease covers the
// price (the hot path: no Redis, no allocation), "steady" with real leases
// of 64 prices far from exhaustion (one Redis call per 64 Spends).
func BenchmarkSpend(b *testing.B) {
	srv := rconntest.Start(b)
	c := dial(b, srv)
	a := newAdmin(b, c)
	a.account("a", money.Max/2)
	var keys []*keystore.Key
	for i := range benchKeys {
		keys = append(keys, a.key(fmt.Sprintf("k%d", i), "a", 0))
	}
	l := ledger(b, c, LedgerOptions{ReplicaID: "bench"})
	for _, k := range keys {
		if err := l.Spend(k, 1); err != nil {
			b.Fatal(err)
		}
	}
	run := func(b *testing.B) {
		var next atomic.Int64
		before := c.Commands()
		b.ReportAllocs()
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			k := keys[next.Add(1)%benchKeys]
			for pb.Next() {
				if err := l.Spend(k, 100); err != nil {
					b.Error(err)
					return
				}
			}
		})
		b.StopTimer()
		b.ReportMetric(float64(c.Commands()-before)/float64(b.N), "redis-calls/op")
	}
	b.Run("covered", func(b *testing.B) {
		for _, k := range keys { // a lease no benchmark run can spend
			s := l.keys.get(k.ID)
			s.mu.Lock()
			s.lease = money.Max / 4
			s.mu.Unlock()
		}
		run(b)
	})
	b.Run("steady", func(b *testing.B) {
		for _, k := range keys {
			s := l.keys.get(k.ID)
			s.mu.Lock()
			s.lease = 0
			s.mu.Unlock()
		}
		run(b)
	})
}

// BenchmarkAllow measures Allow: "covered" when the key's token lease
// covers the request, "steady" with real leases of 5% of a large limit.
func BenchmarkAllow(b *testing.B) {
	srv := rconntest.Start(b)
	c := dial(b, srv)
	l := newLimiter(c, LimiterOptions{ReplicaID: "bench"})
	r := ratelimit.Rate{N: 1_000_000_000, Per: time.Minute}
	var keys []string
	for i := range benchKeys {
		keys = append(keys, fmt.Sprintf("k%d", i))
		l.Allow(keys[i], r, time.Now())
	}
	run := func(b *testing.B) {
		var next atomic.Int64
		before := c.Commands()
		b.ReportAllocs()
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			k := keys[next.Add(1)%benchKeys]
			for pb.Next() {
				if !l.Allow(k, r, time.Now()).OK {
					b.Error("refused")
					return
				}
			}
		})
		b.StopTimer()
		b.ReportMetric(float64(c.Commands()-before)/float64(b.N), "redis-calls/op")
	}
	b.Run("covered", func(b *testing.B) {
		for _, k := range keys {
			bk := l.buckets.get(k)
			bk.mu.Lock()
			bk.tokens = 1 << 60
			bk.mu.Unlock()
		}
		run(b)
	})
	b.Run("steady", func(b *testing.B) {
		for _, k := range keys {
			bk := l.buckets.get(k)
			bk.mu.Lock()
			bk.tokens = 0
			bk.mu.Unlock()
		}
		run(b)
	})
}
