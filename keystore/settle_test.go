package keystore_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"
	bolt "go.etcd.io/bbolt"

	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/keystoretest"
	"github.com/keygate/keygate/keystore/money"
)

// deadline is a settle deadline far from every clock these tests use.
var deadline = t0.Add(5 * time.Minute)

// account returns account id's live state, failing the test if it is gone.
func account(t testing.TB, s *keystore.Store, id string) keystore.Account {
	t.Helper()
	a, err := s.Account(id)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// key returns key id's live state, failing the test if it is gone.
func key(t testing.TB, s *keystore.Store, id string) keystore.KeyInfo {
	t.Helper()
	k, err := s.Key(id)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func mustReserve(t testing.TB, s *keystore.Store, k *keystore.Key, id string, price, maxPrice money.Micros) {
	t.Helper()
	if err := s.Reserve(k, id, price, maxPrice, deadline); err != nil {
		t.Fatalf("Reserve(%s, %d, %d): %v", id, price, maxPrice, err)
	}
}

// ledger is what the tests compare: an account's balance and reserved
// amount, and one key's spend and reserved amount.
type ledger struct {
	Balance, AccountReserved, Spent, KeyReserved money.Micros
}

func ledgerOf(t testing.TB, s *keystore.Store, acct, keyID string) ledger {
	t.Helper()
	a, k := account(t, s, acct), key(t, s, keyID)
	return ledger{a.Balance, a.Reserved, k.Spent, k.Reserved}
}

// TestSettle walks one reservation per case through Reserve and Settle,
// checking what Settle says and what it leaves in the ledger.
func TestSettle(t *testing.T) {
	const price, maxPrice = 1_000, 3_000
	tests := []struct {
		name    string
		success bool
		cost    money.Micros
		hasCost bool
		want    keystore.Settled
		charged money.Micros
	}{
		{"2xx commits the price", true, 0, false, keystore.SettleCommitted, price},
		{"2xx commits the reported cost", true, 2_500, true, keystore.SettleCommitted, 2_500},
		{"reported cost below the price", true, 10, true, keystore.SettleCommitted, 10},
		{"reported cost clamped to maxPrice", true, 9_999, true, keystore.SettleCommitted, maxPrice},
		{"reported cost 0 charges nothing", true, 0, true, keystore.SettleCommitted, 0},
		{"failure releases", false, 0, false, keystore.SettleReleased, 0},
		{"failure with a cost header releases", false, 2_000, true, keystore.SettleReleased, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := keystoretest.OpenWith(t, keystore.Options{}, keystoretest.AllowOverdraft(maxPrice-price))
			mustAccount(t, s, "acme", 10_000)
			info, secret := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}, SpendCap: 5_000})
			k := mustLookup(t, s, secret)
			mustReserve(t, s, k, "req-1", price, maxPrice)
			if got, want := ledgerOf(t, s, "acme", info.ID), (ledger{10_000, price, 0, price}); got != want {
				t.Errorf("after Reserve: %+v, want %+v", got, want)
			}
			got, charged := s.Settle("req-1", tt.success, tt.cost, tt.hasCost)
			if got != tt.want || charged != tt.charged {
				t.Errorf("Settle = %v, %d; want %v, %d", got, charged, tt.want, tt.charged)
			}
			want := ledger{Balance: 10_000 - tt.charged, Spent: tt.charged}
			if got := ledgerOf(t, s, "acme", info.ID); got != want {
				t.Errorf("after Settle: %+v, want %+v", got, want)
			}
			// A repeated log entry for the same request changes nothing.
			for _, success := range []bool{true, false} {
				if again, charged := s.Settle("req-1", success, maxPrice, true); again != keystore.SettleUnknown || charged != 0 {
					t.Errorf("second Settle(success=%v) = %v, %d; want unknown, 0", success, again, charged)
				}
			}
			if got := ledgerOf(t, s, "acme", info.ID); got != want {
				t.Errorf("after a second Settle: %+v, want %+v", got, want)
			}
		})
	}
}

func TestSettleUnknown(t *testing.T) {
	s := keystoretest.Open(t)
	mustAccount(t, s, "acme", 100)
	info, secret := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}})
	mustReserve(t, s, mustLookup(t, s, secret), "req-1", 10, 10)
	if got, charged := s.Settle("req-2", true, 0, false); got != keystore.SettleUnknown || charged != 0 {
		t.Errorf("Settle of a request never reserved = %v, %d; want unknown, 0", got, charged)
	}
	if got, want := ledgerOf(t, s, "acme", info.ID), (ledger{100, 10, 0, 10}); got != want {
		t.Errorf("an unknown Settle changed the ledger: %+v, want %+v", got, want)
	}
	for _, st := range []keystore.Settled{keystore.SettleUnknown, keystore.SettleCommitted, keystore.SettleReleased} {
		if st.String() == "" {
			t.Errorf("Settled(%d) has no name", st)
		}
	}
}

