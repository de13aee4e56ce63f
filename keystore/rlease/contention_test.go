package rlease

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/keygate/keygate/authz/ratelimit"
	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/money"
	"github.com/keygate/keygate/keystore/rconn/rconntest"
)

// TestUncontendedKeysKeepLeases: many keys, each hit every 3 seconds (the
// load benchmark's shape with 10,000 keys), far from exhaustion: the
// leases taken by a key's first Check are kept across the idle seconds
// between its Checks, so the Check path (Spend and Allow) makes far fewer
// than 0.1 Redis calls per Check. The per-second heartbeats, reports and
// token polls run as Run does, and are counted apart.
func TestUncontendedKeysKeepLeases(t *testing.T) {
	const (
		price   = money.Micros(100)
		numKeys = 60
		seconds = 90
	)
	srv := rconntest.Start(t)
	c := dial(t, srv)
	a := newAdmin(t, c)
	clk := newClock()
	led := ledger(t, c, LedgerOptions{ReplicaID: "r", Now: clk.Now})
	lim := NewLimiter(c, LimiterOptions{ReplicaID: "r", Now: clk.Now})
	r := ratelimit.Rate{N: 1_000_000, Per: time.Second}
	keys := make([]*keystore.Key, numKeys)
	for i := range keys {
		acct := fmt.Sprintf("a%d", i)
		a.account(acct, 1_000_000*price)
		keys[i] = a.key(fmt.Sprintf("k%d", i), acct, 0)
	}

	var checks, checkCalls, background uint64
	for sec := range seconds {
		now := clk.Now()
		before := c.Commands()
		for i, k := range keys {
			if i%3 != sec%3 {
				continue
			}
			if err := led.Spend(k, price); err != nil {
				t.Fatalf("second %d: Spend(%s): %v", sec, k.ID, err)
			}
			if !lim.Allow(k.ID, r, now).OK {
				t.Fatalf("second %d: Allow(%s) refused far from the limit", sec, k.ID)
			}
			if sec >= 3 { // every key's first Check leases: not the steady state
				checks++
			}
		}
		if sec >= 3 {
			checkCalls += c.Commands() - before
		}
		before = c.Commands()
		led.tick()
		if err := lim.report(now, false); err != nil {
			t.Fatal(err)
		}
		background += c.Commands() - before
		clk.Add(time.Second)
	}
	perCheck := float64(checkCalls) / float64(checks)
	t.Logf("keys hit every 3s: %.4f Redis calls per Check (Spend + Allow) over %d Checks; %.2f background calls per second",
		perCheck, checks, float64(background)/seconds)
	if perCheck >= 0.1 {
		t.Errorf("%.4f Redis calls per Check on uncontended keys hit every 3s, want under 0.1", perCheck)
	}
	closeAll(t, led)
	for i := range keys {
		bal, leased := a.acct(fmt.Sprintf("a%d", i))
		if want := 1_000_000*price - seconds/3*price; bal != want || leased != 0 {
			t.Errorf("account a%d after Close: bal %d leased %d, want %d 0", i, bal, leased, want)
		}
	}
}

// TestContendedMoneyLeaseReturned: replica A holds an idle lease covering
// the rest of a balance; replica B is refused once, which marks the
// account contended; A's next heartbeat and report (one tick) give the
// idle lease back, and B's retry passes. Without the refusal, A keeps its
// idle lease.
func TestContendedMoneyLeaseReturned(t *testing.T) {
	const price = money.Micros(100)
	srv := rconntest.Start(t)
	c := dial(t, srv)
	adm := newAdmin(t, c)
	adm.account("acct", 1_000*price)
	k := adm.key("k", "acct", 0)
	clk := newClock()
	a := ledger(t, dial(t, srv), LedgerOptions{ReplicaID: "A", Now: clk.Now})
	b := ledger(t, dial(t, srv), LedgerOptions{ReplicaID: "B", Now: clk.Now})

	if err := a.Spend(k, price); err != nil {
		t.Fatal(err)
	}
	// What A leased is now the whole balance: the rest went elsewhere.
	_, leased := adm.acct("acct")
	adm.set(c.Key("acct", "acct"), "bal", int64(leased))
	clk.Add(idleAfter)
	a.tick() // idle for a second, uncontended: kept
	if _, leased := adm.acct("acct"); leased != leaseWant(price)-price {
		t.Fatalf("A's uncontended idle lease: leased %d, want it kept: %d", leased, leaseWant(price)-price)
	}

	if err := b.Spend(k, price); !errors.Is(err, keystore.ErrInsufficientBalance) {
		t.Fatalf("B's Spend while A holds the rest: %v, want ErrInsufficientBalance", err)
	}
	a.tick() // the heartbeat learns the mark; the report returns the lease
	if lease, _, _ := a.local("k"); lease != 0 {
		t.Errorf("A still holds %d after the account was marked contended", lease)
	}
	if err := b.Spend(k, price); err != nil {
		t.Fatalf("B's retry after A's tick: %v, want it to pass", err)
	}
	closeAll(t, a, b)
	bal, leased := adm.acct("acct")
	if want := leaseWant(price) - 2*price; bal != want || leased != 0 {
		t.Errorf("after Close: bal %d leased %d, want %d 0", bal, leased, want)
	}
}

