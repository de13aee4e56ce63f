package rlease

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"

	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/money"
	"github.com/keygate/keygate/keystore/rconn/rconntest"
)

// TestSpendExactAcrossReplicas is the contract's exactness test: three
// replicas (three ledgers, each with its own connection, on one Redis)
// × 100 concurrent spends against a balance, or a cap, that covers 100:
// exactly 100 succeed, the rest are refused for the right reason, and
// once every replica has closed Redis holds the exact balance and spend,
// and no lease.
func TestSpendExactAcrossReplicas(t *testing.T) {
	const price = money.Micros(2000)
	tests := []struct {
		name    string
		balance money.Micros
		cap     money.Micros
		wantErr error
	}{
		{name: "balance", balance: 100 * price, wantErr: keystore.ErrInsufficientBalance},
		{name: "cap", balance: 1000 * price, cap: 100 * price, wantErr: keystore.ErrSpendCap},
		{name: "balance odd", balance: 100*price + price/2, wantErr: keystore.ErrInsufficientBalance},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := rconntest.Start(t)
			a := newAdmin(t, dial(t, srv))
			// Interleavings differ from run to run: several rounds give a
			// lease that strands money more chances to show.
			for round := range 5 {
				spendExact(t, srv, a, round, price, tt.balance, tt.cap, tt.wantErr)
			}
		})
	}
}

// spendExact is one round of TestSpendExactAcrossReplicas, on its own
// account, key and replicas.
func spendExact(t *testing.T, srv *rconntest.Server, a *admin, round int, price, balance, capM money.Micros, wantErr error) {
	t.Helper()
	acct, keyID := fmt.Sprintf("acct%d", round), fmt.Sprintf("key%d", round)
	a.account(acct, balance)
	k := a.key(keyID, acct, capM)
	var ls []*Ledger
	for i := range 3 {
		l, err := NewLedger(dial(t, srv), LedgerOptions{ReplicaID: fmt.Sprintf("round%d-r%d", round, i)})
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
	}
	var ok, refused atomic.Int64
	var wg sync.WaitGroup
	start := make(chan struct{})
	for _, l := range ls {
		for range 100 {
			wg.Go(func() {
				<-start
				switch err := l.Spend(k, price); {
				case err == nil:
					ok.Add(1)
				case errors.Is(err, wantErr):
					refused.Add(1)
				default:
					t.Errorf("Spend: %v", err)
				}
			})
		}
	}
	close(start)
	wg.Wait()
	if ok.Load() != 100 || refused.Load() != 200 {
		t.Errorf("round %d: allowed %d, refused %d; want 100 and 200", round, ok.Load(), refused.Load())
	}
	closeAll(t, ls...)

	bal, aLeased := a.acct(acct)
	spent, kLeased := a.keyMoney(keyID)
	if want := balance - 100*price; bal != want || spent != 100*price || aLeased != 0 || kLeased != 0 {
		t.Errorf("round %d after Close: bal %d spent %d leased %d/%d; want bal %d spent %d leased 0/0",
			round, bal, spent, aLeased, kLeased, want, 100*price)
	}
	for _, l := range ls {
		if h := a.leaseHash(l.ReplicaID()); len(h) != 0 {
			t.Errorf("lease hash of %s after Close: %v", l.ReplicaID(), h)
		}
	}
}

// TestSpendRedisCalls measures the Redis calls per Spend: far from
// exhaustion a lease covers 64 prices, so about 1 call in 64; near it,
// every lease shrinks to the price. It asserts the far case's bound and
// logs both figures.
func TestSpendRedisCalls(t *testing.T) {
	const price = money.Micros(100)
	srv := rconntest.Start(t)
	c := dial(t, srv)
	a := newAdmin(t, c)
	a.account("rich", 1_000_000*price)
	a.account("poor", 50*price)
	rich, poor := a.key("k-rich", "rich", 0), a.key("k-poor", "poor", 0)
	l := ledger(t, c, LedgerOptions{ReplicaID: "r"})

	calls := func(k *keystore.Key, n int) float64 {
		before := c.Commands()
		for range n {
			if err := l.Spend(k, price); err != nil {
				t.Fatalf("Spend(%s): %v", k.ID, err)
			}
		}
		return float64(c.Commands()-before) / float64(n)
	}
	far := calls(rich, 6400)
	near := calls(poor, 50)
	t.Logf("Redis calls per Spend: %.4f far from exhaustion, %.2f over the last 50 prices of a balance (1 replica)", far, near)
	if far > 1.0/leaseFactor+0.001 {
		t.Errorf("far from exhaustion: %.4f Redis calls per Spend, want at most 1/%d", far, leaseFactor)
	}
	if near < 5*far {
		t.Errorf("near exhaustion: %.4f Redis calls per Spend, far: %.4f: leases did not shrink", near, far)
	}
	if err := l.Spend(poor, price); !errors.Is(err, keystore.ErrInsufficientBalance) {
		t.Errorf("Spend past the balance: %v, want ErrInsufficientBalance", err)
	}
}

