package keystore_test

import (
	"encoding/json"
	"errors"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/keystoretest"
	"github.com/keygate/keygate/keystore/money"
)

// clock is an injectable Options.Now, safe for concurrent use.
type clock struct{ ns atomic.Int64 }

func newClock(t time.Time) *clock {
	c := new(clock)
	c.set(t)
	return c
}

func (c *clock) Now() time.Time  { return time.Unix(0, c.ns.Load()).UTC() }
func (c *clock) set(t time.Time) { c.ns.Store(t.UnixNano()) }

// alerts collects what Options.OnAlert is given, one batch per flush.
type alerts struct {
	mu      sync.Mutex
	batches [][]keystore.Alert
}

func (a *alerts) onAlert(batch []keystore.Alert) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.batches = append(a.batches, batch)
}

// take returns the alerts given since the last take, flattened.
func (a *alerts) take() []keystore.Alert {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []keystore.Alert
	for _, b := range a.batches {
		out = append(out, b...)
	}
	a.batches = nil
	return out
}

func openWith(t testing.TB, path string, o keystore.Options) *keystore.Store {
	t.Helper()
	s, err := keystore.Open(path, o)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func mustFlush(t testing.TB, s *keystore.Store) {
	t.Helper()
	if err := s.Flush(); err != nil {
		t.Fatal(err)
	}
}

// ignoreID compares alerts without their IDs, which are checked apart.
var ignoreID = cmpopts.IgnoreFields(keystore.Alert{}, "ID")

// TestKeySpendAlerts: each threshold of the cap fires once, when the spend
// reaches it (>=), in the flush after the charge.
func TestKeySpendAlerts(t *testing.T) {
	clk := newClock(t0)
	var got alerts
	s := keystoretest.OpenWith(t, keystore.Options{Now: clk.Now, OnAlert: got.onAlert})
	mustAccount(t, s, "acme", money.PerUSD)
	info, secret := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}, SpendCap: 100})
	k := mustLookup(t, s, secret)
	alert := func(threshold float64, spent money.Micros) keystore.Alert {
		return keystore.Alert{Type: keystore.AlertKeySpend, KeyID: info.ID, Account: "acme",
			Threshold: threshold, Spent: spent, Cap: 100}
	}
	seen := map[string]bool{}
	steps := []struct {
		name  string
		price money.Micros
		want  []keystore.Alert
	}{
		{"below half", 49, nil},
		{"half exactly", 1, []keystore.Alert{alert(0.5, 50)}},
		{"past half again", 1, nil},
		{"just below 80%", 28, nil},
		{"80% exactly", 1, []keystore.Alert{alert(0.8, 80)}},
		{"the cap exactly", 20, []keystore.Alert{alert(1.0, 100)}},
	}
	for i, st := range steps {
		clk.set(t0.Add(time.Duration(i) * time.Minute))
		for j := range st.want {
			st.want[j].At = clk.Now() // the time of the charge
		}
		if err := s.Debit(k, st.price); err != nil {
			t.Fatalf("%s: %v", st.name, err)
		}
		if early := got.take(); len(early) != 0 {
			t.Fatalf("%s: OnAlert was called before the flush: %+v", st.name, early)
		}
		mustFlush(t, s)
		alerts := got.take()
		if diff := cmp.Diff(st.want, alerts, ignoreID); diff != "" {
			t.Errorf("%s: alerts (-want +got):\n%s", st.name, diff)
		}
		for _, a := range alerts {
			if a.ID == "" || seen[a.ID] {
				t.Errorf("%s: alert ID %q is empty or used twice", st.name, a.ID)
			}
			seen[a.ID] = true
		}
	}
	if err := s.Debit(k, 1); !errors.Is(err, keystore.ErrSpendCap) {
		t.Fatalf("Debit past the cap = %v", err)
	}
	mustFlush(t, s)
	if extra := got.take(); len(extra) != 0 {
		t.Errorf("a refused debit raised %+v", extra)
	}
}

