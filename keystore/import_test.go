package keystore_test

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/keygate/keygate/authz/ratelimit"
	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/keystoretest"
	"github.com/keygate/keygate/keystore/money"
)

func TestImport(t *testing.T) {
	s := keystoretest.Open(t) // checks that all of it comes back after a reopen
	mustAccount(t, s, "existing", 10)
	before, _ := mustKey(t, s, keystore.NewKey{Account: "existing", Scopes: []string{"a"}})
	accounts := []keystore.ImportAccount{
		{ID: "zeta", Tier: "pro", Balance: 5 * money.PerUSD},
		{ID: "alpha", Balance: 0},
	}
	keys := []keystore.NewKey{
		{Account: "zeta", Name: "prod", Scopes: []string{"chat:write", "chat:read"},
			RateLimit: ratelimit.Rate{N: 10, Per: time.Second}, SpendCap: money.PerUSD, ExpiresAt: t0.Add(time.Hour)},
		{Account: "existing", Scopes: []string{"a"}},
		{Account: "zeta", Scopes: []string{"chat:write", "chat:read"}, RateLimit: ratelimit.Rate{N: 0, Per: time.Second}},
	}
	got, err := s.Import(accounts, keys, t0)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(keys) {
		t.Fatalf("Import returned %d keys, want %d", len(got), len(keys))
	}
	wantAccounts := []keystore.Account{
		{ID: "alpha", CreatedAt: t0},
		{ID: "existing", Tier: "free", Balance: 10, CreatedAt: t0},
		{ID: "zeta", Tier: "pro", Balance: 5 * money.PerUSD, CreatedAt: t0},
	}
	if diff := cmp.Diff(wantAccounts, s.Accounts()); diff != "" {
		t.Errorf("accounts (-want +got):\n%s", diff)
	}
	for i, ik := range got {
		nk := keys[i]
		want := keystore.KeyInfo{
			ID: ik.ID, Account: nk.Account, Name: nk.Name, Scopes: nk.Scopes, RateLimit: nk.RateLimit,
			SpendCap: nk.SpendCap, CreatedAt: t0, ExpiresAt: nk.ExpiresAt,
		}
		if nk.RateLimit.N == 0 {
			want.RateLimit = ratelimit.Rate{} // as CreateKey normalises it
		}
		info, err := s.Key(ik.ID)
		if err != nil {
			t.Fatalf("key %d: %v", i+1, err)
		}
		if diff := cmp.Diff(want, info); diff != "" {
			t.Errorf("key %d (-want +got):\n%s", i+1, diff)
		}
		k, ok := s.Lookup(ik.Secret, t0)
		if !ok || k.ID != ik.ID {
			t.Fatalf("key %d: Lookup of its secret = %v, %v", i+1, k, ok)
		}
		if nk.Account == "zeta" && k.Tier() != "pro" {
			t.Errorf("key %d: tier %q, want the account's", i+1, k.Tier())
		}
	}
	if _, ok := s.Lookup(got[0].Secret, t0.Add(2*time.Hour)); ok {
		t.Error("an imported key was accepted after its expiry")
	}
	// The imported keys work like any other: debit, revoke.
	k := mustLookup(t, s, got[0].Secret)
	if err := s.Debit(k, money.PerUSD); err != nil {
		t.Fatal(err)
	}
	if err := s.Debit(k, 1); !errors.Is(err, keystore.ErrSpendCap) {
		t.Errorf("Debit past an imported key's cap = %v, want ErrSpendCap", err)
	}
	if _, err := s.Revoke(got[1].ID, t0); err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, ki := range s.Keys("") {
		ids = append(ids, ki.ID)
	}
	if want := []string{before.ID, got[0].ID, got[1].ID, got[2].ID}; !sameSet(ids, want) {
		t.Errorf("Keys = %v, want %v", ids, want)
	}
	if n := len(s.Keys("existing")); n != 2 {
		t.Errorf("Keys(existing) has %d keys, want 2", n)
	}
}

func sameSet(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(a, b)
}