// TestContendedCapLeaseReturned: as TestContendedMoneyLeaseReturned, with
// the key's cap rather than the balance the limit: the refusal marks the
// key contended.
func TestContendedCapLeaseReturned(t *testing.T) {
	const price = money.Micros(100)
	srv := rconntest.Start(t)
	c := dial(t, srv)
	adm := newAdmin(t, c)
	adm.account("acct", 1_000_000*price)
	k := adm.key("k", "acct", 200*price)
	clk := newClock()
	a := ledger(t, dial(t, srv), LedgerOptions{ReplicaID: "A", Now: clk.Now})
	b := ledger(t, dial(t, srv), LedgerOptions{ReplicaID: "B", Now: clk.Now})

	if err := a.Spend(k, price); err != nil { // leases 64 prices of the cap's 200
		t.Fatal(err)
	}
	adm.set(c.Key("key", "k"), "spent", int64(200*price-leaseWant(price)))
	clk.Add(idleAfter)
	a.tick()
	if err := b.Spend(k, price); !errors.Is(err, keystore.ErrSpendCap) {
		t.Fatalf("B's Spend while A holds the rest of the cap: %v, want ErrSpendCap", err)
	}
	a.tick()
	if err := b.Spend(k, price); err != nil {
		t.Fatalf("B's retry after A's tick: %v, want it to pass", err)
	}
	closeAll(t, a, b)
	if spent, leased := adm.keyMoney("k"); spent != 200*price-leaseWant(price)+2*price || leased != 0 {
		t.Errorf("after Close: spent %d leased %d, want %d 0", spent, leased, 200*price-leaseWant(price)+2*price)
	}
}

// TestRateContendedTokensReturned: three replicas each lease a key's
// tokens and go quiet (uncontended, they keep them); then one replica's
// demand exceeds the limit. Its short grant marks the key contended, the
// others' next poll returns their tokens, and in total at least N and at
// most N + 2·lease pass.
func TestRateContendedTokensReturned(t *testing.T) {
	srv := rconntest.Start(t)
	clk := newClock()
	ls := limiters(t, srv, 3, clk)
	r := ratelimit.Rate{N: 100, Per: time.Hour} // refill is negligible here
	lease := int(leaseSize(r.N))
	got := 0
	for _, l := range ls {
		if l.Allow("k", r, clk.Now()).OK {
			got++
		}
	}
	now := clk.Add(2 * time.Second)
	for _, l := range ls[1:] {
		if err := l.report(now, false); err != nil { // uncontended: kept
			t.Fatal(err)
		}
	}
	got += hammer(ls[:1], "k", r, now, 200)
	if want := int(r.N) - 2*(lease-1); got != want {
		t.Fatalf("allowed %d before the others' poll, want %d: their idle tokens were not held", got, want)
	}
	now = clk.Add(pollEvery)
	for _, l := range ls {
		if err := l.report(now, false); err != nil {
			t.Fatal(err)
		}
	}
	got += hammer(ls[:1], "k", r, now, 200)
	t.Logf("allowed %d with demand above the limit; N %d, lease %d", got, r.N, lease)
	if got < int(r.N) {
		t.Errorf("allowed %d, want at least N = %d once contended tokens are returned", got, r.N)
	}
	if got > int(r.N)+2*lease {
		t.Errorf("allowed %d, above N + 2·lease = %d", got, int(r.N)+2*lease)
	}
}
