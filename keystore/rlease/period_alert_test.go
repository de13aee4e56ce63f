package rlease

import (
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/money"
	"github.com/keygate/keygate/keystore/rconn/rconntest"
)

// TestLeaseRespectsReserved: what redisstore's open reservations hold (the
// reserved fields) is not leased, from the account nor from a capped key,
// on top of what is spent and leased.
func TestLeaseRespectsReserved(t *testing.T) {
	const price = money.Micros(100)
	tests := []struct {
		name         string
		bal, acctRes money.Micros
		cap, spent   money.Micros
		keyRes       money.Micros
		wantSpends   int
		wantErr      error
	}{
		{name: "account", bal: 10 * price, acctRes: 7 * price, wantSpends: 3, wantErr: keystore.ErrInsufficientBalance},
		{name: "account all reserved", bal: 10 * price, acctRes: 10 * price, wantErr: keystore.ErrInsufficientBalance},
		{name: "account reserved, part of a price left", bal: 10 * price, acctRes: 7*price + 1, wantSpends: 2,
			wantErr: keystore.ErrInsufficientBalance},
		{name: "key", bal: 1000 * price, cap: 10 * price, keyRes: 6 * price, wantSpends: 4, wantErr: keystore.ErrSpendCap},
		{name: "key spent and reserved", bal: 1000 * price, cap: 10 * price, spent: 3 * price, keyRes: 6 * price,
			wantSpends: 1, wantErr: keystore.ErrSpendCap},
		{name: "both, the account tighter", bal: 10 * price, acctRes: 8 * price, cap: 10 * price, keyRes: 5 * price,
			wantSpends: 2, wantErr: keystore.ErrInsufficientBalance},
		{name: "reserved on an uncapped key is the account's", bal: 10 * price, keyRes: 9 * price, wantSpends: 10,
			wantErr: keystore.ErrInsufficientBalance},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := rconntest.Start(t)
			c := dial(t, srv)
			a := newAdmin(t, c)
			a.account("a", tt.bal)
			k := a.key("k", "a", tt.cap)
			a.set(c.Key("acct", "a"), "reserved", int64(tt.acctRes))
			a.set(c.Key("key", "k"), "reserved", int64(tt.keyRes), "spent", int64(tt.spent))
			l := ledger(t, c, LedgerOptions{ReplicaID: "r"})
			spends := 0
			for {
				err := l.Spend(k, price)
				if err != nil {
					if !errors.Is(err, tt.wantErr) {
						t.Fatalf("Spend %d: %v, want %v", spends+1, err, tt.wantErr)
					}
					break
				}
				if spends++; spends > 1000 {
					t.Fatal("Spend never refused")
				}
			}
			if spends != tt.wantSpends {
				t.Errorf("%d spends allowed, want %d", spends, tt.wantSpends)
			}
			closeAll(t, l)
			bal, leased := a.acct("a")
			spent, kLeased := a.keyMoney("k")
			if want := tt.bal - money.Micros(spends)*price; bal != want || leased != 0 || kLeased != 0 {
				t.Errorf("after Close: bal %d leased %d/%d; want %d 0/0", bal, leased, kLeased, want)
			}
			if want := tt.spent + money.Micros(spends)*price; spent != want {
				t.Errorf("after Close: spent %d, want %d", spent, want)
			}
			if r := a.field(c.Key("acct", "a"), "reserved"); r != tt.acctRes {
				t.Errorf("account reserved %d after Close, want it untouched: %d", r, tt.acctRes)
			}
		})
	}
}

