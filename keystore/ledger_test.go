package keystore_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/keystoretest"
	"github.com/keygate/keygate/keystore/money"
)

func TestDebit(t *testing.T) {
	s := keystoretest.Open(t)
	mustAccount(t, s, "acme", 100)
	capped, cappedSecret := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}, SpendCap: 30})
	free, freeSecret := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}})
	ck, fk := mustLookup(t, s, cappedSecret), mustLookup(t, s, freeSecret)
	steps := []struct {
		name    string
		key     *keystore.Key
		price   money.Micros
		want    error
		balance money.Micros
	}{
		{"price 0 always passes", ck, 0, nil, 100},
		{"capped key", ck, 20, nil, 80},
		{"up to the cap exactly", ck, 10, nil, 70},
		{"past the cap", ck, 1, keystore.ErrSpendCap, 70},
		{"price 0 past the cap", ck, 0, nil, 70},
		{"uncapped key", fk, 60, nil, 10},
		{"more than the balance", fk, 11, keystore.ErrInsufficientBalance, 10},
		{"the whole balance", fk, 10, nil, 0},
		{"empty balance", fk, 1, keystore.ErrInsufficientBalance, 0},
		{"negative price", fk, -5, keystore.ErrInvalid, 0},
	}
	for _, st := range steps {
		err := s.Debit(st.key, st.price)
		if !errors.Is(err, st.want) || (st.want == nil) != (err == nil) {
			t.Errorf("%s: Debit = %v, want %v", st.name, err, st.want)
		}
		if a, _ := s.Account("acme"); a.Balance != st.balance {
			t.Errorf("%s: balance = %d, want %d", st.name, a.Balance, st.balance)
		}
	}
	if k, _ := s.Key(capped.ID); k.Spent != 30 {
		t.Errorf("capped key spent %d, want 30", k.Spent)
	}
	if k, _ := s.Key(free.ID); k.Spent != 70 {
		t.Errorf("free key spent %d, want 70", k.Spent)
	}
}

// TestDebitSurvivesRevoke debits through a Key fetched before its revocation:
// the debit lands on the same ledger as the republished key's.
func TestDebitSurvivesRevoke(t *testing.T) {
	s := keystoretest.Open(t)
	mustAccount(t, s, "acme", 100)
	info, secret := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}})
	k := mustLookup(t, s, secret)
	if _, err := s.Revoke(info.ID, t0); err != nil {
		t.Fatal(err)
	}
	if err := s.Debit(k, 40); err != nil {
		t.Fatal(err)
	}
	if got, _ := s.Key(info.ID); got.Spent != 40 {
		t.Errorf("spent = %d, want 40", got.Spent)
	}
	if a, _ := s.Account("acme"); a.Balance != 60 {
		t.Errorf("balance = %d, want 60", a.Balance)
	}
}

// TestDebitConcurrentBalance: 300 debits race for a balance that covers 100.
func TestDebitConcurrentBalance(t *testing.T) {
	s := keystoretest.Open(t)
	const price = 2_000 // $0.002
	mustAccount(t, s, "acme", 100*price)
	var keys []*keystore.Key
	for range 4 { // several keys, one account: the balance is the limit
		_, secret := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}})
		keys = append(keys, mustLookup(t, s, secret))
	}
	ok, insufficient := race(t, 64, 300, func(i int) error { return s.Debit(keys[i%len(keys)], price) })
	if ok != 100 || insufficient[keystore.ErrInsufficientBalance] != 200 {
		t.Errorf("%d debits succeeded, failures %v; want 100 and 200 ErrInsufficientBalance", ok, insufficient)
	}
	if a, _ := s.Account("acme"); a.Balance != 0 {
		t.Errorf("balance = %d, want exactly 0", a.Balance)
	}
	var spent money.Micros
	for _, k := range s.Keys("acme") {
		spent += k.Spent
	}
	if spent != 100*price {
		t.Errorf("keys spent %d in all, want %d", spent, 100*price)
	}
}

// TestDebitConcurrentCap: 300 debits race for a key whose cap covers 100.
func TestDebitConcurrentCap(t *testing.T) {
	s := keystoretest.Open(t)
	const price = 150
	mustAccount(t, s, "acme", money.PerUSD)
	info, secret := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}, SpendCap: 100 * price})
	k := mustLookup(t, s, secret)
	ok, failed := race(t, 64, 300, func(int) error { return s.Debit(k, price) })
	if ok != 100 || failed[keystore.ErrSpendCap] != 200 {
		t.Errorf("%d debits succeeded, failures %v; want 100 and 200 ErrSpendCap", ok, failed)
	}
	if got, _ := s.Key(info.ID); got.Spent != got.SpendCap {
		t.Errorf("spent = %d, want exactly the cap %d", got.Spent, got.SpendCap)
	}
	if a, _ := s.Account("acme"); a.Balance != money.PerUSD-100*price {
		t.Errorf("balance = %d, want %d", a.Balance, money.PerUSD-100*price)
	}
}