// TestAlertOneChargeSeveralThresholds: one charge that crosses two
// thresholds raises two alerts, each with the spend it reached.
func TestAlertOneChargeSeveralThresholds(t *testing.T) {
	clk := newClock(t0)
	var got alerts
	s := keystoretest.OpenWith(t, keystore.Options{Now: clk.Now, OnAlert: got.onAlert})
	mustAccount(t, s, "acme", money.PerUSD)
	info, secret := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}, SpendCap: 1_000})
	k := mustLookup(t, s, secret)
	if err := s.Debit(k, 1_000); err != nil { // all three at once
		t.Fatal(err)
	}
	mustFlush(t, s)
	var thresholds []float64
	for _, a := range got.take() {
		if a.Spent != 1_000 || a.Cap != 1_000 || a.KeyID != info.ID {
			t.Errorf("alert %+v", a)
		}
		thresholds = append(thresholds, a.Threshold)
	}
	if diff := cmp.Diff([]float64{0.5, 0.8, 1.0}, thresholds); diff != "" {
		t.Errorf("thresholds crossed by one charge (-want +got):\n%s", diff)
	}
}

// TestAlertThresholdsOption: thresholds come from Options, in any order; an
// empty list raises no key alert; a threshold whose share of the cap is a
// whole number of micros fires when the spend reaches exactly that.
func TestAlertThresholdsOption(t *testing.T) {
	tests := []struct {
		name       string
		thresholds []float64
		cap, price money.Micros
		want       []float64
	}{
		{"default", nil, 100, 50, []float64{0.5}},
		{"none", []float64{}, 100, 100, nil},
		{"unsorted", []float64{0.9, 0.25}, 100, 90, []float64{0.25, 0.9}},
		{"7% of 100", []float64{0.07}, 100, 7, []float64{0.07}},
		{"just below 7% of 100", []float64{0.07}, 100, 6, nil},
		{"a third of 3", []float64{1.0 / 3}, 3, 1, []float64{1.0 / 3}},
		{"a third of 10 rounds up", []float64{1.0 / 3}, 10, 3, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got alerts
			s := keystoretest.OpenWith(t, keystore.Options{AlertThresholds: tt.thresholds, OnAlert: got.onAlert})
			mustAccount(t, s, "acme", money.PerUSD)
			_, secret := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}, SpendCap: tt.cap})
			if err := s.Debit(mustLookup(t, s, secret), tt.price); err != nil {
				t.Fatal(err)
			}
			mustFlush(t, s)
			var thresholds []float64
			for _, a := range got.take() {
				thresholds = append(thresholds, a.Threshold)
			}
			if diff := cmp.Diff(tt.want, thresholds); diff != "" {
				t.Errorf("thresholds crossed (-want +got):\n%s", diff)
			}
		})
	}
}

// TestNoAlertWithoutCap: a key without a cap, on an account without an
// alert level, never raises an alert.
func TestNoAlertWithoutCap(t *testing.T) {
	var got alerts
	s := keystoretest.OpenWith(t, keystore.Options{OnAlert: got.onAlert, Outbox: true})
	mustAccount(t, s, "acme", 1_000)
	_, secret := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}})
	k := mustLookup(t, s, secret)
	for range 10 {
		if err := s.Debit(k, 100); err != nil {
			t.Fatal(err)
		}
	}
	mustFlush(t, s)
	if a := got.take(); len(a) != 0 {
		t.Errorf("alerts for an uncapped key: %+v", a)
	}
	if p, err := s.PendingAlerts(); err != nil || len(p) != 0 {
		t.Errorf("PendingAlerts = %+v, %v; want none", p, err)
	}
}