// TestCapPeriodRoll: a key with a day or month cap spends its cap in each
// period. A report sent after the period ended starts the key's spend over
// before charging; a lease taken in a new period starts it over before
// checking the cap. The spend is exact in every period.
func TestCapPeriodRoll(t *testing.T) {
	const (
		price = money.Micros(100)
		capM  = 10 * price
		bal   = 1_000_000 * price
	)
	for _, p := range []keystore.Period{keystore.PeriodDay, keystore.PeriodMonth} {
		t.Run(p.String(), func(t *testing.T) {
			srv := rconntest.Start(t)
			c := dial(t, srv)
			a := newAdmin(t, c)
			a.account("a", bal)
			k := a.periodKey("k", "a", capM, p)
			if k.CapPeriod() != p {
				t.Fatalf("key's cap period %s, want %s", k.CapPeriod(), p)
			}
			clk := newClock()
			clk.Add(p.ResetsAt(clk.Now()).Sub(clk.Now()) - time.Second) // a second before period N ends
			n := int64(p.Index(clk.Now()))
			l := ledger(t, c, LedgerOptions{ReplicaID: "r", Now: clk.Now})
			kk := c.Key("key", "k")
			check := func(when string, wantSpent money.Micros, wantPeriod int64) {
				t.Helper()
				if got := a.field(kk, "spent"); got != wantSpent {
					t.Errorf("%s: spent %d, want %d", when, got, wantSpent)
				}
				if got := int64(a.field(kk, "period")); got != wantPeriod {
					t.Errorf("%s: period %d, want %d", when, got, wantPeriod)
				}
			}
			spend := func(times int) {
				t.Helper()
				for i := range times {
					if err := l.Spend(k, price); err != nil {
						t.Fatalf("Spend %d of %d: %v", i+1, times, err)
					}
				}
			}
			refused := func(when string) {
				t.Helper()
				if err := l.Spend(k, price); !errors.Is(err, keystore.ErrSpendCap) {
					t.Fatalf("%s: Spend past the cap: %v, want ErrSpendCap", when, err)
				}
			}

			// Period N: 4 prices, reported in N.
			spend(4)
			if err := l.report(false); err != nil {
				t.Fatal(err)
			}
			check("reported in period N", 4*price, n)

			// One more from the lease held, spent and reported in N+1: the
			// report rolls first, so N's 4 prices are not N+1's.
			clk.Add(2 * time.Second)
			before := c.Commands()
			spend(1)
			if got := c.Commands() - before; got != 0 {
				t.Fatalf("Spend from the lease held made %d Redis calls", got)
			}
			if err := l.report(false); err != nil {
				t.Fatal(err)
			}
			check("reported in period N+1", price, n+1)

			// The rest of N+1's cap, then refused.
			spend(9)
			refused("period N+1")
			if err := l.report(false); err != nil {
				t.Fatal(err)
			}
			check("N+1 spent", capM, n+1)

			// Period N+2: the lease rolls the spend, the whole cap again.
			clk.Add(p.ResetsAt(clk.Now()).Sub(clk.Now()))
			spend(10)
			refused("period N+2")
			closeAll(t, l)
			check("after Close in period N+2", capM, n+2)
			if got, want := a.field(c.Key("acct", "a"), "bal"), bal-24*price; got != want {
				t.Errorf("balance %d, want %d (every period charged)", got, want)
			}
		})
	}
}

// TestCapPeriodNoneNeverRolls: a capped key without a period keeps its
// lifetime spend whatever the clock says.
func TestCapPeriodNoneNeverRolls(t *testing.T) {
	srv := rconntest.Start(t)
	c := dial(t, srv)
	a := newAdmin(t, c)
	a.account("a", 1_000_000)
	k := a.key("k", "a", 1000)
	clk := newClock()
	l := ledger(t, c, LedgerOptions{ReplicaID: "r", Now: clk.Now})
	if err := l.Spend(k, 600); err != nil {
		t.Fatal(err)
	}
	if err := l.report(false); err != nil {
		t.Fatal(err)
	}
	clk.Add(40 * 24 * time.Hour)
	if err := l.Spend(k, 600); !errors.Is(err, keystore.ErrSpendCap) {
		t.Errorf("Spend 40 days later past a lifetime cap: %v, want ErrSpendCap", err)
	}
	closeAll(t, l)
	if spent, _ := a.keyMoney("k"); spent != 600 {
		t.Errorf("spent %d, want 600", spent)
	}
	if p := a.field(c.Key("key", "k"), "period"); p != 0 {
		t.Errorf("period %d, want 0 (none)", p)
	}
}

// alertSink collects what LedgerOptions.Alerts is given, from any replica.
type alertSink struct {
	mu     sync.Mutex
	alerts []keystore.Alert
}

