package redisstore_test

import (
	"testing"
	"time"

	"github.com/keygate/keygate/keystore/rconn/rconntest"
)

// BenchmarkPropagation measures how long a key created, then revoked, on
// one replica takes to be accepted, then refused, by another: from the
// admin command's return to the other replica's Lookup (the contract is
// one second).
func BenchmarkPropagation(b *testing.B) {
	srv := rconntest.Start(b)
	a := startReplica(b, srv, "a", "")
	r := startReplica(b, srv, "b", "")
	mustAccount(b, a, "acme", 0)
	var created, revoked, worst time.Duration
	n := 0
	wait := func(cond func() bool) time.Duration {
		start := time.Now()
		for !cond() {
			if time.Since(start) > within {
				b.Fatalf("no propagation within %s", within)
			}
			time.Sleep(50 * time.Microsecond)
		}
		d := time.Since(start)
		worst = max(worst, d)
		return d
	}
	b.ReportAllocs()
	for b.Loop() {
		k, secret := mustKey(b, a, "acme")
		created += wait(func() bool { return r.accepts(secret, time.Now()) })
		if _, err := a.store.Revoke(k.ID, time.Now()); err != nil {
			b.Fatal(err)
		}
		revoked += wait(func() bool { return !r.accepts(secret, time.Now()) })
		n++
	}
	b.ReportMetric(float64(created.Microseconds())/float64(n)/1000, "ms/create")
	b.ReportMetric(float64(revoked.Microseconds())/float64(n)/1000, "ms/revoke")
	b.ReportMetric(float64(worst.Microseconds())/1000, "ms-worst")
}