func TestReserveRefuses(t *testing.T) {
	s := keystoretest.Open(t)
	mustAccount(t, s, "acme", 100)
	info, secret := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}, SpendCap: 60})
	k := mustLookup(t, s, secret)
	mustReserve(t, s, k, "open", 10, 20)
	tests := []struct {
		name            string
		id              string
		price, maxPrice money.Micros
		want            error
	}{
		{"an id with an open reservation", "open", 10, 10, keystore.ErrDuplicateRequest},
		{"the same id at another price", "open", 1, 1, keystore.ErrDuplicateRequest},
		{"past the cap with what is reserved", "r", 51, 51, keystore.ErrSpendCap},
		{"price 0", "r", 0, 0, keystore.ErrInvalid},
		{"negative price", "r", -1, 1, keystore.ErrInvalid},
		{"maxPrice below the price", "r", 10, 9, keystore.ErrInvalid},
		{"price past money.Max", "r", money.Max + 1, money.Max + 1, keystore.ErrInvalid},
		{"empty request id", "", 1, 1, keystore.ErrInvalid},
		{"request id of 129 bytes", string(make([]byte, 129)), 1, 1, keystore.ErrInvalid},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := s.Reserve(k, tt.id, tt.price, tt.maxPrice, deadline); !errors.Is(err, tt.want) {
				t.Errorf("Reserve = %v, want %v", err, tt.want)
			}
			if got, want := ledgerOf(t, s, "acme", info.ID), (ledger{100, 10, 0, 10}); got != want {
				t.Errorf("a refused Reserve changed the ledger: %+v, want %+v", got, want)
			}
		})
	}
	// Once settled, the id may be reserved again: it is a new request.
	s.Settle("open", false, 0, false)
	mustReserve(t, s, k, "open", 10, 10)
}

// TestReservationsHold: what is reserved counts against the balance and the
// cap at once, for Reserve and Debit alike, and is shown apart from the
// balance and the spend.
func TestReservationsHold(t *testing.T) {
	s := keystoretest.Open(t)
	mustAccount(t, s, "acme", 100)
	capped, cs := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}, SpendCap: 50})
	free, fs := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}})
	ck, fk := mustLookup(t, s, cs), mustLookup(t, s, fs)

	mustReserve(t, s, ck, "c1", 30, 30)
	mustReserve(t, s, fk, "f1", 40, 40)
	if a := account(t, s, "acme"); a.Balance != 100 || a.Reserved != 70 {
		t.Errorf("account: balance %d, reserved %d; want 100 and 70 (a reservation is not spent)", a.Balance, a.Reserved)
	}
	if k := key(t, s, capped.ID); k.Spent != 0 || k.Reserved != 30 {
		t.Errorf("capped key: spent %d, reserved %d; want 0 and 30", k.Spent, k.Reserved)
	}
	// The cap: 30 reserved of 50.
	if err := s.Debit(ck, 21); !errors.Is(err, keystore.ErrSpendCap) {
		t.Errorf("Debit past the cap with reservations = %v, want ErrSpendCap", err)
	}
	if err := s.Reserve(ck, "c2", 21, 21, deadline); !errors.Is(err, keystore.ErrSpendCap) {
		t.Errorf("Reserve past the cap with reservations = %v, want ErrSpendCap", err)
	}
	if err := s.Debit(ck, 20); err != nil { // exactly up to the cap
		t.Fatal(err)
	}
	// The balance: 80 left, 70 of it reserved.
	if err := s.Debit(fk, 11); !errors.Is(err, keystore.ErrInsufficientBalance) {
		t.Errorf("Debit past the balance with reservations = %v, want ErrInsufficientBalance", err)
	}
	if err := s.Reserve(fk, "f2", 11, 11, deadline); !errors.Is(err, keystore.ErrInsufficientBalance) {
		t.Errorf("Reserve past the balance with reservations = %v, want ErrInsufficientBalance", err)
	}
	mustReserve(t, s, fk, "f2", 10, 10)
	if got, want := ledgerOf(t, s, "acme", free.ID), (ledger{80, 80, 0, 50}); got != want {
		t.Errorf("free key: %+v, want %+v", got, want)
	}
	// Releasing gives back what was held, to Debit too.
	if st, _ := s.Settle("f1", false, 0, false); st != keystore.SettleReleased {
		t.Fatalf("Settle = %v", st)
	}
	if err := s.Debit(fk, 40); err != nil {
		t.Errorf("Debit after a release: %v", err)
	}
	if got, want := ledgerOf(t, s, "acme", free.ID), (ledger{40, 40, 40, 10}); got != want {
		t.Errorf("after a release and a debit: %+v, want %+v", got, want)
	}
}