func (s *alertSink) add(a []keystore.Alert) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.alerts = append(s.alerts, a...)
}

func (s *alertSink) take() []keystore.Alert {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := s.alerts
	s.alerts = nil
	return out
}

// alertFields compares alerts without their times and IDs (the ledger
// leaves IDs to RaiseAlerts).
var alertFields = cmpopts.IgnoreFields(keystore.Alert{}, "At", "ID")

// TestAlertsOnceAcrossReplicas: three replicas spend one key past 50%, 80%
// and 100% of its cap, or one account below its alert level, reporting
// while they spend: each crossing is raised exactly once in all, by
// whichever replica's report applied the charge.
func TestAlertsOnceAcrossReplicas(t *testing.T) {
	const price = money.Micros(1000)
	tests := []struct {
		name       string
		bal, below money.Micros
		cap        money.Micros
		wantErr    error
		want       []keystore.Alert // Spent and Balance are checked apart
	}{
		{name: "key thresholds", bal: 1000 * price, cap: 100 * price, wantErr: keystore.ErrSpendCap,
			want: []keystore.Alert{
				{Type: keystore.AlertKeySpend, KeyID: "k", Account: "a", Threshold: 0.5, Cap: 100 * price},
				{Type: keystore.AlertKeySpend, KeyID: "k", Account: "a", Threshold: 0.8, Cap: 100 * price},
				{Type: keystore.AlertKeySpend, KeyID: "k", Account: "a", Threshold: 1.0, Cap: 100 * price},
			}},
		{name: "account below", bal: 100 * price, below: 30*price + 1, wantErr: keystore.ErrInsufficientBalance,
			want: []keystore.Alert{
				{Type: keystore.AlertAccountBalanceLow, Account: "a", AlertBelow: 30*price + 1},
			}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := rconntest.Start(t)
			a := newAdmin(t, dial(t, srv))
			a.account("a", tt.bal)
			if tt.below > 0 {
				a.set(a.c.Key("acct", "a"), "alert_below", int64(tt.below))
			}
			k := a.key("k", "a", tt.cap)
			var sink alertSink
			var ls []*Ledger
			for i := range 3 {
				ls = append(ls, ledger(t, dial(t, srv), LedgerOptions{ReplicaID: fmt.Sprintf("r%d", i), Alerts: sink.add}))
			}
			var wg sync.WaitGroup
			for _, l := range ls {
				for g := range 4 {
					wg.Go(func() {
						for i := 0; ; i++ {
							err := l.Spend(k, price)
							if errors.Is(err, tt.wantErr) {
								return
							}
							if err != nil {
								t.Errorf("Spend: %v", err)
								return
							}
							if (i+g)%5 == 0 {
								if err := l.report(false); err != nil {
									t.Errorf("report: %v", err)
								}
							}
						}
					})
				}
			}
			wg.Wait()
			closeAll(t, ls...)

			got := sink.take()
			slices.SortFunc(got, func(x, y keystore.Alert) int {
				if x.Threshold < y.Threshold {
					return -1
				}
				if x.Threshold > y.Threshold {
					return 1
				}
				return 0
			})
			if diff := cmp.Diff(tt.want, got, alertFields, cmpopts.IgnoreFields(keystore.Alert{}, "Spent", "Balance")); diff != "" {
				t.Fatalf("alerts (-want +got):\n%s", diff)
			}
			for _, al := range got {
				switch al.Type {
				case keystore.AlertKeySpend:
					if th := money.Micros(al.Threshold * float64(al.Cap)); al.Spent < th || al.Spent > al.Cap {
						t.Errorf("alert at %v: spent %d, want in [%d, %d]", al.Threshold, al.Spent, th, al.Cap)
					}
				case keystore.AlertAccountBalanceLow:
					if al.Balance >= al.AlertBelow || al.Balance < 0 {
						t.Errorf("low-balance alert with balance %d, alert level %d", al.Balance, al.AlertBelow)
					}
				}
				if al.At.IsZero() {
					t.Errorf("alert %+v without a time", al)
				}
			}
		})
	}
}

