package keystore_test

import (
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/keystoretest"
	"github.com/keygate/keygate/keystore/money"
)

var t0 = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

func TestCreateAccount(t *testing.T) {
	s := keystoretest.Open(t)
	got, err := s.CreateAccount("acme", "tier1", 10*money.PerUSD, t0)
	if err != nil {
		t.Fatal(err)
	}
	want := keystore.Account{ID: "acme", Tier: "tier1", Balance: 10 * money.PerUSD, CreatedAt: t0}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("CreateAccount (-want +got):\n%s", diff)
	}
	read, err := s.Account("acme")
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, read); diff != "" {
		t.Errorf("Account (-want +got):\n%s", diff)
	}
	if _, err := s.CreateAccount("acme", "", 0, t0); !errors.Is(err, keystore.ErrAccountExists) {
		t.Errorf("second CreateAccount: got %v, want ErrAccountExists", err)
	}
	if _, err := s.Account("nobody"); !errors.Is(err, keystore.ErrAccountNotFound) {
		t.Errorf("Account(nobody): got %v, want ErrAccountNotFound", err)
	}
}

func TestCreateAccountInvalid(t *testing.T) {
	tests := []struct {
		name    string
		id      string
		tier    string
		balance money.Micros
		now     time.Time
		want    string // in the message
	}{
		{"empty id", "", "", 0, t0, "account id is empty"},
		{"too long", strings.Repeat("a", 65), "", 0, t0, "at most 64"},
		{"space", "a b", "", 0, t0, "' ' at byte 1"},
		{"slash", "a/b", "", 0, t0, "'/' at byte 1"},
		{"non-ascii", "café", "", 0, t0, "'é' at byte 3"},
		{"not utf-8", "caf\xe9", "", 0, t0, `'\xe9' at byte 3`},
		{"newline", "acme\n", "", 0, t0, `'\n' at byte 4`},
		{"control", "\x1b[31m", "", 0, t0, `'\x1b' at byte 0`},
		{"zero width space", "ac\u200bme", "", 0, t0, `'\u200b' at byte 2`},
		{"bad tier", "acme", "tier one", 0, t0, "tier"},
		{"negative balance", "acme", "", -1, t0, "out of range"},
		{"huge balance", "acme", "", money.Max + 1, t0, "out of range"},
		{"zero time", "acme", "", 0, time.Time{}, "out of range"},
	}
	s := keystoretest.Open(t)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := s.CreateAccount(tt.id, tt.tier, tt.balance, tt.now)
			if !errors.Is(err, keystore.ErrInvalid) || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("got %v, want ErrInvalid mentioning %q", err, tt.want)
			}
		})
	}
	if got := s.Accounts(); len(got) != 0 {
		t.Errorf("invalid creations left accounts: %v", got)
	}
}

func TestAccountIDCharset(t *testing.T) {
	s := keystoretest.Open(t)
	id := "Az09._:-" + strings.Repeat("x", 56) // every allowed kind, 64 characters
	if _, err := s.CreateAccount(id, "", 0, t0); err != nil {
		t.Fatal(err)
	}
}

func TestAccountsSorted(t *testing.T) {
	s := keystoretest.Open(t)
	for _, id := range []string{"m", "b", "z", "a"} {
		if _, err := s.CreateAccount(id, "free", 0, t0); err != nil {
			t.Fatal(err)
		}
	}
	var ids []string
	for _, a := range s.Accounts() {
		ids = append(ids, a.ID)
	}
	if diff := cmp.Diff([]string{"a", "b", "m", "z"}, ids); diff != "" {
		t.Errorf("Accounts order (-want +got):\n%s", diff)
	}
}

func TestCredit(t *testing.T) {
	s := keystoretest.Open(t)
	mustAccount(t, s, "acme", 5)
	a, err := s.Credit("acme", 7)
	if err != nil {
		t.Fatal(err)
	}
	if a.Balance != 12 {
		t.Errorf("balance after credit = %d, want 12", a.Balance)
	}
	tests := []struct {
		name   string
		id     string
		amount money.Micros
		want   error
	}{
		{"zero", "acme", 0, keystore.ErrInvalid},
		{"negative", "acme", -5, keystore.ErrInvalid},
		{"past money.Max", "acme", money.Max - 11, keystore.ErrInvalid},
		{"unknown account", "nobody", 1, keystore.ErrAccountNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := s.Credit(tt.id, tt.amount); !errors.Is(err, tt.want) {
				t.Errorf("got %v, want %v", err, tt.want)
			}
		})
	}
	if a, _ := s.Account("acme"); a.Balance != 12 {
		t.Errorf("failed credits changed the balance to %d", a.Balance)
	}
	if a, err := s.Credit("acme", money.Max-12); err != nil || a.Balance != money.Max {
		t.Errorf("credit up to money.Max: %v, %v", a, err)
	}
}

// TestCreditDuringDebits credits while 8 goroutines debit: every debit and
// every credit must be in the final balance, in memory and on disk.
func TestCreditDuringDebits(t *testing.T) {
	path := tempPath(t)
	s := mustOpen(t, path)
	mustAccount(t, s, "acme", 1_000_000)
	_, secret := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"chat:write"}})
	k, ok := s.Lookup(secret, t0)
	if !ok {
		t.Fatal("Lookup failed")
	}
	const workers, debits, credits = 8, 2000, 50
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range debits {
				if err := s.Debit(k, 3); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	for range credits {
		if _, err := s.Credit("acme", 100); err != nil {
			t.Fatal(err)
		}
	}
	wg.Wait()
	want := money.Micros(1_000_000 - workers*debits*3 + credits*100)
	if a, _ := s.Account("acme"); a.Balance != want {
		t.Errorf("balance = %d, want %d", a.Balance, want)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	r := mustOpen(t, path)
	defer r.Close()
	if a, _ := r.Account("acme"); a.Balance != want {
		t.Errorf("balance after reopen = %d, want %d", a.Balance, want)
	}
}
