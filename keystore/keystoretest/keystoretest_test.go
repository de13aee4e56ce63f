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