// TestAlertNewPeriodRearms: a key with a daily cap crosses its thresholds
// again the next day, and not twice in one day.
func TestAlertNewPeriodRearms(t *testing.T) {
	clk := newClock(time.Date(2026, 3, 10, 23, 0, 0, 0, time.UTC))
	var got alerts
	s := keystoretest.OpenWith(t, keystore.Options{Now: clk.Now, OnAlert: got.onAlert})
	mustAccount(t, s, "acme", money.PerUSD)
	_, secret := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}, SpendCap: 100, CapPeriod: keystore.PeriodDay})
	k := mustLookup(t, s, secret)
	day := func(price money.Micros) []float64 {
		t.Helper()
		if err := s.Debit(k, price); err != nil {
			t.Fatal(err)
		}
		mustFlush(t, s)
		var ths []float64
		for _, a := range got.take() {
			ths = append(ths, a.Threshold)
		}
		return ths
	}
	if got := day(60); !slices.Equal(got, []float64{0.5}) {
		t.Errorf("first day, 60 of 100: %v, want [0.5]", got)
	}
	if got := day(10); got != nil {
		t.Errorf("first day, 70 of 100: %v, want none", got)
	}
	clk.set(time.Date(2026, 3, 11, 0, 0, 0, 0, time.UTC))
	if got := day(60); !slices.Equal(got, []float64{0.5}) {
		t.Errorf("next day, 60 of 100: %v, want [0.5] again", got)
	}
	if got := day(40); !slices.Equal(got, []float64{0.8, 1.0}) {
		t.Errorf("next day, 100 of 100: %v, want [0.8 1]", got)
	}
}

// TestAccountBalanceAlert: the low-balance alert fires when a charge takes
// the balance under the account's level, and not again until a credit has
// lifted it back to the level or above.
func TestAccountBalanceAlert(t *testing.T) {
	clk := newClock(t0)
	var got alerts
	s := keystoretest.OpenWith(t, keystore.Options{Now: clk.Now, OnAlert: got.onAlert})
	if _, err := s.CreateAccount("acme", "free", 100, t0, keystore.WithAlertBelow(50)); err != nil {
		t.Fatal(err)
	}
	if a := account(t, s, "acme"); a.AlertBelow != 50 {
		t.Fatalf("AlertBelow = %d, want 50", a.AlertBelow)
	}
	_, secret := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}})
	k := mustLookup(t, s, secret)
	low := func(balance money.Micros) []keystore.Alert {
		return []keystore.Alert{{Type: keystore.AlertAccountBalanceLow, Account: "acme", At: t0, Balance: balance, AlertBelow: 50}}
	}
	steps := []struct {
		name   string
		debit  money.Micros
		credit money.Micros
		want   []keystore.Alert
	}{
		{"down to the level", 50, 0, nil},
		{"under it", 1, 0, low(49)},
		{"further under", 9, 0, nil},
		{"a credit that stays under", 0, 5, nil},
		{"down again", 5, 0, nil},
		{"a credit up to the level", 0, 10, nil},
		{"under it again", 1, 0, low(49)},
		{"a credit above it", 0, 100, nil},
		{"down to zero", 149, 0, low(0)},
	}
	for _, st := range steps {
		if st.credit > 0 {
			if _, err := s.Credit("acme", st.credit); err != nil {
				t.Fatal(err)
			}
		}
		if st.debit > 0 {
			if err := s.Debit(k, st.debit); err != nil {
				t.Fatalf("%s: %v", st.name, err)
			}
		}
		mustFlush(t, s)
		if diff := cmp.Diff(st.want, got.take(), ignoreID); diff != "" {
			t.Errorf("%s: alerts (-want +got):\n%s", st.name, diff)
		}
	}
}