// TestSettleAboveTheReservation: a cost above the price, up to maxPrice,
// may take the balance below zero and the key past its cap by
// maxPrice-price per request in flight, and no more; then new Checks are
// refused until a credit covers them.
func TestSettleAboveTheReservation(t *testing.T) {
	const price, maxPrice, n = 10, 25, 4
	s := keystoretest.OpenWith(t, keystore.Options{}, keystoretest.AllowOverdraft(n*(maxPrice-price)))
	mustAccount(t, s, "acme", n*price)
	info, secret := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}, SpendCap: n * price})
	k := mustLookup(t, s, secret)
	for i := range n {
		mustReserve(t, s, k, fmt.Sprint("r", i), price, maxPrice)
	}
	if err := s.Reserve(k, "one more", 1, 1, deadline); err == nil {
		t.Error("Reserve with the whole balance held succeeded")
	}
	for i := range n {
		if st, charged := s.Settle(fmt.Sprint("r", i), true, money.Max, true); st != keystore.SettleCommitted || charged != maxPrice {
			t.Errorf("Settle = %v, %d; want committed, %d", st, charged, maxPrice)
		}
	}
	if got, want := ledgerOf(t, s, "acme", info.ID), (ledger{-n * (maxPrice - price), 0, n * maxPrice, 0}); got != want {
		t.Errorf("after settling above the price: %+v, want %+v", got, want)
	}
	if err := s.Debit(k, 1); !errors.Is(err, keystore.ErrInsufficientBalance) {
		t.Errorf("Debit below zero = %v, want ErrInsufficientBalance", err)
	}
	if _, err := s.Credit("acme", n*(maxPrice-price)+price); err != nil {
		t.Fatal(err)
	}
	if err := s.Reserve(k, "after credit", price, price, deadline); !errors.Is(err, keystore.ErrSpendCap) {
		t.Errorf("Reserve with the key past its cap = %v, want ErrSpendCap", err)
	}
}

// TestReserveConcurrentBalance: 300 Reserves race for a balance that covers
// 100; settling the winners leaves the balance at exactly 0.
func TestReserveConcurrentBalance(t *testing.T) {
	s := keystoretest.Open(t)
	const price = 2_000
	mustAccount(t, s, "acme", 100*price)
	var keys []*keystore.Key
	for range 4 {
		_, secret := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}})
		keys = append(keys, mustLookup(t, s, secret))
	}
	var won sync.Map
	ok, failed := race(t, 300, 300, func(i int) error {
		id := fmt.Sprint("req-", i)
		err := s.Reserve(keys[i%len(keys)], id, price, price, deadline)
		if err == nil {
			won.Store(id, true)
		}
		return err
	})
	if ok != 100 || failed[keystore.ErrInsufficientBalance] != 200 {
		t.Fatalf("%d reserves succeeded, failures %v; want 100 and 200 ErrInsufficientBalance", ok, failed)
	}
	if a := account(t, s, "acme"); a.Balance != 100*price || a.Reserved != 100*price {
		t.Errorf("balance %d, reserved %d; want both %d", a.Balance, a.Reserved, 100*price)
	}
	ok, failed = race(t, 64, 300, func(i int) error {
		st, _ := s.Settle(fmt.Sprint("req-", i), true, 0, false)
		_, w := won.Load(fmt.Sprint("req-", i))
		if (st == keystore.SettleCommitted) != w {
			return fmt.Errorf("settle %d: %v", i, st)
		}
		return nil
	})
	if ok != 300 {
		t.Errorf("Settle disagreed with Reserve: %v", failed)
	}
	if a := account(t, s, "acme"); a.Balance != 0 || a.Reserved != 0 {
		t.Errorf("balance %d, reserved %d; want exactly 0 and 0", a.Balance, a.Reserved)
	}
}

// TestReserveConcurrentCap: 300 Reserves race for a key whose cap covers
// 100; settling the winners leaves the key spent to exactly its cap.
func TestReserveConcurrentCap(t *testing.T) {
	s := keystoretest.Open(t)
	const price = 150
	mustAccount(t, s, "acme", money.PerUSD)
	info, secret := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}, SpendCap: 100 * price})
	k := mustLookup(t, s, secret)
	ok, failed := race(t, 300, 300, func(i int) error {
		return s.Reserve(k, fmt.Sprint("req-", i), price, price, deadline)
	})
	if ok != 100 || failed[keystore.ErrSpendCap] != 200 {
		t.Fatalf("%d reserves succeeded, failures %v; want 100 and 200 ErrSpendCap", ok, failed)
	}
	committed := 0
	for i := range 300 {
		if st, _ := s.Settle(fmt.Sprint("req-", i), true, 0, false); st == keystore.SettleCommitted {
			committed++
		}
	}
	got := key(t, s, info.ID)
	if committed != 100 || got.Spent != got.SpendCap || got.Reserved != 0 {
		t.Errorf("%d committed; spent %d, reserved %d; want 100, the cap %d, 0", committed, got.Spent, got.Reserved, got.SpendCap)
	}
	if a := account(t, s, "acme"); a.Balance != money.PerUSD-100*price {
		t.Errorf("balance %d, want %d", a.Balance, money.PerUSD-100*price)
	}
}

