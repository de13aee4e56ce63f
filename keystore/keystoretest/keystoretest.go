// Package keystoretest opens real keygate stores for tests: a bbolt file in
// the test's temporary directory, checked when the test ends.
package keystoretest

import (
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/money"
)

// Open opens a new, empty store in t.TempDir(). When the test ends it checks
// the ledger's invariants, closes the store, opens the file again and checks
// that every account and key came back exactly as they were, open
// reservations included.
//
// The invariants: no account has spent what it does not have (balance minus
// reserved amounts at or above zero), no key with a cap has spent or reserved
// past it (spend plus reserved at or below the cap), no reserved amount is
// below zero, and an account's reserved amount is the sum of its keys'.
func Open(t testing.TB) *keystore.Store {
	t.Helper()
	return OpenWith(t, keystore.Options{})
}

// OpenWith is Open with options (a logger, metrics, a flush interval, a
// clock) and the checks' own. The reopened store gets the same clock and
// alert thresholds, so that a key's cap period reads the same.
func OpenWith(t testing.TB, o keystore.Options, opts ...Option) *keystore.Store {
	t.Helper()
	var c config
	for _, f := range opts {
		f(&c)
	}
	path := filepath.Join(t.TempDir(), "keygate.db")
	s, err := keystore.Open(path, o)
	if err != nil {
		t.Fatalf("keystoretest: %v", err)
	}
	reopen := keystore.Options{Log: o.Log, Now: o.Now, AlertThresholds: o.AlertThresholds}
	t.Cleanup(func() { check(t, s, path, reopen, c) })
	return s
}

// An Option changes what the checks allow.
type Option func(*config)

type config struct {
	overdraft money.Micros
}

// AllowOverdraft lets the checks accept a balance below what the account had
// (and a key's spend past its cap) by up to m in all. Settle may charge a
// successful request its reported cost up to the reservation's maxPrice,
// while the Check held only its price: each request settled above its price
// can take the balance below zero, and the key past its cap, by
// maxPrice−price. A test that settles such requests passes the sum of those
// differences; every other test keeps the strict invariants (m = 0).
func AllowOverdraft(m money.Micros) Option {
	return func(c *config) { c.overdraft = m }
}

func check(t testing.TB, s *keystore.Store, path string, reopen keystore.Options, c config) {
	t.Helper()
	accounts, keys := s.Accounts(), s.Keys("")
	reserved := make(map[string]money.Micros)
	for _, k := range keys {
		reserved[k.Account] += k.Reserved
		if k.Spent < 0 || k.Reserved < 0 || (k.SpendCap > 0 && k.Spent+k.Reserved > k.SpendCap+c.overdraft) {
			t.Errorf("keystoretest: key %s: spent %s and reserved %s with a cap of %s (overdraft allowed: %s)",
				k.ID, k.Spent, k.Reserved, k.SpendCap, c.overdraft)
		}
	}
	for _, a := range accounts {
		if a.Reserved < 0 || a.Balance-a.Reserved < -c.overdraft {
			t.Errorf("keystoretest: account %s: balance %s, reserved %s: spent past the balance (overdraft allowed: %s)",
				a.ID, a.Balance, a.Reserved, c.overdraft)
		}
		if a.Reserved != reserved[a.ID] {
			t.Errorf("keystoretest: account %s: reserved %s, its keys %s", a.ID, a.Reserved, reserved[a.ID])
		}
	}
	if err := s.Close(); err != nil {
		t.Errorf("keystoretest: close: %v", err)
		return
	}
	r, err := keystore.Open(path, reopen)
	if err != nil {
		t.Errorf("keystoretest: reopen: %v", err)
		return
	}
	defer r.Close()
	if diff := cmp.Diff(accounts, r.Accounts()); diff != "" {
		t.Errorf("keystoretest: accounts changed across a reopen (-before +after):\n%s", diff)
	}
	if diff := cmp.Diff(keys, r.Keys("")); diff != "" {
		t.Errorf("keystoretest: keys changed across a reopen (-before +after):\n%s", diff)
	}
}
