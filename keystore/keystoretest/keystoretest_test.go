package keystoretest_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/keystoretest"
)

var t0 = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

func TestOpen(t *testing.T) {
	s := keystoretest.Open(t)
	if _, err := s.CreateAccount("acme", "free", 100, t0); err != nil {
		t.Fatal(err)
	}
	_, secret, err := s.CreateKey(keystore.NewKey{Account: "acme", Scopes: []string{"a"}, SpendCap: 50}, t0)
	if err != nil {
		t.Fatal(err)
	}
	k, _ := s.Lookup(secret, t0)
	if err := s.Debit(k, 50); err != nil {
		t.Fatal(err)
	}
	// The cleanup closes, reopens and compares: unflushed debits included.
}

// recorder is a testing.TB that keeps what the checks report.
type recorder struct {
	testing.TB
	errs     []string
	cleanups []func()
}

func (r *recorder) Helper()          {}
func (r *recorder) Cleanup(f func()) { r.cleanups = append(r.cleanups, f) }
func (r *recorder) Errorf(format string, args ...any) {
	r.errs = append(r.errs, fmt.Sprintf(format, args...))
}
func (r *recorder) runCleanups() {
	for i := len(r.cleanups) - 1; i >= 0; i-- {
		r.cleanups[i]()
	}
}

// TestOpenCatchesLostDebits shows the cleanup check can fail: a debit made
// after Close is in memory only, so the reopened store differs.
func TestOpenCatchesLostDebits(t *testing.T) {
	r := &recorder{TB: t}
	s := keystoretest.Open(r)
	if _, err := s.CreateAccount("acme", "free", 100, t0); err != nil {
		t.Fatal(err)
	}
	_, secret, err := s.CreateKey(keystore.NewKey{Account: "acme", Scopes: []string{"a"}}, t0)
	if err != nil {
		t.Fatal(err)
	}
	k, _ := s.Lookup(secret, t0)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Debit(k, 10); err != nil { // never written: the store is closed
		t.Fatal(err)
	}
	r.runCleanups()
	if len(r.errs) != 2 || !strings.Contains(r.errs[0], "accounts changed") || !strings.Contains(r.errs[1], "keys changed") {
		t.Errorf("check reported %q, want the account and the key changed", r.errs)
	}
}

// overdrawn opens a store on r whose account ends $0.000015 below zero: a
// request reserved at 10 micros settled at its maxPrice of 25.
func overdrawn(t *testing.T, r *recorder, opts ...keystoretest.Option) {
	s := keystoretest.OpenWith(r, keystore.Options{}, opts...)
	if _, err := s.CreateAccount("acme", "free", 10, t0); err != nil {
		t.Fatal(err)
	}
	_, secret, err := s.CreateKey(keystore.NewKey{Account: "acme", Scopes: []string{"a"}, SpendCap: 10}, t0)
	if err != nil {
		t.Fatal(err)
	}
	k, _ := s.Lookup(secret, t0)
	if err := s.Reserve(k, "req", 10, 25, t0.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if st, charged := s.Settle("req", true, 25, true); st != keystore.SettleCommitted || charged != 25 {
		t.Fatalf("Settle = %v, %d", st, charged)
	}
}

// TestOpenOverdraft: a balance below zero, and a key past its cap, fail the
// checks unless the test allows that much overdraft.
func TestOpenOverdraft(t *testing.T) {
	tests := []struct {
		name string
		opts []keystoretest.Option
		errs int
	}{
		{"not allowed", nil, 2},
		{"allowed less", []keystoretest.Option{keystoretest.AllowOverdraft(14)}, 2},
		{"allowed", []keystoretest.Option{keystoretest.AllowOverdraft(15)}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := &recorder{TB: t}
			overdrawn(t, r, tt.opts...)
			r.runCleanups()
			if len(r.errs) != tt.errs {
				t.Errorf("check reported %q, want %d errors (the account and the key)", r.errs, tt.errs)
			}
		})
	}
}

// TestOpenKeepsReservations: open reservations are compared across the
// reopen, and a held amount counts against the balance in the invariant.
func TestOpenKeepsReservations(t *testing.T) {
	s := keystoretest.Open(t)
	if _, err := s.CreateAccount("acme", "free", 100, t0); err != nil {
		t.Fatal(err)
	}
	_, secret, err := s.CreateKey(keystore.NewKey{Account: "acme", Scopes: []string{"a"}, SpendCap: 50}, t0)
	if err != nil {
		t.Fatal(err)
	}
	k, _ := s.Lookup(secret, t0)
	if err := s.Reserve(k, "req", 50, 50, t0.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if err := s.Debit(k, 1); err == nil {
		t.Error("Debit past the cap with a reservation succeeded")
	}
	// The cleanup reopens and compares Reserved on the account and the key.
}

// TestOpenReusesClock: the reopened store reads a key's cap period on the
// test's clock, not the machine's.
func TestOpenReusesClock(t *testing.T) {
	r := &recorder{TB: t}
	s := keystoretest.OpenWith(r, keystore.Options{Now: func() time.Time { return t0 }})
	if _, err := s.CreateAccount("acme", "free", 100, t0); err != nil {
		t.Fatal(err)
	}
	_, secret, err := s.CreateKey(keystore.NewKey{Account: "acme", Scopes: []string{"a"}, SpendCap: 50, CapPeriod: keystore.PeriodDay}, t0)
	if err != nil {
		t.Fatal(err)
	}
	k, _ := s.Lookup(secret, t0)
	if err := s.Debit(k, 20); err != nil {
		t.Fatal(err)
	}
	r.runCleanups()
	if len(r.errs) != 0 {
		t.Errorf("check reported %q", r.errs)
	}
}