// race runs attempts calls of f on workers goroutines, all released at once,
// and counts the successes and each error.
func race(t *testing.T, workers, attempts int, f func(i int) error) (int, map[error]int) {
	t.Helper()
	var (
		next  atomic.Int64
		start sync.WaitGroup
		done  sync.WaitGroup
		mu    sync.Mutex
		ok    int
		fails = map[error]int{}
	)
	start.Add(1)
	for range workers {
		done.Add(1)
		go func() {
			defer done.Done()
			start.Wait()
			for {
				i := int(next.Add(1)) - 1
				if i >= attempts {
					return
				}
				err := f(i)
				mu.Lock()
				if err == nil {
					ok++
				} else {
					fails[err]++
				}
				mu.Unlock()
			}
		}()
	}
	start.Done()
	done.Wait()
	return ok, fails
}

// TestCrashKeepsFlushed copies the file of an open store, as a crash would
// leave it: everything flushed is there, nothing after the flush is.
func TestCrashKeepsFlushed(t *testing.T) {
	path := tempPath(t)
	s := mustOpen(t, path)
	defer s.Close()
	mustAccount(t, s, "acme", 1000)
	info, secret := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}})
	k := mustLookup(t, s, secret)
	for range 10 {
		if err := s.Debit(k, 7); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Flush(); err != nil {
		t.Fatal(err)
	}
	flushed := crashCopy(t, path)
	if err := s.Debit(k, 100); err != nil { // not flushed: lost in a crash
		t.Fatal(err)
	}
	unflushed := crashCopy(t, path)
	for name, p := range map[string]string{"after flush": flushed, "after an unflushed debit": unflushed} {
		c := mustOpen(t, p)
		a, _ := c.Account("acme")
		got, _ := c.Key(info.ID)
		if a.Balance != 930 || got.Spent != 70 {
			t.Errorf("%s: balance %d, spent %d; want 930 and 70", name, a.Balance, got.Spent)
		}
		if _, ok := c.Lookup(secret, t0); !ok {
			t.Errorf("%s: key lost", name)
		}
		c.Close()
	}
}

func crashCopy(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	p := tempPath(t)
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestRunFlushes(t *testing.T) {
	path := tempPath(t)
	reg := prometheus.NewRegistry()
	s, err := keystore.Open(path, keystore.Options{FlushInterval: 5 * time.Millisecond, Metrics: reg})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	mustAccount(t, s, "acme", 1000)
	_, secret := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}})
	if err := s.Debit(mustLookup(t, s, secret), 1); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- s.Run(ctx) }()
	// Wait (boundedly) until Run has flushed the debit to the file.
	deadline := time.Now().Add(30 * time.Second)
	for {
		c := mustOpen(t, crashCopy(t, path))
		a, _ := c.Account("acme")
		c.Close()
		if a.Balance == 999 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("Run did not flush the debit")
		}
		time.Sleep(5 * time.Millisecond)
	}
	cancel()
	if err := <-ran; err != nil {
		t.Errorf("Run = %v, want nil", err)
	}
	if got := metric(t, reg, "keygate_ledger_flushes_total", "result", "ok").GetCounter().GetValue(); got < 1 {
		t.Errorf("keygate_ledger_flushes_total{result=ok} = %v, want >= 1", got)
	}
}

func TestFlushMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	s := keystoretest.OpenWith(t, keystore.Options{Metrics: reg})
	mustAccount(t, s, "a", 100)
	mustAccount(t, s, "b", 100)
	_, sa := mustKey(t, s, keystore.NewKey{Account: "a", Scopes: []string{"x"}})
	_, sb := mustKey(t, s, keystore.NewKey{Account: "b", Scopes: []string{"x"}})
	for _, secret := range []string{sa, sb, sb} {
		if err := s.Debit(mustLookup(t, s, secret), 1); err != nil {
			t.Fatal(err)
		}
	}
	for range 2 { // the second flush has nothing to write and is not counted
		if err := s.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	if got := metric(t, reg, "keygate_ledger_flushes_total", "result", "ok").GetCounter().GetValue(); got != 1 {
		t.Errorf("flushes{ok} = %v, want 1", got)
	}
	if got := metric(t, reg, "keygate_ledger_flushes_total", "result", "error").GetCounter().GetValue(); got != 0 {
		t.Errorf("flushes{error} = %v, want 0", got)
	}
	if got := metric(t, reg, "keygate_ledger_flushed_entries_total").GetCounter().GetValue(); got != 4 { // 2 balances, 2 spends
		t.Errorf("flushed entries = %v, want 4", got)
	}
	if got := metric(t, reg, "keygate_ledger_flush_duration_seconds").GetHistogram().GetSampleCount(); got != 1 {
		t.Errorf("flush duration samples = %d, want 1", got)
	}
	// A second store in the same registry shares the collectors.
	s2, err := keystore.Open(tempPath(t), keystore.Options{Metrics: reg})
	if err != nil {
		t.Fatalf("second store on one registry: %v", err)
	}
	s2.Close()
}