// TestLeaseSizes checks the grants: 64 prices far from exhaustion, half of
// what is available per live replica near it, the price at the end.
func TestLeaseSizes(t *testing.T) {
	const price = money.Micros(10)
	srv := rconntest.Start(t)
	c := dial(t, srv)
	a := newAdmin(t, c)
	a.account("a", 100*price)
	k := a.key("k", "a", 0)
	l := ledger(t, c, LedgerOptions{ReplicaID: "r"})

	var grants []money.Micros
	spends := 0
	for {
		before, _, _ := l.local("k")
		if err := l.Spend(k, price); err != nil {
			if !errors.Is(err, keystore.ErrInsufficientBalance) {
				t.Fatal(err)
			}
			break
		}
		spends++
		after, _, _ := l.local("k")
		if after+price > before {
			grants = append(grants, after+price-before)
		}
	}
	t.Logf("grants: %v", grants)
	// With one live replica each grant is half of what is left (at most 64
	// prices), at least what the Spend needs beyond the local lease; every
	// micro of the balance is granted and spent.
	var total money.Micros
	for i, g := range grants {
		total += g
		if g > leaseFactor*price {
			t.Errorf("grant %d = %d, above %d prices", i, g, leaseFactor)
		}
	}
	if total != 100*price || spends != 100 {
		t.Errorf("grants sum to %d over %d spends, want %d over 100", total, spends, 100*price)
	}
	if grants[0] != 50*price || grants[1] != 25*price {
		t.Errorf("grants %v: want the first half the balance (1 live replica), the second half the rest", grants)
	}
}

// TestReportIdempotent sends one report twice with the same sequence
// number, as after a lost reply: Redis applies it once.
func TestReportIdempotent(t *testing.T) {
	srv := rconntest.Start(t)
	c := dial(t, srv)
	a := newAdmin(t, c)
	a.account("a", 1000)
	k := a.key("k", "a", 0)
	f := newFaultConn(c)
	l := ledger(t, f, LedgerOptions{ReplicaID: "r"})
	if err := l.Spend(k, 10); err != nil {
		t.Fatal(err)
	}
	f.loseNext("report", 1)
	if err := l.report(false); !errors.Is(err, errLostReply) {
		t.Fatalf("report: %v, want the lost reply", err)
	}
	if bal, _ := a.acct("a"); bal != 990 {
		t.Fatalf("bal after the report whose reply was lost: %d, want 990 (Redis ran it)", bal)
	}
	if err := l.report(false); err != nil { // the same batch, the same seq
		t.Fatal(err)
	}
	if bal, _ := a.acct("a"); bal != 990 {
		t.Errorf("bal after the retried report: %d, want 990 (applied once)", bal)
	}
	closeAll(t, l)
	bal, leased := a.acct("a")
	spent, kLeased := a.keyMoney("k")
	if bal != 990 || leased != 0 || spent != 10 || kLeased != 0 {
		t.Errorf("after Close: bal %d leased %d spent %d key leased %d; want 990 0 10 0", bal, leased, spent, kLeased)
	}
}