// TestSettleConcurrentMixed runs Reserve, Settle, Debit, ExpireReservations,
// Flush and reads at once, for the race detector; then every request is
// accounted for exactly once, and keystoretest checks the invariants and a
// reopen.
func TestSettleConcurrentMixed(t *testing.T) {
	const (
		workers  = 8
		requests = 400
		price    = 7
		maxPrice = 10
	)
	s := keystoretest.OpenWith(t, keystore.Options{}, keystoretest.AllowOverdraft(workers*requests*(maxPrice-price)))
	mustAccount(t, s, "acme", 1_000_000)
	info, secret := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}, SpendCap: 500_000})
	k := mustLookup(t, s, secret)
	var (
		charged atomic.Int64 // by Settle, Debit and the expiries
		expired atomic.Int64 // reservations committed at their price
		stop    atomic.Bool
		working sync.WaitGroup
		others  sync.WaitGroup
	)
	for w := range workers {
		working.Go(func() {
			for i := range requests {
				id := fmt.Sprintf("w%d-%d", w, i)
				dl := deadline // i%4: 0 settles, 1 settles, 2 fails, 3 stays open
				if i%2 == 0 {
					dl = t0 // due at once: the expirer may win the race with Settle
				}
				if err := s.Reserve(k, id, price, maxPrice, dl); err != nil {
					t.Error(err)
					return
				}
				switch i % 4 {
				case 0, 1:
					if st, c := s.Settle(id, true, money.Micros(i%12), true); st == keystore.SettleCommitted {
						charged.Add(int64(c))
					}
				case 2:
					s.Settle(id, false, 0, false)
				}
				if s.Debit(k, 1) == nil {
					charged.Add(1)
				}
			}
		})
	}
	others.Go(func() {
		for !stop.Load() {
			n := s.ExpireReservations(t0)
			expired.Add(int64(n))
			charged.Add(int64(n) * price)
			if err := s.Flush(); err != nil {
				t.Error(err)
			}
		}
	})
	others.Go(func() {
		for !stop.Load() {
			s.Accounts()
			s.Keys("acme")
		}
	})
	working.Wait()
	stop.Store(true)
	others.Wait()
	n := s.ExpireReservations(t0)
	charged.Add(int64(n) * price)
	expired.Add(int64(n))

	open := money.Micros(workers * requests / 4 * price) // i%4 == 3
	want := ledger{1_000_000 - money.Micros(charged.Load()), open, money.Micros(charged.Load()), open}
	if got := ledgerOf(t, s, "acme", info.ID); got != want {
		t.Errorf("ledger %+v, want %+v", got, want)
	}
	if n := expired.Load(); n > workers*requests/2 {
		t.Errorf("%d expired, at most %d could", n, workers*requests/2)
	}
}

// TestReservationsSurviveReopen: open reservations come back with their
// price, maxPrice and deadline after a clean Close; settled ones do not.
func TestReservationsSurviveReopen(t *testing.T) {
	path := tempPath(t)
	s := mustOpen(t, path)
	mustAccount(t, s, "acme", 1_000)
	info, secret := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}, SpendCap: 500})
	k := mustLookup(t, s, secret)
	soon, later := t0.Add(time.Minute), t0.Add(time.Hour)
	for _, r := range []struct {
		id              string
		price, maxPrice money.Micros
		deadline        time.Time
	}{
		{"soon", 10, 30, soon},
		{"later", 20, 20, later},
		{"costly", 5, 35, later},
		{"settled", 40, 40, later},
		{"released", 80, 80, later},
	} {
		if err := s.Reserve(k, r.id, r.price, r.maxPrice, r.deadline); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Flush(); err != nil { // "settled" and "released" reach the disk open
		t.Fatal(err)
	}
	s.Settle("settled", true, 0, false)
	s.Settle("released", false, 0, false)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	r := mustOpen(t, path)
	defer r.Close()
	if got, want := ledgerOf(t, r, "acme", info.ID), (ledger{960, 35, 40, 35}); got != want {
		t.Fatalf("after reopen: %+v, want %+v", got, want)
	}
	for _, id := range []string{"settled", "released"} {
		if st, _ := r.Settle(id, true, 0, false); st != keystore.SettleUnknown {
			t.Errorf("Settle(%s) after reopen = %v: a settled reservation came back", id, st)
		}
	}
	// The deadlines came back: nothing is due before "soon", then only it.
	if n := r.ExpireReservations(soon.Add(-time.Nanosecond)); n != 0 {
		t.Errorf("%d reservations expired before their deadline", n)
	}
	if n := r.ExpireReservations(soon); n != 1 {
		t.Errorf("%d reservations expired at the first deadline, want 1", n)
	}
	if got, want := ledgerOf(t, r, "acme", info.ID), (ledger{950, 25, 50, 25}); got != want {
		t.Errorf("after the first expiry: %+v, want %+v (committed at its price)", got, want)
	}
	// maxPrice came back: "costly" may be charged up to 35.
	if st, charged := r.Settle("costly", true, 1_000, true); st != keystore.SettleCommitted || charged != 35 {
		t.Errorf("Settle(costly) after reopen = %v, %d; want committed, 35", st, charged)
	}
}

