package redisstore_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/money"
	"github.com/keygate/keygate/keystore/rconn"
	"github.com/keygate/keygate/keystore/rconn/rconntest"
	"github.com/keygate/keygate/keystore/redisstore"
)

// clock is a Now that the test moves.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Set(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = t
}

// alertSink collects what Options.Alerts is given, from every replica.
type alertSink struct {
	mu  sync.Mutex
	got []keystore.Alert
}

func (s *alertSink) add(alerts []keystore.Alert) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.got = append(s.got, alerts...)
}

func (s *alertSink) take() []keystore.Alert {
	s.mu.Lock()
	defer s.mu.Unlock()
	got := s.got
	s.got = nil
	return got
}

// keyWith creates a key with cap and period on r and returns the Key a
// Check would hold (from r's mirror).
func keyWith(t testing.TB, r *replica, account string, cap money.Micros, period keystore.Period, now time.Time) *keystore.Key {
	t.Helper()
	_, secret, err := r.store.CreateKey(keystore.NewKey{Account: account, Scopes: []string{"chat:write"},
		SpendCap: cap, CapPeriod: period}, now)
	if err != nil {
		t.Fatal(err)
	}
	k, ok := r.store.Lookup(secret, now)
	if !ok {
		t.Fatal("the new key is not in the mirror")
	}
	return k
}

// amounts reads an account's balance and reserved, and a key's spent and
// reserved, through r.
type amounts struct {
	Bal, AcctReserved, Spent, KeyReserved money.Micros
}

func readAmounts(t testing.TB, r *replica, account, keyID string) amounts {
	t.Helper()
	a, err := r.store.Account(account)
	if err != nil {
		t.Fatal(err)
	}
	k, err := r.store.Key(keyID)
	if err != nil {
		t.Fatal(err)
	}
	return amounts{Bal: a.Balance, AcctReserved: a.Reserved, Spent: k.Spent, KeyReserved: k.Reserved}
}

func wantAmounts(t testing.TB, what string, rs []*replica, account, keyID string, want amounts) {
	t.Helper()
	for _, r := range rs {
		if got := readAmounts(t, r, account, keyID); got != want {
			t.Errorf("%s, read through %s: %+v, want %+v", what, r.name, got, want)
		}
	}
}

// TestSettleAcrossReplicas reserves on one replica and settles on the
// other: a success charges the reported cost clamped to [0, max] (or the
// price without one), a failure releases; reads on both show what is
// reserved, never as spent; a second settlement of one ID is unknown.
func TestSettleAcrossReplicas(t *testing.T) {
	srv := rconntest.Start(t)
	a, b := startReplica(t, srv, "a", ""), startReplica(t, srv, "b", "")
	both := []*replica{a, b}
	now := time.Now()
	mustAccount(t, a, "acme", 1000)
	k := keyWith(t, a, "acme", 0, keystore.PeriodNone, now)
	deadline := now.Add(time.Hour)

	tests := []struct {
		name    string
		success bool
		cost    money.Micros
		hasCost bool
		result  keystore.Settled
		charged money.Micros
	}{
		{"success at the price", true, 0, false, keystore.SettleCommitted, 10},
		{"success at a lower cost", true, 4, true, keystore.SettleCommitted, 4},
		{"success at a cost above max: clamped", true, 99, true, keystore.SettleCommitted, 25},
		{"success at max", true, 25, true, keystore.SettleCommitted, 25},
		{"success at a negative cost: nothing", true, -3, true, keystore.SettleCommitted, 0},
		{"success at no cost", true, 0, true, keystore.SettleCommitted, 0},
		{"failure: released", false, 0, false, keystore.SettleReleased, 0},
		{"failure with a cost: released", false, 7, true, keystore.SettleReleased, 0},
	}
	bal, spent := money.Micros(1000), money.Micros(0)
	for i, tt := range tests {
		id := fmt.Sprintf("req-%d", i)
		if err := a.store.Reserve(k, id, 10, 25, deadline); err != nil {
			t.Fatalf("%s: Reserve: %v", tt.name, err)
		}
		wantAmounts(t, tt.name+": reserved", both, "acme", k.ID, amounts{bal, 10, spent, 10})
		result, charged := b.store.Settle(id, tt.success, tt.cost, tt.hasCost)
		if result != tt.result || charged != tt.charged {
			t.Errorf("%s: Settle = %v, %v; want %v, %v", tt.name, result, charged, tt.result, tt.charged)
		}
		bal, spent = bal-tt.charged, spent+tt.charged
		wantAmounts(t, tt.name+": settled", both, "acme", k.ID, amounts{bal, 0, spent, 0})
		// A repeated log entry, on either replica, changes nothing.
		for _, r := range both {
			if result, charged := r.store.Settle(id, true, 0, false); result != keystore.SettleUnknown || charged != 0 {
				t.Errorf("%s: second Settle on %s = %v, %v; want unknown", tt.name, r.name, result, charged)
			}
		}
		wantAmounts(t, tt.name+": settled twice", both, "acme", k.ID, amounts{bal, 0, spent, 0})
	}
	if result, _ := a.store.Settle("never-reserved", true, 0, false); result != keystore.SettleUnknown {
		t.Errorf("Settle of an unknown id = %v, want unknown", result)
	}
	// Keys listed show what they hold too.
	if err := a.store.Reserve(k, "listed", 10, 10, deadline); err != nil {
		t.Fatal(err)
	}
	keys, err := b.store.ListKeys("acme")
	if err != nil || len(keys) != 1 || keys[0].Reserved != 10 || keys[0].Spent != spent {
		t.Errorf("ListKeys = %+v, %v; want one key with 10 reserved and %s spent", keys, err, spent)
	}
	accts, err := b.store.ListAccounts()
	if err != nil || len(accts) != 1 || accts[0].Reserved != 10 || accts[0].Balance != bal {
		t.Errorf("ListAccounts = %+v, %v; want acme with 10 reserved and a balance of %s", accts, err, bal)
	}
}