// TestLostLeaseReplyAdopted loses the reply of a granted lease: the Spend
// fails closed, the next report finds the grant in Redis and adopts it,
// and Close returns it, so nothing stays leased.
func TestLostLeaseReplyAdopted(t *testing.T) {
	srv := rconntest.Start(t)
	c := dial(t, srv)
	a := newAdmin(t, c)
	a.account("a", 100_000)
	k := a.key("k", "a", 0)
	f := newFaultConn(c)
	l := ledger(t, f, LedgerOptions{ReplicaID: "r"})

	f.loseNext("lease", 1)
	if err := l.Spend(k, 100); !errors.Is(err, ErrBillingUnavailable) {
		t.Fatalf("Spend with a lost lease reply: %v, want ErrBillingUnavailable", err)
	}
	_, leased := a.acct("a")
	if leased == 0 {
		t.Fatal("Redis did not grant the lease whose reply was lost")
	}
	if lease, _, _ := l.local("k"); lease != 0 {
		t.Fatalf("local lease %d before the report, want 0", lease)
	}
	if err := l.report(false); err != nil {
		t.Fatal(err)
	}
	if lease, _, _ := l.local("k"); lease != leased {
		t.Fatalf("local lease %d after the report, want the lost grant %d", lease, leased)
	}
	before := c.Commands()
	if err := l.Spend(k, 100); err != nil { // from the adopted lease
		t.Fatal(err)
	}
	if n := c.Commands() - before; n != 0 {
		t.Errorf("Spend from the adopted lease made %d Redis calls, want 0", n)
	}
	closeAll(t, l)
	bal, leased := a.acct("a")
	if bal != 100_000-100 || leased != 0 {
		t.Errorf("after Close: bal %d leased %d; want %d 0", bal, leased, 100_000-100)
	}
}

// TestIdleLeaseReturned: a lease of an uncontended key unused for a
// second is kept; unused for keepIdle it goes back with the next report,
// and the metric counts it.
func TestIdleLeaseReturned(t *testing.T) {
	srv := rconntest.Start(t)
	c := dial(t, srv)
	a := newAdmin(t, c)
	a.account("a", 1_000_000)
	k := a.key("k", "a", 0)
	clk := newClock()
	reg := prometheus.NewRegistry()
	l := ledger(t, c, LedgerOptions{ReplicaID: "r", Now: clk.Now, Metrics: reg})

	if err := l.Spend(k, 100); err != nil {
		t.Fatal(err)
	}
	if err := l.report(false); err != nil { // not idle yet: charges, keeps the lease
		t.Fatal(err)
	}
	bal, leased := a.acct("a")
	if bal != 1_000_000-100 || leased != 63*100 {
		t.Fatalf("after a report: bal %d leased %d, want %d %d", bal, leased, 1_000_000-100, 63*100)
	}
	clk.Add(idleAfter)
	if err := l.report(false); err != nil {
		t.Fatal(err)
	}
	if _, leased := a.acct("a"); leased != 63*100 {
		t.Fatalf("leased %d after an uncontended lease was idle for %s, want it kept: %d", leased, idleAfter, 63*100)
	}
	clk.Add(keepIdle - idleAfter)
	if err := l.report(false); err != nil {
		t.Fatal(err)
	}
	if _, leased := a.acct("a"); leased != 0 {
		t.Errorf("leased %d after the lease was idle for %s, want 0", leased, keepIdle)
	}
	if lease, _, _ := l.local("k"); lease != 0 {
		t.Errorf("local lease %d after it was returned", lease)
	}
	if got := counterValue(t, l.m.returned); got != 6300 {
		t.Errorf("%s = %v, want 6300", metricReturned, got)
	}
}

// TestReclaimDeadReplica: a replica silent for more than 30s loses its
// leases to the next heartbeat of a live one.
func TestReclaimDeadReplica(t *testing.T) {
	srv := rconntest.Start(t)
	c := dial(t, srv)
	a := newAdmin(t, c)
	a.account("a", 10_000)
	k := a.key("k", "a", 0)
	dead := ledger(t, c, LedgerOptions{ReplicaID: "dead"})
	if err := dead.Spend(k, 100); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, leased := a.acct("a"); leased == 0 {
		t.Fatal("no lease taken")
	}
	// Make "dead" silent for 31s (by Redis's clock), then heartbeat another.
	old := float64(time.Now().Add(-31 * time.Second).UnixMilli())
	if err := a.r.ZAdd(ctx, c.Key("replicas"), redisZ(old, "dead")).Err(); err != nil {
		t.Fatal(err)
	}
	live := ledger(t, c, LedgerOptions{ReplicaID: "live"})
	if err := live.heartbeat(); err != nil {
		t.Fatal(err)
	}
	if _, leased := a.acct("a"); leased != 0 {
		t.Errorf("account leased %d after the reclaim, want 0", leased)
	}
	if _, leased := a.keyMoney("k"); leased != 0 {
		t.Errorf("key leased %d after the reclaim, want 0", leased)
	}
	if h := a.leaseHash("dead"); len(h) != 0 {
		t.Errorf("dead replica's lease hash %v after the reclaim", h)
	}
	if got := live.live.Load(); got != 1 {
		t.Errorf("live replicas %d, want 1", got)
	}
	// The dead one comes back: its report charges what it spent and
	// releases nothing (Redis no longer counts its lease), and it stops
	// spending the reclaimed lease.
	if err := dead.report(false); err != nil {
		t.Fatal(err)
	}
	bal, leased := a.acct("a")
	if bal != 9900 || leased != 0 {
		t.Errorf("after the dead replica's report: bal %d leased %d; want 9900 0", bal, leased)
	}
	if lease, used, extra := dead.local("k"); lease != 0 || used != 0 || extra != 0 {
		t.Errorf("dead replica's local state after its report: lease %d used %d extra %d, want 0s", lease, used, extra)
	}
}