// TestExpireReservations: a reservation past its deadline is committed at
// its price, counted, and a later log entry for it changes nothing.
func TestExpireReservations(t *testing.T) {
	reg := prometheus.NewRegistry()
	s := keystoretest.OpenWith(t, keystore.Options{Metrics: reg})
	mustAccount(t, s, "acme", 1_000)
	info, secret := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}})
	k := mustLookup(t, s, secret)
	for i, dl := range []time.Time{t0, t0.Add(time.Second), t0.Add(time.Second), t0.Add(time.Hour)} {
		if err := s.Reserve(k, fmt.Sprint("r", i), 100, 300, dl); err != nil {
			t.Fatal(err)
		}
	}
	if got := metric(t, reg, "keygate_reservations_open").GetGauge().GetValue(); got != 4 {
		t.Errorf("keygate_reservations_open = %v, want 4", got)
	}
	if n := s.ExpireReservations(t0.Add(-time.Nanosecond)); n != 0 {
		t.Errorf("ExpireReservations before every deadline = %d, want 0", n)
	}
	if n := s.ExpireReservations(t0.Add(time.Second)); n != 3 { // a deadline is included
		t.Errorf("ExpireReservations = %d, want 3", n)
	}
	if got, want := ledgerOf(t, s, "acme", info.ID), (ledger{700, 100, 300, 100}); got != want {
		t.Errorf("after expiry: %+v, want %+v", got, want)
	}
	if st, charged := s.Settle("r1", true, 300, true); st != keystore.SettleUnknown || charged != 0 {
		t.Errorf("Settle after expiry = %v, %d; want unknown, 0", st, charged)
	}
	if st, _ := s.Settle("r2", false, 0, false); st != keystore.SettleUnknown {
		t.Errorf("a failure logged after expiry = %v, want unknown (the charge is final)", st)
	}
	if n := s.ExpireReservations(t0.Add(time.Second)); n != 0 {
		t.Errorf("second ExpireReservations = %d, want 0", n)
	}
	if got := metric(t, reg, "keygate_reservations_expired_total").GetCounter().GetValue(); got != 3 {
		t.Errorf("keygate_reservations_expired_total = %v, want 3", got)
	}
	if got := metric(t, reg, "keygate_reservations_open").GetGauge().GetValue(); got != 1 {
		t.Errorf("keygate_reservations_open = %v, want 1", got)
	}
}

// TestCrashKeepsReservationWithItsCharge copies the file of an open store at
// each step, as a crash would leave it: a reservation is on disk exactly
// when its charge is not, so a restart never charges a request twice
// (settled, then expired again) and never forgets one it had written.
func TestCrashKeepsReservationWithItsCharge(t *testing.T) {
	path := tempPath(t)
	s := mustOpen(t, path)
	defer s.Close()
	mustAccount(t, s, "acme", 1_000)
	info, secret := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}})
	k := mustLookup(t, s, secret)
	crashAt := func(step string, want ledger) {
		t.Helper()
		c := mustOpen(t, crashCopy(t, path))
		defer c.Close()
		if got := ledgerOf(t, c, "acme", info.ID); got != want {
			t.Errorf("crash %s: %+v, want %+v", step, got, want)
		}
		// What a restart does with what it found: expire it, at its price,
		// and nothing else.
		c.ExpireReservations(deadline)
		after := ledger{Balance: want.Balance - want.KeyReserved, Spent: want.Spent + want.KeyReserved}
		if got := ledgerOf(t, c, "acme", info.ID); got != after {
			t.Errorf("crash %s, then expiry: %+v, want %+v", step, got, after)
		}
	}
	mustReserve(t, s, k, "req", 100, 250)
	crashAt("before the reservation is flushed", ledger{1_000, 0, 0, 0})
	if err := s.Flush(); err != nil {
		t.Fatal(err)
	}
	crashAt("after it is flushed", ledger{1_000, 100, 0, 100})
	if st, _ := s.Settle("req", true, 250, true); st != keystore.SettleCommitted {
		t.Fatal(st)
	}
	crashAt("after Settle, before the flush", ledger{1_000, 100, 0, 100})
	if err := s.Flush(); err != nil {
		t.Fatal(err)
	}
	crashAt("after the settled flush", ledger{750, 0, 250, 0})

	// Reserved and settled between two flushes: neither reaches the disk.
	mustReserve(t, s, k, "quick", 100, 100)
	s.Settle("quick", true, 0, false)
	if err := s.Flush(); err != nil {
		t.Fatal(err)
	}
	crashAt("after a reservation opened and settled in one flush", ledger{650, 0, 350, 0})
}

