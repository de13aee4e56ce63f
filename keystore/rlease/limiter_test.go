package rlease

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/keygate/keygate/authz/ratelimit"
	"github.com/keygate/keygate/keystore/rconn/rconntest"
)

// limiters makes n Limiters, each with its own connection to srv, as n
// replicas would have.
func limiters(t testing.TB, srv *rconntest.Server, n int, clk *clock) []*Limiter {
	t.Helper()
	var ls []*Limiter
	for i := range n {
		ls = append(ls, NewLimiter(dial(t, srv), LimiterOptions{ReplicaID: fmt.Sprintf("r%d", i), Now: clk.Now}))
	}
	return ls
}

// hammer runs perLimiter concurrent Allows on each limiter for key at now
// and returns how many were allowed.
func hammer(ls []*Limiter, key string, r ratelimit.Rate, now time.Time, perLimiter int) int {
	var allowed atomic.Int64
	var wg sync.WaitGroup
	for _, l := range ls {
		for range perLimiter {
			wg.Go(func() {
				if l.Allow(key, r, now).OK {
					allowed.Add(1)
				}
			})
		}
	}
	wg.Wait()
	return int(allowed.Load())
}

// TestLimiterBurstBound: three replicas hammering one key at one instant
// are allowed at most N + (3−1)·lease together; as every replica keeps
// asking, the leases are all spent, so exactly N.
func TestLimiterBurstBound(t *testing.T) {
	srv := rconntest.Start(t)
	clk := newClock()
	ls := limiters(t, srv, 3, clk)
	r := ratelimit.Rate{N: 100, Per: time.Minute}
	lease := int(leaseSize(r.N))
	got := hammer(ls, "k", r, clk.Now(), 100)
	if got > int(r.N)+2*lease {
		t.Errorf("allowed %d at one instant, above N + 2·lease = %d", got, int(r.N)+2*lease)
	}
	if got != int(r.N) {
		t.Errorf("allowed %d at one instant with every replica asking, want N = %d", got, r.N)
	}
}

// TestLimiterWindow: three replicas hammering one key through its first
// window (clock steps of 100ms, returns every second as Run does) are
// allowed at most what one exact bucket allows plus (3−1)·lease, and at
// least N.
func TestLimiterWindow(t *testing.T) {
	srv := rconntest.Start(t)
	clk := newClock()
	ls := limiters(t, srv, 3, clk)
	r := ratelimit.Rate{N: 100, Per: time.Minute}
	lease := int(leaseSize(r.N))
	exact := ratelimit.NewLimiter()

	got, want := 0, 0
	for step := range 600 { // 60s
		now := clk.Now()
		got += hammer(ls, "k", r, now, 2)
		for range 3 * 2 {
			if exact.Allow("k", r, now).OK {
				want++
			}
		}
		if step%10 == 9 {
			for _, l := range ls {
				if err := l.report(now, false); err != nil {
					t.Fatal(err)
				}
			}
		}
		clk.Add(100 * time.Millisecond)
	}
	t.Logf("allowed %d over the first window; one exact bucket: %d; lease %d", got, want, lease)
	if got > want+2*lease {
		t.Errorf("allowed %d, above the exact bucket's %d + 2·lease", got, want)
	}
	if got < int(r.N) {
		t.Errorf("allowed %d over a window with demand above the limit, want at least N = %d", got, r.N)
	}
}

// TestLimiterReturnsUnused: tokens one replica leased and did not use go
// back, so that the others, hammering, get the whole limit.
func TestLimiterReturnsUnused(t *testing.T) {
	srv := rconntest.Start(t)
	clk := newClock()
	ls := limiters(t, srv, 3, clk)
	r := ratelimit.Rate{N: 100, Per: time.Hour} // refill is negligible here
	now := clk.Now()
	got := 0
	if ls[0].Allow("k", r, now).OK { // leases 5, uses 1, then goes quiet
		got++
	}
	got += hammer(ls[1:], "k", r, now, 100)
	if got > int(r.N)-int(leaseSize(r.N))+1 {
		t.Fatalf("allowed %d before the return: the quiet replica's tokens were not held", got)
	}
	now = clk.Add(time.Second)
	if err := ls[0].report(now, false); err != nil {
		t.Fatal(err)
	}
	got += hammer(ls[1:], "k", r, now, 100)
	if got < int(r.N) {
		t.Errorf("allowed %d in total, want at least N = %d once unused tokens are returned", got, r.N)
	}
}