// TestReserveRefusals: a duplicate open ID is refused on every replica
// until settled; the balance after leases and reservations, and the cap
// after spend, leases and reservations, bound what is reserved; invalid
// arguments are refused before Redis. Nothing changes when Reserve fails.
func TestReserveRefusals(t *testing.T) {
	srv := rconntest.Start(t)
	a, b := startReplica(t, srv, "a", ""), startReplica(t, srv, "b", "")
	both := []*replica{a, b}
	rc := rawClient(t, srv)
	ctx := context.Background()
	now := time.Now()
	deadline := now.Add(time.Hour)
	mustAccount(t, a, "acme", 100)
	k := keyWith(t, a, "acme", 0, keystore.PeriodNone, now)

	if err := a.store.Reserve(k, "dup", 30, 30, deadline); err != nil {
		t.Fatal(err)
	}
	for _, r := range both {
		if err := r.store.Reserve(k, "dup", 30, 30, deadline); !errors.Is(err, keystore.ErrDuplicateRequest) {
			t.Errorf("Reserve of an open id on %s = %v, want ErrDuplicateRequest", r.name, err)
		}
	}
	wantAmounts(t, "after the duplicates", both, "acme", k.ID, amounts{100, 30, 0, 30})
	if result, _ := b.store.Settle("dup", false, 0, false); result != keystore.SettleReleased {
		t.Fatalf("Settle = %v, want released", result)
	}
	if err := b.store.Reserve(k, "dup", 30, 30, deadline); err != nil {
		t.Errorf("Reserve of a settled id = %v, want it reserved again", err)
	}

	// 100 − 30 reserved − 40 leased (by rlease) leaves 30.
	if err := rc.HSet(ctx, "keygate:acct:acme", "leased", 40).Err(); err != nil {
		t.Fatal(err)
	}
	if err := a.store.Reserve(k, "r31", 31, 31, deadline); !errors.Is(err, keystore.ErrInsufficientBalance) {
		t.Errorf("Reserve of 31 with 30 available = %v, want ErrInsufficientBalance", err)
	}
	if err := a.store.Reserve(k, "r30", 30, 30, deadline); err != nil {
		t.Errorf("Reserve of the 30 available = %v", err)
	}
	if err := b.store.Reserve(k, "r1", 1, 1, deadline); !errors.Is(err, keystore.ErrInsufficientBalance) {
		t.Errorf("Reserve of 1 with nothing available = %v, want ErrInsufficientBalance", err)
	}
	wantAmounts(t, "after the balance refusals", both, "acme", k.ID, amounts{100, 60, 0, 60})

	// A cap of 50: 10 spent + 15 leased + 20 reserved leaves 5.
	mustAccount(t, a, "rich", 1_000_000)
	capped := keyWith(t, a, "rich", 50, keystore.PeriodNone, now)
	if err := rc.HSet(ctx, "keygate:key:"+capped.ID, "spent", 10, "leased", 15).Err(); err != nil {
		t.Fatal(err)
	}
	if err := a.store.Reserve(capped, "c20", 20, 20, deadline); err != nil {
		t.Fatal(err)
	}
	if err := b.store.Reserve(capped, "c6", 6, 6, deadline); !errors.Is(err, keystore.ErrSpendCap) {
		t.Errorf("Reserve of 6 with 5 left under the cap = %v, want ErrSpendCap", err)
	}
	if err := b.store.Reserve(capped, "c5", 5, 9, deadline); err != nil {
		t.Errorf("Reserve of the 5 left under the cap = %v", err)
	}
	wantAmounts(t, "after the cap refusal", both, "rich", capped.ID, amounts{1_000_000, 25, 10, 25})

	long := strings.Repeat("x", 129)
	for _, tt := range []struct {
		name       string
		id         string
		price, max money.Micros
	}{
		{"empty id", "", 1, 1},
		{"id of 129 bytes", long, 1, 1},
		{"zero price", "p0", 0, 1},
		{"negative price", "pn", -1, 1},
		{"max below price", "pm", 2, 1},
		{"max beyond money.Max", "px", 1, money.Max + 1},
	} {
		if err := a.store.Reserve(capped, tt.id, tt.price, tt.max, deadline); !errors.Is(err, keystore.ErrInvalid) {
			t.Errorf("%s: Reserve = %v, want ErrInvalid", tt.name, err)
		}
	}
	if err := a.store.Reserve(capped, strings.Repeat("y", 128), 1, 1, now.Add(time.Hour)); !errors.Is(err, keystore.ErrSpendCap) {
		t.Errorf("Reserve with an id of 128 bytes = %v; want it to reach Redis (and the cap)", err)
	}
	if result, _ := a.store.Settle(long, true, 0, false); result != keystore.SettleUnknown {
		t.Errorf("Settle of an id of 129 bytes = %v, want unknown", result)
	}
	wantAmounts(t, "after the invalid ones", both, "rich", capped.ID, amounts{1_000_000, 25, 10, 25})
}