// TestAlertBelowSetAndRemoved: Credit sets or removes the level; it is
// kept across a reopen; a negative level is refused.
func TestAlertBelowSetAndRemoved(t *testing.T) {
	path := tempPath(t)
	var got alerts
	s := openWith(t, path, keystore.Options{OnAlert: got.onAlert})
	mustAccount(t, s, "acme", 100)
	mustAccount(t, s, "beta", 100)
	if _, err := s.CreateAccount("bad", "", 100, t0, keystore.WithAlertBelow(-1)); !errors.Is(err, keystore.ErrInvalid) {
		t.Errorf("CreateAccount with a negative level = %v, want ErrInvalid", err)
	}
	if _, err := s.Credit("acme", 1, keystore.WithAlertBelow(-1)); !errors.Is(err, keystore.ErrInvalid) {
		t.Errorf("Credit with a negative level = %v, want ErrInvalid", err)
	}
	if a, err := s.Credit("acme", 1, keystore.WithAlertBelow(60)); err != nil || a.AlertBelow != 60 || a.Balance != 101 {
		t.Fatalf("Credit with a level = %+v, %v", a, err)
	}
	if a, err := s.Credit("acme", 1); err != nil || a.AlertBelow != 60 {
		t.Errorf("a Credit without the option changed the level: %+v, %v", a, err)
	}
	if _, err := s.Credit("beta", 1, keystore.WithAlertBelow(60)); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openWith(t, path, keystore.Options{OnAlert: got.onAlert})
	for _, id := range []string{"acme", "beta"} {
		if a := account(t, s, id); a.AlertBelow != 60 {
			t.Errorf("%s after reopen: AlertBelow %d, want 60", id, a.AlertBelow)
		}
	}
	if a, err := s.Credit("beta", 1, keystore.WithAlertBelow(0)); err != nil || a.AlertBelow != 0 {
		t.Fatalf("Credit removing the level = %+v, %v", a, err)
	}
	for _, id := range []string{"acme", "beta"} {
		_, secret := mustKey(t, s, keystore.NewKey{Account: id, Scopes: []string{"a"}})
		if err := s.Debit(mustLookup(t, s, secret), 90); err != nil {
			t.Fatal(err)
		}
	}
	mustFlush(t, s)
	if a := got.take(); len(a) != 1 || a[0].Account != "acme" || a[0].Balance != 12 {
		t.Errorf("alerts %+v; want one, for acme at 12 (beta's level was removed)", a)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openWith(t, path, keystore.Options{})
	defer s.Close()
	if a := account(t, s, "beta"); a.AlertBelow != 0 {
		t.Errorf("beta after reopen: AlertBelow %d, want 0 (removed)", a.AlertBelow)
	}
}

// TestOnAlertAfterTheWrite: OnAlert is called by the flush that wrote the
// alert, after its commit: the alert and its charge are on disk by then.
func TestOnAlertAfterTheWrite(t *testing.T) {
	path := tempPath(t)
	var s *keystore.Store
	calls := 0
	s = openWith(t, path, keystore.Options{Outbox: true, OnAlert: func(batch []keystore.Alert) {
		calls++
		c := mustOpen(t, crashCopy(t, path)) // the file as a crash now would leave it
		defer c.Close()
		pending, err := c.PendingAlerts()
		if err != nil {
			t.Error(err)
			return
		}
		if diff := cmp.Diff(batch, pending); diff != "" {
			t.Errorf("alerts handed to OnAlert and on disk (-handed +disk):\n%s", diff)
		}
		if a := account(t, c, "acme"); a.Balance != 40 {
			t.Errorf("balance on disk when OnAlert runs: %d, want 40", a.Balance)
		}
	}})
	defer s.Close()
	if _, err := s.CreateAccount("acme", "", 100, t0, keystore.WithAlertBelow(50)); err != nil {
		t.Fatal(err)
	}
	_, secret := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}, SpendCap: 100})
	if err := s.Debit(mustLookup(t, s, secret), 60); err != nil {
		t.Fatal(err)
	}
	if calls != 0 {
		t.Fatal("OnAlert called before a flush")
	}
	mustFlush(t, s)
	mustFlush(t, s) // nothing new: no second call
	if calls != 1 {
		t.Errorf("OnAlert called %d times, want 1", calls)
	}
}

