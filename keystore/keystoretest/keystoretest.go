// Package keystoretest opens real keygate stores for tests: a bbolt file in
// the test's temporary directory, checked when the test ends.
package keystoretest

import (
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/keygate/keygate/keystore"
)

// Open opens a new, empty store in t.TempDir(). When the test ends it checks
// the ledger's invariants (no balance below zero, no key spent past a
// non-zero cap), closes the store, opens the file again and checks that
// every account and key came back exactly as they were.
func Open(t testing.TB) *keystore.Store {
	t.Helper()
	return OpenWith(t, keystore.Options{})
}

// OpenWith is Open with options (a logger, metrics, a flush interval).
func OpenWith(t testing.TB, o keystore.Options) *keystore.Store {
	t.Helper()
	path := filepath.Join(t.TempDir(), "keygate.db")
	s, err := keystore.Open(path, o)
	if err != nil {
		t.Fatalf("keystoretest: %v", err)
	}
	t.Cleanup(func() { check(t, s, path) })
	return s
}

func check(t testing.TB, s *keystore.Store, path string) {
	t.Helper()
	accounts, keys := s.Accounts(), s.Keys("")
	for _, a := range accounts {
		if a.Balance < 0 || a.Reserved < 0 {
			t.Errorf("keystoretest: account %s: balance %s, reserved %s: below zero", a.ID, a.Balance, a.Reserved)
		}
	}
	for _, k := range keys {
		if k.Spent < 0 || (k.SpendCap > 0 && k.Spent > k.SpendCap) {
			t.Errorf("keystoretest: key %s: spent %s with a cap of %s", k.ID, k.Spent, k.SpendCap)
		}
	}
	if err := s.Close(); err != nil {
		t.Errorf("keystoretest: close: %v", err)
		return
	}
	r, err := keystore.Open(path, keystore.Options{})
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
