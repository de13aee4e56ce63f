package keystore_test

import (
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/keygate/keygate/keystore"
)

func TestCrossings(t *testing.T) {
	now := time.Date(2026, 11, 26, 12, 0, 0, 0, time.FixedZone("x", 3600))
	th := []float64{0.5, 0.8, 1.0}
	tests := []struct {
		name string
		c    keystore.Crossing
		want []string // type:threshold or type:balance
	}{
		{"below every threshold", keystore.Crossing{Cap: 100, SpentBefore: 10, SpentAfter: 49}, nil},
		{"reaches 50% exactly", keystore.Crossing{Cap: 100, SpentBefore: 49, SpentAfter: 50}, []string{"key_spend:0.5"}},
		{"already past it", keystore.Crossing{Cap: 100, SpentBefore: 50, SpentAfter: 60}, nil},
		{"crosses all three", keystore.Crossing{Cap: 100, SpentBefore: 0, SpentAfter: 100}, []string{"key_spend:0.5", "key_spend:0.8", "key_spend:1"}},
		{"no cap", keystore.Crossing{Cap: 0, SpentBefore: 0, SpentAfter: 1000}, nil},
		{"balance falls under", keystore.Crossing{AlertBelow: 500, BalanceBefore: 500, BalanceAfter: 499}, []string{"account_balance_low"}},
		{"balance already under", keystore.Crossing{AlertBelow: 500, BalanceBefore: 499, BalanceAfter: 10}, nil},
		{"both", keystore.Crossing{Cap: 10, SpentBefore: 7, SpentAfter: 8, AlertBelow: 5, BalanceBefore: 6, BalanceAfter: -1}, []string{"key_spend:0.8", "account_balance_low"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.c.KeyID, tt.c.Account = "key_x", "acme"
			var got []string
			for _, a := range keystore.Crossings(tt.c, th, now) {
				if a.Account != "acme" || !a.At.Equal(now) || a.At.Location() != time.UTC || a.ID != "" {
					t.Errorf("alert %+v: want account acme, at %v in UTC, no ID yet", a, now)
				}
				if a.Type == keystore.AlertKeySpend {
					got = append(got, a.Type+":"+trimFloat(a.Threshold))
					continue
				}
				if a.Balance != tt.c.BalanceAfter || a.AlertBelow != tt.c.AlertBelow {
					t.Errorf("balance alert %+v", a)
				}
				got = append(got, a.Type)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

func trimFloat(f float64) string {
	switch f {
	case 0.5:
		return "0.5"
	case 0.8:
		return "0.8"
	case 1:
		return "1"
	}
	return "?"
}

// RaiseAlerts gives alerts found elsewhere (Redis mode) IDs, keeps them in
// the outbox across a reopen, and hands them to OnAlert.
func TestRaiseAlerts(t *testing.T) {
	path := filepath.Join(t.TempDir(), "k.db")
	var got []keystore.Alert
	s, err := keystore.Open(path, keystore.Options{Outbox: true, OnAlert: func(a []keystore.Alert) { got = append(got, a...) }})
	if err != nil {
		t.Fatal(err)
	}
	in := keystore.Crossings(keystore.Crossing{KeyID: "key_x", Account: "acme", Cap: 100, SpentAfter: 100}, []float64{0.5, 1}, time.Now())
	if err := s.RaiseAlerts(in); err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].ID == "" || got[0].ID == got[1].ID {
		t.Fatalf("OnAlert got %+v: want 2 alerts with distinct IDs", got)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s, err = keystore.Open(path, keystore.Options{Outbox: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	pending, err := s.PendingAlerts()
	if err != nil {
		t.Fatal(err)
	}
	if len(pending) != 2 || pending[0].ID != got[0].ID && pending[0].ID != got[1].ID {
		t.Fatalf("outbox after reopen: %+v", pending)
	}
}
