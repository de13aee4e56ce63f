package main

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/money"
)

func TestSeed(t *testing.T) {
	const n = 5
	path := filepath.Join(t.TempDir(), "seed.db")
	got, err := seed(context.Background(), path, seedSpec{Accounts: n, KeysPer: 2, Limited: 3, Balance: money.Micros(7_000_000), AccountName: "acct-%04d"})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("seeded %d accounts, %d keys in %v", n, len(got.Keys)+len(got.Limited), got.Took)
	if len(got.Keys) != 2*n || len(got.Limited) != 3 {
		t.Fatalf("got %d keys and %d limited, want %d and 3", len(got.Keys), len(got.Limited), 2*n)
	}
	st, err := keystore.Open(path, keystore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if a := st.Accounts(); len(a) != n || a[0].Balance != 7_000_000 {
		t.Errorf("accounts: %d, first %+v", len(a), a[0])
	}
	seen := map[string]bool{}
	for i, s := range append(got.Keys, got.Limited...) {
		k, ok := st.Lookup(s, time.Now())
		if !ok {
			t.Fatalf("key %d not found", i)
		}
		if i < n && seen[k.Account()] {
			t.Errorf("round-robin order visits account %s twice in the first %d keys", k.Account(), n)
		}
		seen[k.Account()] = true
		for _, sc := range benchScopes {
			if !k.HasScope(sc) {
				t.Errorf("key %d lacks scope %s", i, sc)
			}
		}
		if limited := i >= len(got.Keys); limited != (k.RateLimit.N == 1) {
			t.Errorf("key %d: rate limit %v", i, k.RateLimit)
		}
	}
}

func TestSeedInterrupted(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := seed(ctx, filepath.Join(t.TempDir(), "seed.db"), seedSpec{Accounts: 3, KeysPer: 1, AccountName: "a-%d"}); err == nil {
		t.Error("seed ran to the end with a cancelled context")
	}
}