// TestReserveConcurrentExact: three replicas reserving 100 requests each
// at once, against a balance (or a cap) that covers 100, reserve exactly
// 100.
func TestReserveConcurrentExact(t *testing.T) {
	srv := rconntest.Start(t)
	rs := []*replica{startReplica(t, srv, "a", ""), startReplica(t, srv, "b", ""), startReplica(t, srv, "c", "")}
	now := time.Now()
	const price, perReplica, covered = 7, 100, 100
	tests := []struct {
		name     string
		balance  money.Micros
		cap      money.Micros
		refusal  error
		wantBal  money.Micros
		wantResv money.Micros
	}{
		{"balance", covered * price, 0, keystore.ErrInsufficientBalance, covered * price, covered * price},
		{"cap", 1_000_000, covered * price, keystore.ErrSpendCap, 1_000_000, covered * price},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mustAccount(t, rs[0], tt.name, tt.balance)
			k := keyWith(t, rs[0], tt.name, tt.cap, keystore.PeriodNone, now)
			var ok, refused atomic.Int64
			var wg sync.WaitGroup
			start := make(chan struct{})
			for _, r := range rs {
				for i := range perReplica {
					wg.Go(func() {
						<-start
						err := r.store.Reserve(k, fmt.Sprintf("%s-%s-%d", tt.name, r.name, i), price, price, now.Add(time.Hour))
						switch {
						case err == nil:
							ok.Add(1)
						case errors.Is(err, tt.refusal):
							refused.Add(1)
						default:
							t.Errorf("Reserve: %v", err)
						}
					})
				}
			}
			close(start)
			wg.Wait()
			if ok.Load() != covered || refused.Load() != int64(len(rs)*perReplica-covered) {
				t.Errorf("%d reserved, %d refused; want %d and %d", ok.Load(), refused.Load(), covered, len(rs)*perReplica-covered)
			}
			wantAmounts(t, "after the race", rs, tt.name, k.ID, amounts{tt.wantBal, tt.wantResv, 0, tt.wantResv})
		})
	}
}