// TestLimiterDecisions: with one replica the Decisions match the local
// limiter's: Remaining counts down, and a refusal's RetryAfter is the
// GCRA's.
func TestLimiterDecisions(t *testing.T) {
	srv := rconntest.Start(t)
	clk := newClock()
	l := limiters(t, srv, 1, clk)[0]
	exact := ratelimit.NewLimiter()
	r := ratelimit.Rate{N: 20, Per: time.Minute}
	now := clk.Now()
	for i := range 25 {
		got, want := l.Allow("k", r, now), exact.Allow("k", r, now)
		if got.OK != want.OK || got.Limit != want.Limit || got.Remaining != want.Remaining ||
			got.RetryAfter != want.RetryAfter || got.Reset < want.Reset {
			t.Errorf("Allow %d: %+v, want %+v (Reset at least)", i, got, want)
		}
	}
	if d := l.Allow("zero", ratelimit.Rate{}, now); !d.OK {
		t.Errorf("zero Rate: %+v, want allowed", d)
	}
}

// TestLimiterOutageShare: with Redis down each replica allows its share,
// N / live replicas, locally.
func TestLimiterOutageShare(t *testing.T) {
	srv := rconntest.Start(t)
	clk := newClock()
	ls := limiters(t, srv, 3, clk)
	r := ratelimit.Rate{N: 90, Per: time.Hour}
	now := clk.Now()
	for round := range 2 { // the second round learns that 3 replicas are live
		for _, l := range ls {
			l.Allow(fmt.Sprintf("warm%d", round), r, now)
		}
	}
	srv.Kill()
	for i, l := range ls {
		got := 0
		for range 100 {
			if l.Allow("k", r, now).OK {
				got++
			}
		}
		if got != 30 {
			t.Errorf("replica %d allowed %d during the outage, want its share 90/3 = 30", i, got)
		}
	}
}

// TestLimiterOutageShareFromLive: with LimiterOptions.Live, the share
// divides by what it says.
func TestLimiterOutageShareFromLive(t *testing.T) {
	srv := rconntest.Start(t)
	l := NewLimiter(dial(t, srv), LimiterOptions{Live: func() int64 { return 2 }})
	srv.Kill()
	r := ratelimit.Rate{N: 90, Per: time.Hour}
	now := time.Unix(1_800_000_000, 0)
	got := 0
	for range 100 {
		if l.Allow("k", r, now).OK {
			got++
		}
	}
	if got != 45 {
		t.Errorf("allowed %d during the outage, want 90/2 = 45", got)
	}
}