func TestRunStopsAfterClose(t *testing.T) {
	s, err := keystore.Open(tempPath(t), keystore.Options{FlushInterval: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Run(context.Background()); err != nil { // returns at the first flush
		t.Errorf("Run on a closed store = %v, want nil", err)
	}
}

// TestConcurrentUse runs Checks (Lookup, Debit) against admin writes and
// flushes, for the race detector, then checks the books balance.
func TestConcurrentUse(t *testing.T) {
	s := keystoretest.Open(t)
	const accounts = 8
	var secrets []string
	for i := range accounts {
		id := fmt.Sprintf("acct-%d", i)
		mustAccount(t, s, id, 1_000_000)
		_, secret := mustKey(t, s, keystore.NewKey{Account: id, Scopes: []string{"a"}, SpendCap: 500_000})
		secrets = append(secrets, secret)
	}
	var (
		wg      sync.WaitGroup
		stop    atomic.Bool
		debited [accounts]atomic.Int64
	)
	for g := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := g; !stop.Load(); i++ {
				n := i % accounts
				k, ok := s.Lookup(secrets[n], t0)
				if !ok {
					t.Error("Lookup failed during admin writes")
					return
				}
				if s.Debit(k, 3) == nil {
					debited[n].Add(3)
				}
			}
		}()
	}
	for i := range 30 {
		acct := fmt.Sprintf("acct-%d", i%accounts)
		info, _ := mustKey(t, s, keystore.NewKey{Account: acct, Scopes: []string{"a"}})
		if _, _, _, err := s.Rotate(info.ID, time.Hour, t0); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Credit(acct, 1); err != nil {
			t.Fatal(err)
		}
		if err := s.Flush(); err != nil {
			t.Fatal(err)
		}
		s.Keys("")
		s.Accounts()
	}
	stop.Store(true)
	wg.Wait()
	for n := range accounts {
		a, _ := s.Account(fmt.Sprintf("acct-%d", n))
		credits := int64(30 / accounts)
		if n < 30%accounts {
			credits++
		}
		if want := 1_000_000 + credits - debited[n].Load(); int64(a.Balance) != want {
			t.Errorf("%s: balance %d, want %d", a.ID, a.Balance, want)
		}
	}
}

// TestCrashAfterAdminWrite: whatever admin write runs while debits are not
// yet flushed, a crash right after it leaves a file where the account's
// balance and its keys' spend count the same debits (all of them, or only
// the flushed ones), so that no key can spend past its cap after a restart.
func TestCrashAfterAdminWrite(t *testing.T) {
	const price = 7_000
	tests := []struct {
		name     string
		write    func(s *keystore.Store, capped, other keystore.KeyInfo) error
		credited money.Micros
	}{
		{"credit", func(s *keystore.Store, _, _ keystore.KeyInfo) error {
			_, err := s.Credit("acme", 2*money.PerUSD)
			return err
		}, 2 * money.PerUSD},
		{"revoke", func(s *keystore.Store, capped, _ keystore.KeyInfo) error {
			_, err := s.Revoke(capped.ID, t0)
			return err
		}, 0},
		{"rotate", func(s *keystore.Store, capped, _ keystore.KeyInfo) error {
			_, _, _, err := s.Rotate(capped.ID, time.Hour, t0)
			return err
		}, 0},
		{"create key", func(s *keystore.Store, _, _ keystore.KeyInfo) error {
			_, _, err := s.CreateKey(keystore.NewKey{Account: "acme", Scopes: []string{"a"}}, t0)
			return err
		}, 0},
		{"create account", func(s *keystore.Store, _, _ keystore.KeyInfo) error {
			_, err := s.CreateAccount("other", "", 5, t0)
			return err
		}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := tempPath(t)
			s := mustOpen(t, path)
			defer s.Close()
			mustAccount(t, s, "acme", money.PerUSD)
			capped, cs := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}, SpendCap: 50_000})
			other, otherSecret := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}})
			ck, ok := mustLookup(t, s, cs), mustLookup(t, s, otherSecret)
			debit := func(k *keystore.Key, n int) {
				for range n {
					if err := s.Debit(k, price); err != nil {
						t.Fatal(err)
					}
				}
			}
			debit(ck, 2) // flushed
			debit(ok, 1)
			if err := s.Flush(); err != nil {
				t.Fatal(err)
			}
			debit(ck, 5) // not flushed
			if err := tt.write(s, capped, other); err != nil {
				t.Fatal(err)
			}
			c := mustOpen(t, crashCopy(t, path))
			defer c.Close()
			a, _ := c.Account("acme")
			kc, _ := c.Key(capped.ID)
			ko, _ := c.Key(other.ID)
			if got, want := a.Balance+kc.Spent+ko.Spent, money.PerUSD+tt.credited; got != want {
				t.Errorf("after a crash: balance %d + spends %d and %d = %d, want %d",
					a.Balance, kc.Spent, ko.Spent, got, want)
			}
			if kc.Spent != 2*price && kc.Spent != 7*price {
				t.Errorf("after a crash: capped key spent %d, want %d (flushed) or %d (all)", kc.Spent, 2*price, 7*price)
			}
		})
	}
}