// TestOutage covers the outage policies: a lease held is still spent;
// beyond it FailClosed refuses and AllowLocal allows the allowance per
// key and outage, then charges it exactly once when Redis is back.
func TestOutage(t *testing.T) {
	const price = money.Micros(100)
	tests := []struct {
		name      string
		policy    OutagePolicy
		allowance money.Micros
		wantExtra int // spends allowed beyond the lease during the outage
	}{
		{name: "fail closed", policy: FailClosed, allowance: 10 * price},
		{name: "allow local", policy: AllowLocal, allowance: 3*price + price/2, wantExtra: 3},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := rconntest.Start(t)
			c := dial(t, srv)
			a := newAdmin(t, c)
			a.account("a", 1_000_000)
			k := a.key("k", "a", 0)
			reg := prometheus.NewRegistry()
			j := &MemJournal{}
			l := ledger(t, c, LedgerOptions{ReplicaID: "r", Outage: tt.policy, OutageAllowance: tt.allowance,
				Journal: j, Metrics: reg})
			if err := l.Spend(k, price); err != nil { // takes a lease of 64 prices
				t.Fatal(err)
			}
			srv.Kill()
			for i := range 63 {
				if err := l.Spend(k, price); err != nil {
					t.Fatalf("Spend %d from the lease held during the outage: %v", i, err)
				}
			}
			extra := 0
			for range 10 {
				switch err := l.Spend(k, price); {
				case err == nil:
					extra++
				case !errors.Is(err, ErrBillingUnavailable):
					t.Fatalf("Spend beyond the lease during the outage: %v, want ErrBillingUnavailable", err)
				}
			}
			if extra != tt.wantExtra {
				t.Errorf("%d spends allowed beyond the lease, want %d", extra, tt.wantExtra)
			}
			if got := counterValue(t, l.m.outageAllowed); got != float64(tt.wantExtra) {
				t.Errorf("outage spends allowed metric %v, want %d", got, tt.wantExtra)
			}
			if err := l.report(false); err == nil {
				t.Fatal("report during the outage succeeded")
			}

			srv.Restart()
			waitAvailable(t, l)
			// The batch built during the outage goes first, unchanged; then a
			// new one. Neither charges twice.
			if err := l.report(false); err != nil {
				t.Fatal(err)
			}
			if err := l.report(false); err != nil {
				t.Fatal(err)
			}
			want := 1_000_000 - money.Micros(64+tt.wantExtra)*price
			if bal, leased := a.acct("a"); bal != want || leased != 0 {
				t.Errorf("after Redis came back: bal %d leased %d; want %d 0", bal, leased, want)
			}
			if p, _ := j.Pending(); len(p) != 0 {
				t.Errorf("journal still holds %v after the report", p)
			}
			// A new outage gives a new allowance.
			if tt.policy == AllowLocal {
				srv.Kill()
				if err := l.Spend(k, price); err != nil {
					t.Errorf("Spend in a second outage: %v, want a new allowance", err)
				}
			}
		})
	}
}