// TestOutbox: with Outbox set, alerts wait in the store until AckAlerts,
// across restarts, oldest first; without it, nothing is kept.
func TestOutbox(t *testing.T) {
	path := tempPath(t)
	clk := newClock(t0)
	o := keystore.Options{Now: clk.Now, Outbox: true}
	s := openWith(t, path, o)
	if _, err := s.CreateAccount("acme", "", 1_000, t0, keystore.WithAlertBelow(200)); err != nil {
		t.Fatal(err)
	}
	info, secret := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}, SpendCap: 1_000})
	k := mustLookup(t, s, secret)
	if err := s.Debit(k, 500); err != nil { // key 50%
		t.Fatal(err)
	}
	mustFlush(t, s)
	clk.set(t0.Add(time.Hour))
	if err := s.Debit(k, 400); err != nil { // key 80%, balance under 200
		t.Fatal(err)
	}
	if err := s.Close(); err != nil { // Close flushes
		t.Fatal(err)
	}
	s = openWith(t, path, o)
	pending, err := s.PendingAlerts()
	if err != nil {
		t.Fatal(err)
	}
	want := []keystore.Alert{
		{Type: keystore.AlertKeySpend, KeyID: info.ID, Account: "acme", At: t0, Threshold: 0.5, Spent: 500, Cap: 1_000},
		{Type: keystore.AlertKeySpend, KeyID: info.ID, Account: "acme", At: t0.Add(time.Hour), Threshold: 0.8, Spent: 900, Cap: 1_000},
		{Type: keystore.AlertAccountBalanceLow, Account: "acme", At: t0.Add(time.Hour), Balance: 100, AlertBelow: 200},
	}
	if diff := cmp.Diff(want, pending, ignoreID); diff != "" {
		t.Fatalf("pending after a reopen (-want +got):\n%s", diff)
	}
	if err := s.AckAlerts([]string{pending[0].ID, pending[2].ID, "alert_unknown"}); err != nil {
		t.Fatal(err)
	}
	if err := s.AckAlerts(nil); err != nil {
		t.Errorf("AckAlerts(nil) = %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.AckAlerts([]string{pending[1].ID}); !errors.Is(err, keystore.ErrClosed) {
		t.Errorf("AckAlerts after Close = %v, want ErrClosed", err)
	}
	s = openWith(t, path, o)
	defer s.Close()
	left, err := s.PendingAlerts()
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(pending[1:2], left); diff != "" {
		t.Errorf("pending after acknowledging two (-want +got):\n%s", diff)
	}

	// Without Outbox, alerts reach OnAlert only.
	var got alerts
	path2 := tempPath(t)
	n := openWith(t, path2, keystore.Options{OnAlert: got.onAlert})
	mustAccount(t, n, "acme", 100)
	_, secret2 := mustKey(t, n, keystore.NewKey{Account: "acme", Scopes: []string{"a"}, SpendCap: 100})
	if err := n.Debit(mustLookup(t, n, secret2), 100); err != nil {
		t.Fatal(err)
	}
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	if a := got.take(); len(a) != 3 {
		t.Errorf("OnAlert got %d alerts from Close's flush, want 3", len(a))
	}
	n = openWith(t, path2, keystore.Options{Outbox: true})
	defer n.Close()
	if p, err := n.PendingAlerts(); err != nil || len(p) != 0 {
		t.Errorf("PendingAlerts of a store run without Outbox = %+v, %v; want none", p, err)
	}
}

// TestCreditWritesAlerts: Credit writes the account's balance with the
// unflushed charges in it, so it writes their alerts too; the next flush
// still hands them to OnAlert, once.
func TestCreditWritesAlerts(t *testing.T) {
	path := tempPath(t)
	var got alerts
	s := openWith(t, path, keystore.Options{Outbox: true, OnAlert: got.onAlert})
	defer s.Close()
	if _, err := s.CreateAccount("acme", "", 100, t0, keystore.WithAlertBelow(50)); err != nil {
		t.Fatal(err)
	}
	_, secret := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}})
	if err := s.Debit(mustLookup(t, s, secret), 60); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Credit("acme", 5); err != nil {
		t.Fatal(err)
	}
	c := mustOpen(t, crashCopy(t, path))
	pending, err := c.PendingAlerts()
	bal := account(t, c, "acme").Balance
	c.Close()
	if err != nil || len(pending) != 1 || pending[0].Balance != 40 || bal != 45 {
		t.Errorf("after Credit, on disk: alerts %+v (%v), balance %d; want the alert at 40 and 45", pending, err, bal)
	}
	mustFlush(t, s)
	if a := got.take(); len(a) != 1 || a[0].ID != pending[0].ID {
		t.Errorf("OnAlert after the flush: %+v, want the alert Credit wrote", a)
	}
}