// TestAlertsRetriedReport: a report whose reply is lost has been applied;
// its retry changes nothing in Redis and raises the alerts that no one
// raised (once), and a report already applied and answered raises nothing
// when it is sent again, as a journal replay does.
func TestAlertsRetriedReport(t *testing.T) {
	srv := rconntest.Start(t)
	c := dial(t, srv)
	a := newAdmin(t, c)
	a.account("a", 100_000)
	a.set(c.Key("acct", "a"), "alert_below", 99_500)
	k := a.key("k", "a", 1000)
	f := newFaultConn(c)
	var sink alertSink
	l := ledger(t, f, LedgerOptions{ReplicaID: "r", Alerts: sink.add})
	for range 6 {
		if err := l.Spend(k, 100); err != nil {
			t.Fatal(err)
		}
	}
	f.loseNext("report", 1)
	if err := l.report(false); !errors.Is(err, errLostReply) {
		t.Fatalf("report: %v, want the lost reply", err)
	}
	if got := sink.take(); len(got) != 0 {
		t.Fatalf("alerts from a report whose reply was lost: %+v", got)
	}
	if spent, _ := a.keyMoney("k"); spent != 600 {
		t.Fatalf("spent %d after the report whose reply was lost, want 600 (Redis ran it)", spent)
	}
	lost := l.queue[0]

	if err := l.report(false); err != nil { // the retry: the same batch and seq
		t.Fatal(err)
	}
	want := []keystore.Alert{
		{Type: keystore.AlertKeySpend, KeyID: "k", Account: "a", Threshold: 0.5, Spent: 600, Cap: 1000},
		{Type: keystore.AlertAccountBalanceLow, Account: "a", Balance: 99_400, AlertBelow: 99_500},
	}
	if diff := cmp.Diff(want, sink.take(), alertFields); diff != "" {
		t.Errorf("alerts of the retry (-want +got):\n%s", diff)
	}
	if spent, _ := a.keyMoney("k"); spent != 600 {
		t.Errorf("spent %d after the retry, want 600 (applied once)", spent)
	}

	// Another report is applied; the first one sent again (a journal
	// replay after a restart) is ignored and raises nothing.
	if err := l.Spend(k, 100); err != nil {
		t.Fatal(err)
	}
	if err := l.report(false); err != nil {
		t.Fatal(err)
	}
	if got := sink.take(); len(got) != 0 {
		t.Errorf("alerts from a report that crossed nothing: %+v", got)
	}
	var again []keystore.Alert
	l.rmu.Lock()
	err := l.send(lost, &again)
	l.rmu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	if len(again) != 0 {
		t.Errorf("alerts from a report sent again after it was answered: %+v", again)
	}
	closeAll(t, l)
	if got := sink.take(); len(got) != 0 {
		t.Errorf("alerts from Close: %+v", got)
	}
	if spent, _ := a.keyMoney("k"); spent != 700 {
		t.Errorf("spent %d after Close, want 700", spent)
	}
}

// TestAlertsThresholdsOption: the thresholds are the options', in order
// whatever order they are given in, and one charge crossing several raises
// one alert for each.
func TestAlertsThresholdsOption(t *testing.T) {
	srv := rconntest.Start(t)
	c := dial(t, srv)
	a := newAdmin(t, c)
	a.account("a", 100_000)
	k := a.key("k", "a", 1000)
	var sink alertSink
	l := ledger(t, c, LedgerOptions{ReplicaID: "r", Alerts: sink.add, Thresholds: []float64{0.9, 0.25}})
	for range 10 {
		if err := l.Spend(k, 100); err != nil {
			t.Fatal(err)
		}
	}
	closeAll(t, l)
	want := []keystore.Alert{
		{Type: keystore.AlertKeySpend, KeyID: "k", Account: "a", Threshold: 0.25, Spent: 1000, Cap: 1000},
		{Type: keystore.AlertKeySpend, KeyID: "k", Account: "a", Threshold: 0.9, Spent: 1000, Cap: 1000},
	}
	if diff := cmp.Diff(want, sink.take(), alertFields); diff != "" {
		t.Errorf("alerts (-want +got):\n%s", diff)
	}
}