// TestCrashConcurrentSettle is TestCrashKeepsReservationWithItsCharge under
// load: one key per request, so each key's spend says what its request was
// charged. Whatever a flush catches, the copy never holds a request's
// reservation and its charge, and a restart expiring what it finds charges
// no request twice.
func TestCrashConcurrentSettle(t *testing.T) {
	const (
		requests = 120
		price    = 100
		cost     = 170 // what a successful request reports
		maxPrice = 200
	)
	path := tempPath(t)
	s := mustOpen(t, path)
	defer s.Close()
	mustAccount(t, s, "acme", 1_000_000)
	ids := make([]string, requests)
	keys := make([]*keystore.Key, requests)
	for i := range requests {
		info, secret := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}})
		ids[i], keys[i] = info.ID, mustLookup(t, s, secret)
	}
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			for i := w; i < requests; i += 4 {
				id := fmt.Sprint("req-", i)
				if err := s.Reserve(keys[i], id, price, maxPrice, deadline); err != nil {
					t.Error(err)
					return
				}
				time.Sleep(100 * time.Microsecond) // let a flush catch some open
				s.Settle(id, i%3 != 0, cost, true)
			}
		})
	}
	var copies []string
	for range 20 {
		if err := s.Flush(); err != nil {
			t.Fatal(err)
		}
		copies = append(copies, crashCopy(t, path)) // no flush runs: the file is still
		time.Sleep(time.Millisecond)
	}
	wg.Wait()
	if err := s.Flush(); err != nil {
		t.Fatal(err)
	}
	copies = append(copies, crashCopy(t, path))
	for n, p := range copies {
		c := mustOpen(t, p)
		var total money.Micros
		for i, id := range ids {
			k := key(t, c, id)
			if k.Reserved != 0 && k.Spent != 0 {
				t.Errorf("copy %d, request %d: reserved %d and charged %d", n, i, k.Reserved, k.Spent)
			}
			total += k.Spent
		}
		if a := account(t, c, "acme"); a.Balance+total != 1_000_000 {
			t.Errorf("copy %d: balance %d + spends %d != 1,000,000", n, a.Balance, total)
		}
		c.ExpireReservations(deadline)
		for i, id := range ids {
			want := []money.Micros{0, price} // lost with an unflushed batch, or expired
			if i%3 != 0 {
				want = append(want, cost)
			}
			if got := key(t, c, id).Spent; !contains(want, got) {
				t.Errorf("copy %d, request %d: charged %d after expiry, want one of %v", n, i, got, want)
			}
		}
		c.Close()
	}
	// The last copy was taken after every request settled and was flushed.
	c := mustOpen(t, copies[len(copies)-1])
	defer c.Close()
	for i, id := range ids {
		want := money.Micros(0)
		if i%3 != 0 {
			want = cost
		}
		if k := key(t, c, id); k.Spent != want || k.Reserved != 0 {
			t.Errorf("final copy, request %d: spent %d, reserved %d; want %d, 0", i, k.Spent, k.Reserved, want)
		}
	}
}

func contains(ms []money.Micros, m money.Micros) bool {
	for _, x := range ms {
		if x == m {
			return true
		}
	}
	return false
}

// TestReservationIDReused: a request ID settled and then reserved again
// before the next flush (a client that sets its own x-request-id) leaves
// the new reservation on disk, not the old one's deletion.
func TestReservationIDReused(t *testing.T) {
	for _, sameAccount := range []bool{true, false} {
		t.Run(fmt.Sprint("same account ", sameAccount), func(t *testing.T) {
			path := tempPath(t)
			s := mustOpen(t, path)
			mustAccount(t, s, "a", 1_000)
			mustAccount(t, s, "b", 1_000)
			_, sa := mustKey(t, s, keystore.NewKey{Account: "a", Scopes: []string{"x"}})
			second, sb := mustKey(t, s, keystore.NewKey{Account: "b", Scopes: []string{"x"}})
			if sameAccount {
				second, sb = mustKey(t, s, keystore.NewKey{Account: "a", Scopes: []string{"x"}})
			}
			mustReserve(t, s, mustLookup(t, s, sa), "req", 10, 10)
			if err := s.Flush(); err != nil {
				t.Fatal(err)
			}
			s.Settle("req", true, 0, false)
			mustReserve(t, s, mustLookup(t, s, sb), "req", 30, 30)
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			r := mustOpen(t, path)
			defer r.Close()
			if k := key(t, r, second.ID); k.Reserved != 30 {
				t.Errorf("after reopen the second reservation holds %d, want 30", k.Reserved)
			}
			if st, charged := r.Settle("req", true, 0, false); st != keystore.SettleCommitted || charged != 30 {
				t.Errorf("Settle after reopen = %v, %d; want committed, 30", st, charged)
			}
		})
	}
}