// waitAvailable retries a heartbeat until Redis answers (the breaker
// closes within its probe interval).
func waitAvailable(t *testing.T, l *Ledger) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for l.heartbeat() != nil {
		if time.Now().After(deadline) {
			t.Fatal("Redis did not come back within 10s")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestJournalReplay: outage spends sealed into a report that was sent and
// applied, but whose reply was lost, then the replica stopped: a new
// replica on the same journal reports them again, and Redis applies them
// once. Unsealed ones are reported by the new replica.
func TestJournalReplay(t *testing.T) {
	srv := rconntest.Start(t)
	c := dial(t, srv)
	a := newAdmin(t, c)
	a.account("a", 1_000_000)
	k := a.key("k", "a", 0)
	j := &MemJournal{}
	f := newFaultConn(c)
	old := ledger(t, f, LedgerOptions{ReplicaID: "old", Outage: AllowLocal, OutageAllowance: 1000, Journal: j})

	f.loseNext("lease", 1) // the lease call "fails": an outage spend
	if err := old.Spend(k, 100); err != nil {
		t.Fatal(err)
	}
	f.loseNext("report", 1)
	if err := old.report(false); !errors.Is(err, errLostReply) {
		t.Fatalf("report: %v, want the lost reply", err)
	}
	// One more outage spend, not yet in a report, then "old" stops.
	f.loseNext("lease", 1)
	if err := old.Spend(k, 50); err != nil {
		t.Fatal(err)
	}
	old.closed.Store(true) // stopped without its final report

	p, _ := j.Pending()
	if len(p) != 2 || p[0].Seq == 0 || p[1].Seq != 0 {
		t.Fatalf("journal before the restart: %+v; want one sealed report, then unsealed spends", p)
	}
	fresh := ledger(t, c, LedgerOptions{ReplicaID: "new", Outage: AllowLocal, OutageAllowance: 1000, Journal: j})
	if err := fresh.report(false); err != nil {
		t.Fatal(err)
	}
	// The lost lease grant of "old" is still leased until it is reclaimed;
	// the balance is charged 100 (once) + 50.
	if bal, _ := a.acct("a"); bal != 1_000_000-150 {
		t.Errorf("bal after the replay: %d, want %d (each outage spend charged once)", bal, 1_000_000-150)
	}
	if spent, _ := a.keyMoney("k"); spent != 150 {
		t.Errorf("key spent after the replay: %d, want 150", spent)
	}
	if p, _ := j.Pending(); len(p) != 0 {
		t.Errorf("journal after the replay: %+v, want empty", p)
	}
}

// TestStaleLeaseNotSpent: a replica that Redis has not heard from for
// leaseValidFor stops spending its leases (another replica may reclaim
// them after deadAfter).
func TestStaleLeaseNotSpent(t *testing.T) {
	srv := rconntest.Start(t)
	c := dial(t, srv)
	a := newAdmin(t, c)
	a.account("a", 1_000_000)
	k := a.key("k", "a", 0)
	clk := newClock()
	l := ledger(t, c, LedgerOptions{ReplicaID: "r", Now: clk.Now})
	if err := l.Spend(k, 100); err != nil {
		t.Fatal(err)
	}
	srv.Kill()
	clk.Add(leaseValidFor)
	if err := l.Spend(k, 100); !errors.Is(err, ErrBillingUnavailable) {
		t.Errorf("Spend from a lease %s after Redis last answered: %v, want ErrBillingUnavailable", leaseValidFor, err)
	}
}

func TestSpendArguments(t *testing.T) {
	srv := rconntest.Start(t)
	c := dial(t, srv)
	l := ledger(t, c, LedgerOptions{ReplicaID: "r"})
	k := newAdmin(t, c).key("k", "a", 0) // account a is not in Redis
	tests := []struct {
		name  string
		price money.Micros
		want  error
	}{
		{name: "zero passes without an account", price: 0, want: nil},
		{name: "negative", price: -1, want: keystore.ErrInvalid},
		{name: "too large", price: money.Max + 1, want: keystore.ErrInvalid},
		{name: "no account in Redis", price: 1, want: keystore.ErrInsufficientBalance},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := l.Spend(k, tt.price); !errors.Is(err, tt.want) || (tt.want == nil && err != nil) {
				t.Errorf("Spend(%d) = %v, want %v", tt.price, err, tt.want)
			}
		})
	}
	closeAll(t, l)
	if err := l.Spend(k, 1); !errors.Is(err, ErrClosed) {
		t.Errorf("Spend after Close = %v, want ErrClosed", err)
	}
	if _, err := newLedger(c, LedgerOptions{OutageAllowance: -1}); !errors.Is(err, keystore.ErrInvalid) {
		t.Errorf("negative allowance: %v, want ErrInvalid", err)
	}
}

func redisZ(score float64, member string) redis.Z { return redis.Z{Score: score, Member: member} }