// TestExpiryOnce: reservations past their deadline are committed at their
// price once, even with two replicas sweeping at once, in batches; a later
// log entry finds nothing to settle and changes nothing.
func TestExpiryOnce(t *testing.T) {
	srv := rconntest.Start(t)
	a, b := startReplica(t, srv, "a", ""), startReplica(t, srv, "b", "")
	both := []*replica{a, b}
	now := time.Now()
	const n, price = 300, 2 // more than one batch of 256
	mustAccount(t, a, "acme", 10_000)
	k := keyWith(t, a, "acme", 0, keystore.PeriodNone, now)
	for i := range n {
		r := both[i%2]
		if err := r.store.Reserve(k, fmt.Sprintf("due-%d", i), price, 5*price, now.Add(time.Minute)); err != nil {
			t.Fatal(err)
		}
	}
	if err := a.store.Reserve(k, "later", price, price, now.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	// Nothing is due a millisecond before the deadline.
	if got := a.store.ExpireReservations(now.Add(time.Minute - time.Millisecond)); got != 0 {
		t.Errorf("ExpireReservations before the deadline = %d, want 0", got)
	}
	var wg sync.WaitGroup
	var counts [2]int
	for i, r := range both {
		wg.Go(func() { counts[i] = r.store.ExpireReservations(now.Add(2 * time.Minute)) })
	}
	wg.Wait()
	if counts[0]+counts[1] != n {
		t.Errorf("ExpireReservations committed %d + %d, want %d in all", counts[0], counts[1], n)
	}
	want := amounts{10_000 - n*price, price, n * price, price}
	wantAmounts(t, "after the expiry", both, "acme", k.ID, want)
	expired := metricValue(t, a.reg, "keygate_reservations_expired_total", "") +
		metricValue(t, b.reg, "keygate_reservations_expired_total", "")
	if expired != n {
		t.Errorf("keygate_reservations_expired_total = %v in all, want %d", expired, n)
	}
	for _, r := range both {
		if got := r.store.ExpireReservations(now.Add(2 * time.Minute)); got != 0 {
			t.Errorf("a second sweep on %s committed %d, want 0", r.name, got)
		}
	}
	// A committed reservation is final: a late log entry (of a failure, or
	// with a cost) changes nothing.
	for _, r := range both {
		if result, charged := r.store.Settle("due-7", false, 0, false); result != keystore.SettleUnknown || charged != 0 {
			t.Errorf("late Settle on %s = %v, %v; want unknown", r.name, result, charged)
		}
		if result, _ := r.store.Settle("due-8", true, 1, true); result != keystore.SettleUnknown {
			t.Errorf("late Settle with a cost on %s = %v, want unknown", r.name, result)
		}
	}
	wantAmounts(t, "after the late entries", both, "acme", k.ID, want)
	if n, err := rawClient(t, srv).Exists(context.Background(), "keygate:res:due-7").Result(); err != nil || n != 0 {
		t.Errorf("the expired reservation's hash: EXISTS = %d, %v; want it gone", n, err)
	}
}

// TestAlertsOnceAcrossReplicas: charges settled at once on two replicas,
// and one expired, cross each threshold of the key's cap, and the
// account's alert level, once in all.
func TestAlertsOnceAcrossReplicas(t *testing.T) {
	srv := rconntest.Start(t)
	sink := new(alertSink)
	o := redisstore.Options{Thresholds: []float64{0.5, 0.8, 1.0}, Alerts: sink.add}
	a, b := startReplicaWith(t, srv, "a", "", o), startReplicaWith(t, srv, "b", "", o)
	both := []*replica{a, b}
	now := time.Now()
	if _, err := a.store.CreateAccount("acme", "free", 140, now, keystore.WithAlertBelow(50)); err != nil {
		t.Fatal(err)
	}
	k := keyWith(t, a, "acme", 100, keystore.PeriodNone, now)
	for i := range 10 {
		if err := both[i%2].store.Reserve(k, fmt.Sprintf("r%d", i), 10, 10, now.Add(time.Minute)); err != nil {
			t.Fatal(err)
		}
	}
	// Nine settle at once, from both replicas: spend goes to 90 (50% and
	// 80% crossed), the balance to 50 (not yet under 50).
	var wg sync.WaitGroup
	for i := range 9 {
		wg.Go(func() {
			if result, _ := both[(i+1)%2].store.Settle(fmt.Sprintf("r%d", i), true, 0, false); result != keystore.SettleCommitted {
				t.Errorf("Settle r%d = %v", i, result)
			}
		})
	}
	wg.Wait()
	want := []keystore.Alert{
		{Type: keystore.AlertKeySpend, KeyID: k.ID, Account: "acme", Threshold: 0.5, Cap: 100},
		{Type: keystore.AlertKeySpend, KeyID: k.ID, Account: "acme", Threshold: 0.8, Cap: 100},
	}
	// Spent is that of the charge that crossed: any of 50..90 and 80..90.
	ignore := cmpopts.IgnoreFields(keystore.Alert{}, "At", "Spent")
	sortAlerts := cmpopts.SortSlices(func(x, y keystore.Alert) bool {
		return x.Type+fmt.Sprint(x.Threshold) < y.Type+fmt.Sprint(y.Threshold)
	})
	if diff := cmp.Diff(want, sink.take(), ignore, sortAlerts); diff != "" {
		t.Errorf("alerts of the settlements (-want +got):\n%s", diff)
	}
	// The last one expires: 100% of the cap, and the balance under 50.
	if n := b.store.ExpireReservations(now.Add(2 * time.Minute)); n != 1 {
		t.Fatalf("ExpireReservations = %d, want 1", n)
	}
	want = []keystore.Alert{
		{Type: keystore.AlertKeySpend, KeyID: k.ID, Account: "acme", Threshold: 1.0, Spent: 100, Cap: 100},
		{Type: keystore.AlertAccountBalanceLow, Account: "acme", Balance: 40, AlertBelow: 50},
	}
	if diff := cmp.Diff(want, sink.take(), cmpopts.IgnoreFields(keystore.Alert{}, "At"), sortAlerts); diff != "" {
		t.Errorf("alerts of the expiry (-want +got):\n%s", diff)
	}
	wantAmounts(t, "at the end", both, "acme", k.ID, amounts{40, 0, 100, 0})
}

// TestSettlePeriodRoll: a key's spend of an ended cap period reads as 0
// (without a write), the next reservation rolls it over in Redis, and a
// charge settled in a new period counts there, crossing its thresholds
// again.
func TestSettlePeriodRoll(t *testing.T) {
	srv := rconntest.Start(t)
	day1 := time.Date(2026, 3, 10, 12, 0, 0, 0, time.UTC)
	clk := &clock{t: day1}
	sink := new(alertSink)
	o := redisstore.Options{Now: clk.Now, Thresholds: []float64{0.5}, Alerts: sink.add}
	a, b := startReplicaWith(t, srv, "a", "", o), startReplicaWith(t, srv, "b", "", o)
	both := []*replica{a, b}
	rc := rawClient(t, srv)
	ctx := context.Background()
	mustAccount(t, a, "acme", 1000)
	k := keyWith(t, a, "acme", 100, keystore.PeriodDay, day1)
	deadline := day1.Add(72 * time.Hour)
	period := func() string {
		t.Helper()
		p, err := rc.HGet(ctx, "keygate:key:"+k.ID, "period").Result()
		if err != nil {
			t.Fatal(err)
		}
		return p
	}

	if err := a.store.Reserve(k, "d1", 60, 60, deadline); err != nil {
		t.Fatal(err)
	}
	if result, charged := b.store.Settle("d1", true, 0, false); result != keystore.SettleCommitted || charged != 60 {
		t.Fatalf("Settle d1 = %v, %v", result, charged)
	}
	if got := len(sink.take()); got != 1 {
		t.Errorf("alerts on day 1: %d, want 1 (50%%)", got)
	}
	// Reserved on day 1 with 40 left under the cap; settled on day 2.
	if err := a.store.Reserve(k, "late", 40, 40, deadline); err != nil {
		t.Fatal(err)
	}
	if err := a.store.Reserve(k, "over", 1, 1, deadline); !errors.Is(err, keystore.ErrSpendCap) {
		t.Errorf("Reserve past the cap on day 1 = %v, want ErrSpendCap", err)
	}

	clk.Set(day1.Add(24 * time.Hour))
	wantAmounts(t, "day 2, before any charge", both, "acme", k.ID, amounts{940, 40, 0, 40})
	if p := period(); p != fmt.Sprint(keystore.PeriodDay.Index(day1)) {
		t.Errorf("a read wrote the period: %s", p)
	}
	info, err := b.store.Key(k.ID)
	if err != nil || !info.PeriodResetsAt.Equal(day1.Truncate(24*time.Hour).Add(48*time.Hour)) {
		t.Errorf("Key = %+v, %v; want the period to reset at the start of day 3", info, err)
	}
	// The new day's cap takes 60 besides the 40 reserved.
	if err := b.store.Reserve(k, "d2", 60, 60, deadline); err != nil {
		t.Errorf("Reserve on day 2 = %v, want the period rolled over", err)
	}
	if p := period(); p != fmt.Sprint(keystore.PeriodDay.Index(day1)+1) {
		t.Errorf("period after a reservation on day 2 = %s, want %d", p, keystore.PeriodDay.Index(day1)+1)
	}
	if result, charged := a.store.Settle("late", true, 0, false); result != keystore.SettleCommitted || charged != 40 {
		t.Errorf("Settle late = %v, %v", result, charged)
	}
	if result, charged := a.store.Settle("d2", true, 30, true); result != keystore.SettleCommitted || charged != 30 {
		t.Errorf("Settle d2 = %v, %v", result, charged)
	}
	wantAmounts(t, "day 2", both, "acme", k.ID, amounts{870, 0, 70, 0})
	if got := sink.take(); len(got) != 1 || got[0].Spent != 70 || !got[0].At.Equal(day1.Add(24*time.Hour)) {
		t.Errorf("alerts on day 2 = %+v; want 50%% crossed again, once, at the injected time", got)
	}

	// A settlement that is the first charge of day 3 rolls over by itself.
	if err := a.store.Reserve(k, "d3", 10, 10, deadline); err != nil {
		t.Fatal(err)
	}
	clk.Set(day1.Add(48 * time.Hour))
	if result, _ := b.store.Settle("d3", true, 0, false); result != keystore.SettleCommitted {
		t.Errorf("Settle d3 = %v", result)
	}
	wantAmounts(t, "day 3", both, "acme", k.ID, amounts{860, 0, 10, 0})
	if p := period(); p != fmt.Sprint(keystore.PeriodDay.Index(day1)+2) {
		t.Errorf("period after a settlement on day 3 = %s, want %d", p, keystore.PeriodDay.Index(day1)+2)
	}
}

// TestSettleRedisDown: while Redis is down, Reserve fails as unavailable
// (a 503 for authz) and Settle says unknown and counts the error; the
// reservation survives in Redis, so that a Settle after the outage, or the
// expiry, ends it.
func TestSettleRedisDown(t *testing.T) {
	srv := rconntest.Start(t)
	a, b := startReplica(t, srv, "a", ""), startReplica(t, srv, "b", "")
	now := time.Now()
	mustAccount(t, a, "acme", 100)
	k := keyWith(t, a, "acme", 0, keystore.PeriodNone, now)
	if err := a.store.Reserve(k, "kept", 10, 10, now.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	srv.Stop()
	if err := a.store.Reserve(k, "refused", 10, 10, now.Add(time.Hour)); !errors.Is(err, rconn.ErrUnavailable) {
		t.Errorf("Reserve with Redis down = %v, want rconn.ErrUnavailable", err)
	}
	if result, charged := b.store.Settle("kept", true, 0, false); result != keystore.SettleUnknown || charged != 0 {
		t.Errorf("Settle with Redis down = %v, %v; want unknown", result, charged)
	}
	if got := metricValue(t, b.reg, "keygate_settle_errors_total", ""); got != 1 {
		t.Errorf("keygate_settle_errors_total = %v, want 1", got)
	}
	if got := b.store.ExpireReservations(now.Add(2 * time.Hour)); got != 0 {
		t.Errorf("ExpireReservations with Redis down = %d, want 0", got)
	}
	srv.Restart()
	// A failed Settle leaves the reservation: retrying it is safe.
	var result keystore.Settled
	var charged money.Micros
	eventually(t, "Settle works again", func() bool {
		result, charged = b.store.Settle("kept", true, 0, false)
		return result != keystore.SettleUnknown
	})
	if result != keystore.SettleCommitted || charged != 10 {
		t.Errorf("Settle after the outage = %v, %v; want committed, 10", result, charged)
	}
	for _, r := range []*replica{a, b} {
		eventually(t, r.name+" reads again", func() bool {
			_, err := r.store.Account("acme")
			return err == nil
		})
	}
	wantAmounts(t, "after the outage", []*replica{a, b}, "acme", k.ID, amounts{90, 0, 10, 0})
}