// TestUpgrade: a store written by an older schema opens, is upgraded in
// place to schema 3, and keeps every account and key with its balance and
// spend; reservations, the outbox and debits then work in it. Schema 1 had
// no reservations or outbox bucket; schemas 1 and 2 kept balances and
// spends one per bbolt key, in the balances and spend buckets.
func TestUpgrade(t *testing.T) {
	for _, from := range []uint64{1, 2} {
		t.Run(fmt.Sprintf("from schema %d", from), func(t *testing.T) {
			path := tempPath(t)
			s := mustOpen(t, path)
			mustAccount(t, s, "acme", 10*money.PerUSD)
			mustAccount(t, s, "beta", 0)
			info, secret := mustKey(t, s, keystore.NewKey{Account: "acme", Name: "prod", Scopes: []string{"a", "b"}, SpendCap: money.PerUSD})
			daily, dailySecret := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}, SpendCap: money.PerUSD, CapPeriod: keystore.PeriodDay})
			if _, err := s.Revoke(mustKeyID(t, s, "beta"), t0); err != nil {
				t.Fatal(err)
			}
			if err := s.Debit(mustLookup(t, s, secret), 1_234); err != nil {
				t.Fatal(err)
			}
			if err := s.Debit(mustLookup(t, s, dailySecret), 77); err != nil {
				t.Fatal(err)
			}
			accounts, keys := s.Accounts(), s.Keys("")
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			updateBolt(t, path, func(tx *bolt.Tx) error { return downgrade(tx, from) })

			s, err := keystore.Open(path, keystore.Options{Outbox: true})
			if err != nil {
				t.Fatalf("Open of a schema %d store: %v", from, err)
			}
			if diff := cmp.Diff(accounts, s.Accounts()); diff != "" {
				t.Errorf("accounts after the upgrade (-before +after):\n%s", diff)
			}
			if diff := cmp.Diff(keys, s.Keys("")); diff != "" {
				t.Errorf("keys after the upgrade (-before +after):\n%s", diff)
			}
			k := mustLookup(t, s, secret)
			mustReserve(t, s, k, "req", 100, 100)
			if err := s.Debit(k, money.PerUSD/2-1_234); err != nil { // to 50%: an alert in the outbox
				t.Fatal(err)
			}
			mustAccount(t, s, "gamma", 5) // a new account and key after the upgrade get fresh slots
			_, gammaSecret := mustKey(t, s, keystore.NewKey{Account: "gamma", Scopes: []string{"a"}})
			if err := s.Debit(mustLookup(t, s, gammaSecret), 2); err != nil {
				t.Fatal(err)
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			viewBolt(t, path, func(tx *bolt.Tx) error {
				if v := tx.Bucket([]byte("meta")).Get([]byte("schema_version")); binary.BigEndian.Uint64(v) != 3 {
					t.Errorf("schema_version %x after the upgrade, want 3", v)
				}
				for _, b := range []string{"balances", "spend"} {
					if tx.Bucket([]byte(b)) != nil {
						t.Errorf("bucket %s is still there after the upgrade", b)
					}
				}
				return nil
			})
			s = mustOpen(t, path)
			defer s.Close()
			if k := key(t, s, info.ID); k.Reserved != 100 || k.Spent != money.PerUSD/2 {
				t.Errorf("after the upgrade and a reopen: reserved %d, spent %d; want 100 and %d", k.Reserved, k.Spent, money.PerUSD/2)
			}
			if k := key(t, s, daily.ID); k.Spent != 77 {
				t.Errorf("the daily key's spend after the upgrade: %d, want 77", k.Spent)
			}
			if a, _ := s.Account("acme"); a.Balance != 10*money.PerUSD-money.PerUSD/2-77 {
				t.Errorf("acme's balance after the upgrade: %d", a.Balance)
			}
			if a, _ := s.Account("gamma"); a.Balance != 3 {
				t.Errorf("gamma's balance: %d, want 3", a.Balance)
			}
			if p, err := s.PendingAlerts(); err != nil || len(p) != 1 {
				t.Errorf("PendingAlerts = %+v, %v; want the 50%% alert", p, err)
			}
		})
	}
}

// downgrade rewrites a schema 3 store as schema 2 wrote it, or schema 1:
// balances and spends back in their own buckets, 8 bytes each (12 for a
// spend with a cap period, none for a spend of 0), and for schema 1 no
// reservations or outbox. Its records use no later field.
func downgrade(tx *bolt.Tx, to uint64) error {
	ledger := tx.Bucket([]byte("ledger"))
	slotValue := func(kind byte, v []byte) []byte {
		slot := binary.BigEndian.Uint32(v)
		block := ledger.Get(binary.BigEndian.AppendUint32([]byte{kind}, slot/256))
		if block == nil {
			return make([]byte, 12)
		}
		return block[slot%256*12:][:12]
	}
	bal, err := tx.CreateBucket([]byte("balances"))
	if err != nil {
		return err
	}
	spend, err := tx.CreateBucket([]byte("spend"))
	if err != nil {
		return err
	}
	err = tx.Bucket([]byte("account_slots")).ForEach(func(k, v []byte) error {
		return bal.Put(k, bytes.Clone(slotValue('a', v)[:8]))
	})
	if err != nil {
		return err
	}
	err = tx.Bucket([]byte("key_slots")).ForEach(func(k, v []byte) error {
		raw := slotValue('k', v)
		switch {
		case binary.BigEndian.Uint32(raw[8:]) != 0:
			return spend.Put(k, bytes.Clone(raw))
		case binary.BigEndian.Uint64(raw) != 0:
			return spend.Put(k, bytes.Clone(raw[:8]))
		}
		return nil
	})
	if err != nil {
		return err
	}
	drop := []string{"account_slots", "key_slots", "ledger"}
	if to == 1 {
		drop = append(drop, "reservations", "outbox")
	}
	for _, b := range drop {
		if err := tx.DeleteBucket([]byte(b)); err != nil {
			return err
		}
	}
	return tx.Bucket([]byte("meta")).Put([]byte("schema_version"), binary.BigEndian.AppendUint64(nil, to))
}