// TestImportInvalid: one bad entry fails the whole import, with an error
// that names it, and nothing is created, in memory or on disk.
func TestImportInvalid(t *testing.T) {
	good := []keystore.ImportAccount{{ID: "a1"}, {ID: "a2"}}
	key := func(account string) keystore.NewKey {
		return keystore.NewKey{Account: account, Scopes: []string{"x"}}
	}
	goodKeys := []keystore.NewKey{key("a1"), key("a2"), key("existing")}
	tests := []struct {
		name     string
		accounts []keystore.ImportAccount
		keys     []keystore.NewKey
		now      time.Time
		want     error
		msg      string
	}{
		{"bad account id", append(slices.Clone(good), keystore.ImportAccount{ID: "a b"}), goodKeys, t0,
			keystore.ErrInvalid, "account 3: "},
		{"bad tier", []keystore.ImportAccount{{ID: "a1", Tier: "x\ny"}, {ID: "a2"}}, goodKeys, t0,
			keystore.ErrInvalid, "account 1: "},
		{"negative balance", []keystore.ImportAccount{{ID: "a1"}, {ID: "a2", Balance: -1}}, goodKeys, t0,
			keystore.ErrInvalid, "account 2: "},
		{"listed twice", append(slices.Clone(good), keystore.ImportAccount{ID: "a1"}), goodKeys, t0,
			keystore.ErrAccountExists, "account 3: "},
		{"already in the store", append(slices.Clone(good), keystore.ImportAccount{ID: "existing"}), goodKeys, t0,
			keystore.ErrAccountExists, "account 3: "},
		{"key of an unknown account", good, append(slices.Clone(goodKeys), key("nobody")), t0,
			keystore.ErrAccountNotFound, "key 4: "},
		{"key without scopes", good, []keystore.NewKey{key("a1"), {Account: "a2"}}, t0,
			keystore.ErrInvalid, "key 2: "},
		{"key expired", good, []keystore.NewKey{{Account: "a1", Scopes: []string{"x"}, ExpiresAt: t0}}, t0,
			keystore.ErrInvalid, "key 1: "},
		{"key name too long", good, []keystore.NewKey{{Account: "a1", Scopes: []string{"x"}, Name: strings.Repeat("n", 201)}}, t0,
			keystore.ErrInvalid, "key 1: "},
		{"bad now", good, goodKeys, time.Time{}, keystore.ErrInvalid, "now"},
	}
	s := keystoretest.Open(t)
	mustAccount(t, s, "existing", 1)
	accountsBefore, keysBefore := s.Accounts(), s.Keys("")
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := s.Import(tt.accounts, tt.keys, tt.now)
			if !errors.Is(err, tt.want) || !strings.Contains(err.Error(), tt.msg) {
				t.Errorf("Import = %v, want %v mentioning %q", err, tt.want, tt.msg)
			}
			if got != nil {
				t.Errorf("a failed Import returned keys: %v", got)
			}
		})
	}
	if diff := cmp.Diff(accountsBefore, s.Accounts()); diff != "" {
		t.Errorf("failed imports changed the accounts (-before +after):\n%s", diff)
	}
	if diff := cmp.Diff(keysBefore, s.Keys("")); diff != "" {
		t.Errorf("failed imports changed the keys (-before +after):\n%s", diff)
	}
	// keystoretest checks, at the end, that the file holds no more either.
}

func TestImportClosed(t *testing.T) {
	s := mustOpen(t, tempPath(t))
	s.Close()
	if _, err := s.Import([]keystore.ImportAccount{{ID: "a"}}, nil, t0); !errors.Is(err, keystore.ErrClosed) {
		t.Errorf("Import on a closed store = %v, want ErrClosed", err)
	}
}

// TestImportMany imports thousands of keys into a store that has keys
// already, twice, and checks both indexes: every key by ID, in order, and
// by secret.
func TestImportMany(t *testing.T) {
	s := keystoretest.Open(t)
	var secrets []string
	for i := range 20 {
		mustAccount(t, s, fmt.Sprintf("pre-%d", i), 0)
		_, secret := mustKey(t, s, keystore.NewKey{Account: fmt.Sprintf("pre-%d", i), Scopes: []string{"a"}})
		secrets = append(secrets, secret)
	}
	for round := range 2 {
		var accounts []keystore.ImportAccount
		for i := range 500 {
			accounts = append(accounts, keystore.ImportAccount{ID: fmt.Sprintf("r%d-%04d", round, i), Balance: 7})
		}
		var keys []keystore.NewKey
		for i := range 3000 {
			account := accounts[i%len(accounts)].ID
			if i%10 == 0 {
				account = fmt.Sprintf("pre-%d", i%20)
			}
			keys = append(keys, keystore.NewKey{Account: account, Scopes: []string{"a", "b"}})
		}
		got, err := s.Import(accounts, keys, t0)
		if err != nil {
			t.Fatal(err)
		}
		for _, k := range got {
			secrets = append(secrets, k.Secret)
		}
	}
	all := s.Keys("")
	if len(all) != len(secrets) {
		t.Fatalf("%d keys, want %d", len(all), len(secrets))
	}
	for _, k := range all {
		if _, err := s.Key(k.ID); err != nil {
			t.Fatalf("Key(%s): %v", k.ID, err)
		}
	}
	for i, secret := range secrets {
		if _, ok := s.Lookup(secret, t0); !ok {
			t.Fatalf("secret %d not found", i)
		}
	}
	if n := len(s.Accounts()); n != 1020 {
		t.Errorf("%d accounts, want 1020", n)
	}
}