// TestLimiterQuietBurst: three replicas lease a key's tokens, go quiet
// while the bucket refills (reporting every second, uncontended: they keep
// their tokens), then burst together. Held tokens never refill, so the
// burst gets at most N, as one exact bucket would: not N plus what the
// replicas held.
func TestLimiterQuietBurst(t *testing.T) {
	srv := rconntest.Start(t)
	clk := newClock()
	ls := limiters(t, srv, 3, clk)
	r := ratelimit.Rate{N: 100, Per: 10 * time.Second}
	got := 0
	for _, l := range ls {
		if l.Allow("k", r, clk.Now()).OK {
			got++
		}
	}
	for range 15 { // a quiet spell longer than the bucket's period
		now := clk.Add(time.Second)
		for _, l := range ls {
			if err := l.report(now, false); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, l := range ls {
		if tok := l.bucket("k").tokens; tok != leaseSize(r.N)-1 {
			t.Fatalf("a replica holds %d tokens after the quiet spell, want its lease kept: %d", tok, leaseSize(r.N)-1)
		}
	}
	// Each replica's one spent token is still held (uncontended keys'
	// spends are reported with their lease), so the burst gets N − 3 at
	// once; the burst marks the key contended, the next reports free the
	// three, and they refill from there: never more than N.
	got = hammer(ls, "k", r, clk.Now(), 100)
	if want := int(r.N) - len(ls); got != want {
		t.Errorf("allowed %d in a burst after a quiet spell, with every replica holding tokens: want N − 3 spent and unreported = %d", got, want)
	}
	now := clk.Add(time.Second)
	for _, l := range ls {
		if err := l.report(now, false); err != nil {
			t.Fatal(err)
		}
	}
	n, per := int(r.N), r.Per
	refilled := int(time.Second / (per / time.Duration(n)))
	more := hammer(ls, "k", r, now, 100)
	if more > refilled {
		t.Errorf("allowed %d more a second after the burst, above the %d refilled", more, refilled)
	}
}

// TestLimiterLostReplies: a lease whose reply is lost is adopted by the
// next report, and a report whose reply is lost is resent and applied
// once: the bucket in Redis counts each spent token once.
func TestLimiterLostReplies(t *testing.T) {
	srv := rconntest.Start(t)
	clk := newClock()
	fc := newFaultConn(dial(t, srv))
	l := newLimiter(fc, LimiterOptions{ReplicaID: "r0", Now: clk.Now})
	admin := newAdmin(t, dial(t, srv))
	r := ratelimit.Rate{N: 100, Per: time.Hour}
	now := clk.Now()

	fc.loseNext("rate_lease", 1)
	if !l.Allow("k", r, now).OK { // Redis granted 5; this replica fell back to its local share
		t.Fatal("the first Allow, with its lease reply lost, was refused")
	}
	if err := l.report(now, false); err != nil {
		t.Fatal(err)
	}
	if tok := l.bucket("k").tokens; tok != leaseSize(r.N) {
		t.Fatalf("after the report the replica holds %d tokens, want the lost lease adopted: %d", tok, leaseSize(r.N))
	}
	for range 3 {
		if !l.Allow("k", r, now).OK {
			t.Fatal("an Allow from adopted tokens was refused")
		}
	}
	fc.loseNext("rate_report", 1)
	now = clk.Add(time.Second)
	if err := l.report(now, false); err == nil {
		t.Fatal("a report with its reply lost succeeded")
	}
	if err := l.report(now, false); err != nil {
		t.Fatal(err)
	}
	_, t0 := params(r)
	tat, err := admin.r.Get(context.Background(), admin.c.Key("rl", "k")).Int64()
	if err != nil {
		t.Fatal(err)
	}
	if ahead := tat - now.UnixNano(); ahead != 3*t0 {
		t.Errorf("the bucket is %v ahead after 3 tokens spent, want %v: a resent report was applied twice, or not at all",
			time.Duration(ahead), time.Duration(3*t0))
	}
	held, err := admin.r.HGet(context.Background(), admin.c.Key("rlh", "k"), "r0").Int64()
	if err != nil || held != leaseSize(r.N)-3 {
		t.Errorf("Redis holds %d (%v) for the replica, want %d", held, err, leaseSize(r.N)-3)
	}
}

// TestLimiterCloseReturnsTokens: Close reports what was spent and gives
// back every token held, so another replica gets the rest of the limit at
// once.
func TestLimiterCloseReturnsTokens(t *testing.T) {
	srv := rconntest.Start(t)
	clk := newClock()
	ls := limiters(t, srv, 2, clk)
	r := ratelimit.Rate{N: 100, Per: time.Hour}
	now := clk.Now()
	if !ls[0].Allow("k", r, now).OK {
		t.Fatal("refused far from the limit")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := ls[0].Close(ctx); err != nil {
		t.Fatal(err)
	}
	if got := hammer(ls[1:], "k", r, now, 200); got != int(r.N)-1 {
		t.Errorf("the other replica got %d after Close, want N − 1 = %d", got, r.N-1)
	}
}

// TestLimiterDeadReplicaReclaimed: the tokens of a replica Redis has not
// heard from within the dead window stop being held and count as spent
// (it may have spent them unreported), so they refill; the replica drops
// what it no longer holds at its next report.
func TestLimiterDeadReplicaReclaimed(t *testing.T) {
	srv := rconntest.Start(t)
	clk := newClock()
	ls := limiters(t, srv, 2, clk)
	admin := newAdmin(t, dial(t, srv))
	r := ratelimit.Rate{N: 100, Per: 100 * time.Second} // a token a second
	now := clk.Now()
	ls[0].Allow("k", r, now)
	got := hammer(ls[1:], "k", r, now, 200)
	if want := int(r.N) - int(leaseSize(r.N)); got != want {
		t.Fatalf("the live replica got %d while the other held its lease, want %d", got, want)
	}
	if err := ls[1].report(now, false); err != nil { // its spends into the bucket, to refill
		t.Fatal(err)
	}
	ctx := context.Background()
	old := float64(time.Now().Add(-2 * deadAfter).UnixMilli())
	if err := admin.r.ZAdd(ctx, admin.c.Key("replicas"), redis.Z{Score: old, Member: "r0"}).Err(); err != nil {
		t.Fatal(err)
	}
	now = clk.Add(10 * time.Second) // ten tokens refilled
	got = hammer(ls[1:], "k", r, now, 200)
	if got != 10 {
		t.Errorf("the live replica got %d more 10s after the other was counted dead, want the 10 refilled", got)
	}
	if err := ls[0].report(now, false); err != nil {
		t.Fatal(err)
	}
	if tok := ls[0].bucket("k").tokens; tok != 0 {
		t.Errorf("the reclaimed replica still holds %d tokens after its report", tok)
	}
}

// TestLimiterReportBatches: a report of more keys than one script takes
// goes in several, each applied: every key's spent token reaches Redis.
func TestLimiterReportBatches(t *testing.T) {
	srv := rconntest.Start(t)
	clk := newClock()
	l := limiters(t, srv, 1, clk)[0]
	admin := newAdmin(t, dial(t, srv))
	r := ratelimit.Rate{N: 100, Per: time.Hour}
	now := clk.Now()
	keys := 2*maxBatch + 7
	for i := range keys {
		if !l.Allow(fmt.Sprintf("k%d", i), r, now).OK {
			t.Fatal("refused far from the limit")
		}
	}
	if err := l.report(now, true); err != nil { // final: every key's spend
		t.Fatal(err)
	}
	_, t0 := params(r)
	for i := range keys {
		tat, err := admin.r.Get(context.Background(), admin.c.Key("rl", fmt.Sprintf("k%d", i))).Int64()
		if err != nil || tat-now.UnixNano() != t0 {
			t.Fatalf("key %d of %d: bucket %d ahead (%v), want one token's worth %d", i, keys, tat-now.UnixNano(), err, t0)
		}
	}
}

// TestLimiterConcurrentRun: three replicas hammer one key from several
// goroutines each while their Run loops report, return and poll on the
// real clock: across them, never more than one exact bucket allows, and
// (demand above the limit) at least N once unused tokens come back.
func TestLimiterConcurrentRun(t *testing.T) {
	for _, r := range []ratelimit.Rate{
		{N: 200, Per: time.Hour},       // a token every 18s: no refill to speak of
		{N: 100, Per: 2 * time.Second}, // 50 tokens a second: spends reported and refilled meanwhile
	} {
		t.Run(fmt.Sprintf("%d per %v", r.N, r.Per), func(t *testing.T) { concurrentRun(t, r) })
	}
}

func concurrentRun(t *testing.T, r ratelimit.Rate) {
	srv := rconntest.Start(t)
	var ls []*Limiter
	ctx, cancel := context.WithCancel(context.Background())
	var runs sync.WaitGroup
	for i := range 3 {
		l := NewLimiter(dial(t, srv), LimiterOptions{ReplicaID: fmt.Sprintf("c%d", i)})
		ls = append(ls, l)
		runs.Go(func() { _ = l.Run(ctx) })
	}
	defer func() { cancel(); runs.Wait() }()
	var allowed atomic.Int64
	start := time.Now()
	deadline := start.Add(2500 * time.Millisecond)
	var wg sync.WaitGroup
	for _, l := range ls {
		for range 4 {
			wg.Go(func() {
				for time.Now().Before(deadline) {
					if l.Allow("k", r, time.Now()).OK {
						allowed.Add(1)
					}
					time.Sleep(time.Millisecond)
				}
			})
		}
	}
	wg.Wait()
	refilled := int64(time.Since(start)/(r.Per/time.Duration(r.N))) + 1
	got := allowed.Load()
	t.Logf("allowed %d across 3 replicas in %s; N %d, refill %d", got, time.Since(start).Round(time.Millisecond), r.N, refilled)
	if got > r.N+refilled {
		t.Errorf("allowed %d, above one exact bucket's %d + %d refilled", got, r.N, refilled)
	}
	if got < r.N {
		t.Errorf("allowed %d with demand above the limit for 2.5s, want at least N = %d", got, r.N)
	}
}