// mustKeyID creates a key for account and returns its ID.
func mustKeyID(t *testing.T, s *keystore.Store, account string) string {
	t.Helper()
	info, _ := mustKey(t, s, keystore.NewKey{Account: account, Scopes: []string{"a"}})
	return info.ID
}

// updateBolt and viewBolt run f on the bbolt file of a closed store.
func updateBolt(t *testing.T, path string, f func(tx *bolt.Tx) error) {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := db.Update(f); err != nil {
		t.Fatal(err)
	}
}

func viewBolt(t *testing.T, path string, f func(tx *bolt.Tx) error) {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := db.View(f); err != nil {
		t.Fatal(err)
	}
}

// crashWithAReusedID returns the path of a crash copy holding two open
// reservations of request ID "req": one of key first (account "a",
// price 10), settled before the crash but not yet flushed, and one of key
// second (account "b", price 30), written by a Credit of b.
func crashWithAReusedID(t *testing.T) (crashed string, first, second keystore.KeyInfo) {
	t.Helper()
	path := tempPath(t)
	s := mustOpen(t, path)
	defer s.Close()
	mustAccount(t, s, "a", 1_000)
	mustAccount(t, s, "b", 1_000)
	first, sa := mustKey(t, s, keystore.NewKey{Account: "a", Scopes: []string{"x"}})
	second, sb := mustKey(t, s, keystore.NewKey{Account: "b", Scopes: []string{"x"}})
	mustReserve(t, s, mustLookup(t, s, sa), "req", 10, 10)
	mustFlush(t, s)
	s.Settle("req", true, 0, false)
	mustReserve(t, s, mustLookup(t, s, sb), "req", 30, 30)
	if _, err := s.Credit("b", 1); err != nil { // writes b's reservation, not a's settlement
		t.Fatal(err)
	}
	return crashCopy(t, path), first, second
}

// TestCrashWithAReusedID: a request ID settled on one account and reserved
// again on another is written for the second by a Credit of its account,
// before a flush deletes the first: a crash then leaves both on disk. The
// store opens, with both held: a later log entry settles the newer, and
// the older, whose settlement the crash lost, expires at its price.
func TestCrashWithAReusedID(t *testing.T) {
	crashed, first, second := crashWithAReusedID(t)
	c, err := keystore.Open(crashed, keystore.Options{})
	if err != nil {
		t.Fatalf("Open after a crash: %v", err)
	}
	defer c.Close()
	if got, want := ledgerOf(t, c, "a", first.ID), (ledger{1_000, 10, 0, 10}); got != want {
		t.Errorf("account a after the crash: %+v, want %+v", got, want)
	}
	if got, want := ledgerOf(t, c, "b", second.ID), (ledger{1_001, 30, 0, 30}); got != want {
		t.Errorf("account b after the crash: %+v, want %+v", got, want)
	}
	if st, charged := c.Settle("req", true, 0, false); st != keystore.SettleCommitted || charged != 30 {
		t.Errorf("Settle after the crash = %v, %d; want the newer reservation committed at 30", st, charged)
	}
	if n := c.ExpireReservations(deadline); n != 1 {
		t.Errorf("ExpireReservations = %d, want 1 (the older reservation)", n)
	}
	if got, want := ledgerOf(t, c, "a", first.ID), (ledger{990, 0, 10, 0}); got != want {
		t.Errorf("account a after expiry: %+v, want %+v", got, want)
	}
}

// TestRunExpires: Run expires reservations on the store's clock, and
// flushes what it committed.
func TestRunExpires(t *testing.T) {
	path := tempPath(t)
	clk := newClock(t0)
	s := openWith(t, path, keystore.Options{Now: clk.Now, FlushInterval: 5 * time.Millisecond})
	defer s.Close()
	mustAccount(t, s, "acme", 1_000)
	info, secret := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}})
	k := mustLookup(t, s, secret)
	if err := s.Reserve(k, "due", 100, 100, t0.Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	if err := s.Reserve(k, "not due", 50, 50, t0.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- s.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-ran; err != nil {
			t.Errorf("Run = %v", err)
		}
	}()
	clk.set(t0.Add(time.Minute)) // the first deadline, on the store's clock only
	// Wait (boundedly) until Run has expired it and flushed the charge.
	want := ledger{900, 50, 100, 50}
	for start := time.Now(); ; time.Sleep(5 * time.Millisecond) {
		c := mustOpen(t, crashCopy(t, path))
		got := ledgerOf(t, c, "acme", info.ID)
		c.Close()
		if got == want {
			break
		}
		if time.Since(start) > 30*time.Second {
			t.Fatalf("on disk: %+v, want %+v", got, want)
		}
	}
	if got := ledgerOf(t, s, "acme", info.ID); got != want {
		t.Errorf("in memory: %+v, want %+v", got, want)
	}
}