// TestSettleAlerts: in on_response mode alerts follow settled spend:
// reserving never raises one, settling does, at the charged amount.
func TestSettleAlerts(t *testing.T) {
	var got alerts
	s := keystoretest.OpenWith(t, keystore.Options{OnAlert: got.onAlert})
	if _, err := s.CreateAccount("acme", "", 1_000, t0, keystore.WithAlertBelow(500)); err != nil {
		t.Fatal(err)
	}
	info, secret := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}, SpendCap: 1_000})
	k := mustLookup(t, s, secret)
	mustReserve(t, s, k, "a", 900, 900)
	mustFlush(t, s)
	if a := got.take(); len(a) != 0 {
		t.Errorf("a reservation of 90%% of the cap and balance raised %+v", a)
	}
	s.Settle("a", true, 400, true) // 40%: nothing
	mustFlush(t, s)
	if a := got.take(); len(a) != 0 {
		t.Errorf("a settled charge of 40%% raised %+v", a)
	}
	mustReserve(t, s, k, "b", 300, 300)
	s.Settle("b", false, 0, false) // released: nothing
	mustReserve(t, s, k, "c", 200, 200)
	s.Settle("c", true, 0, false) // 60%, balance 400
	mustFlush(t, s)
	want := []keystore.Alert{
		{Type: keystore.AlertKeySpend, KeyID: info.ID, Account: "acme", Threshold: 0.5, Spent: 600, Cap: 1_000},
		{Type: keystore.AlertAccountBalanceLow, Account: "acme", Balance: 400, AlertBelow: 500},
	}
	if diff := cmp.Diff(want, got.take(), ignoreID, cmpopts.IgnoreFields(keystore.Alert{}, "At")); diff != "" {
		t.Errorf("alerts after settling (-want +got):\n%s", diff)
	}
	mustReserve(t, s, k, "d", 100, 100)
	if n := s.ExpireReservations(deadline); n != 1 { // an expiry is a charge too
		t.Fatalf("expired %d", n)
	}
	mustFlush(t, s)
	if a := got.take(); len(a) != 0 {
		t.Errorf("70%% raised %+v", a)
	}
}

// TestAlertJSON pins the webhook body: the fields of the alert's type, a
// zero that applies kept, the others left out.
func TestAlertJSON(t *testing.T) {
	at := time.Date(2026, 5, 6, 7, 8, 9, 10, time.FixedZone("x", 3600))
	tests := []struct {
		name  string
		alert keystore.Alert
		want  map[string]any
		never []string
	}{
		{
			"key_spend",
			keystore.Alert{ID: "alert_1", Type: keystore.AlertKeySpend, KeyID: "key_x", Account: "acme", At: at,
				Threshold: 0.8, Spent: 800_000, Cap: 1_000_000, Balance: 5, AlertBelow: 7},
			map[string]any{"id": "alert_1", "type": "key_spend", "key_id": "key_x", "account": "acme",
				"threshold": 0.8, "spent_micros": 800_000.0, "cap_micros": 1_000_000.0, "at": "2026-05-06T06:08:09.00000001Z"},
			[]string{"balance_micros"},
		},
		{
			"account_balance_low at zero",
			keystore.Alert{ID: "alert_2", Type: keystore.AlertAccountBalanceLow, Account: "acme", At: at,
				Balance: 0, AlertBelow: 1_000_000, Threshold: 0.5, Spent: 3, Cap: 4},
			map[string]any{"id": "alert_2", "type": "account_balance_low", "account": "acme",
				"balance_micros": 0.0, "at": "2026-05-06T06:08:09.00000001Z"},
			[]string{"key_id", "threshold", "spent_micros", "cap_micros"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, err := json.Marshal(tt.alert)
			if err != nil {
				t.Fatal(err)
			}
			var m map[string]any
			if err := json.Unmarshal(b, &m); err != nil {
				t.Fatal(err)
			}
			for k, v := range tt.want {
				if !cmp.Equal(m[k], v) {
					t.Errorf("%s: %v, want %v (body %s)", k, m[k], v, b)
				}
			}
			for _, k := range tt.never {
				if _, ok := m[k]; ok {
					t.Errorf("%s present in a %s alert: %s", k, tt.alert.Type, b)
				}
			}
			var back keystore.Alert
			if err := json.Unmarshal(b, &back); err != nil {
				t.Fatal(err)
			}
			// What does not apply to the type is not carried.
			want := tt.alert
			want.At = want.At.UTC()
			if want.Type == keystore.AlertKeySpend {
				want.Balance, want.AlertBelow = 0, 0
			} else {
				want.Threshold, want.Spent, want.Cap = 0, 0, 0
			}
			if diff := cmp.Diff(want, back); diff != "" {
				t.Errorf("round trip (-want +got):\n%s", diff)
			}
		})
	}
}
