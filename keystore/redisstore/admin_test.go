package redisstore_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/keygate/keygate/authz"
	"github.com/keygate/keygate/authz/ratelimit"
	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/admin"
	"github.com/keygate/keygate/keystore/keystoretest"
	"github.com/keygate/keygate/keystore/money"
	"github.com/keygate/keygate/keystore/rconn/rconntest"
	"github.com/keygate/keygate/keystore/redisstore"
)

var (
	_ admin.Store = (*redisstore.Store)(nil)
	_ authz.Keys  = (*redisstore.Store)(nil)
)

// TestErrorsMatchKeystore runs the same failing admin commands against a
// bbolt store and a Redis store: both must fail with the same sentinel.
func TestErrorsMatchKeystore(t *testing.T) {
	srv := rconntest.Start(t)
	r := startReplica(t, srv, "a", "")
	now := time.Now()
	type fixture struct{ active, revoked, rotated string }
	setup := func(st admin.Store) fixture {
		t.Helper()
		if _, err := st.CreateAccount("acme", "free", 100, now); err != nil {
			t.Fatal(err)
		}
		var f fixture
		for _, id := range []*string{&f.active, &f.revoked, &f.rotated} {
			k, _, err := st.CreateKey(keystore.NewKey{Account: "acme", Scopes: []string{"a"}}, now)
			if err != nil {
				t.Fatal(err)
			}
			*id = k.ID
		}
		if _, err := st.Revoke(f.revoked, now); err != nil {
			t.Fatal(err)
		}
		if _, _, _, err := st.Rotate(f.rotated, time.Hour, now); err != nil {
			t.Fatal(err)
		}
		return f
	}
	stores := map[string]admin.Store{"bbolt": keystoretest.Open(t), "redis": r.store}
	fixtures := map[string]fixture{}
	for name, st := range stores {
		fixtures[name] = setup(st)
	}
	newKey := func(nk keystore.NewKey) func(admin.Store, fixture) error {
		return func(st admin.Store, _ fixture) error { _, _, err := st.CreateKey(nk, now); return err }
	}
	tests := []struct {
		name string
		op   func(admin.Store, fixture) error
		want error
	}{
		{"account exists", func(st admin.Store, _ fixture) error {
			_, err := st.CreateAccount("acme", "free", 0, now)
			return err
		}, keystore.ErrAccountExists},
		{"bad account id", func(st admin.Store, _ fixture) error {
			_, err := st.CreateAccount("a b", "free", 0, now)
			return err
		}, keystore.ErrInvalid},
		{"bad tier", func(st admin.Store, _ fixture) error {
			_, err := st.CreateAccount("new", "a/b", 0, now)
			return err
		}, keystore.ErrInvalid},
		{"negative balance", func(st admin.Store, _ fixture) error {
			_, err := st.CreateAccount("new", "free", -1, now)
			return err
		}, keystore.ErrInvalid},
		{"negative alert", func(st admin.Store, _ fixture) error {
			_, err := st.CreateAccount("new", "free", 0, now, keystore.WithAlertBelow(-1))
			return err
		}, keystore.ErrInvalid},
		{"unknown account", func(st admin.Store, _ fixture) error { _, err := st.Account("ghost"); return err }, keystore.ErrAccountNotFound},
		{"credit of 0", func(st admin.Store, _ fixture) error { _, err := st.Credit("acme", 0); return err }, keystore.ErrInvalid},
		{"credit unknown", func(st admin.Store, _ fixture) error { _, err := st.Credit("ghost", 1); return err }, keystore.ErrAccountNotFound},
		{"credit past the maximum", func(st admin.Store, _ fixture) error {
			_, err := st.Credit("acme", money.Max-50)
			return err
		}, keystore.ErrInvalid},
		{"credit with a bad alert", func(st admin.Store, _ fixture) error {
			_, err := st.Credit("acme", 1, keystore.WithAlertBelow(-1))
			return err
		}, keystore.ErrInvalid},
		{"key for unknown account", newKey(keystore.NewKey{Account: "ghost", Scopes: []string{"a"}}), keystore.ErrAccountNotFound},
		{"key without scopes", newKey(keystore.NewKey{Account: "acme"}), keystore.ErrInvalid},
		{"key with a cap period and no cap", newKey(keystore.NewKey{Account: "acme", Scopes: []string{"a"}, CapPeriod: keystore.PeriodDay}), keystore.ErrInvalid},
		{"key expired at birth", newKey(keystore.NewKey{Account: "acme", Scopes: []string{"a"}, ExpiresAt: now}), keystore.ErrInvalid},
		{"unknown key", func(st admin.Store, _ fixture) error { _, err := st.Key("key_nonexistent0000"); return err }, keystore.ErrKeyNotFound},
		{"revoke unknown", func(st admin.Store, _ fixture) error {
			_, err := st.Revoke("key_nonexistent0000", now)
			return err
		}, keystore.ErrKeyNotFound},
		{"rotate unknown", func(st admin.Store, _ fixture) error {
			_, _, _, err := st.Rotate("key_nonexistent0000", 0, now)
			return err
		}, keystore.ErrKeyNotFound},
		{"rotate revoked", func(st admin.Store, f fixture) error {
			_, _, _, err := st.Rotate(f.revoked, 0, now.Add(time.Second))
			return err
		}, keystore.ErrKeyInactive},
		{"rotate rotated", func(st admin.Store, f fixture) error {
			_, _, _, err := st.Rotate(f.rotated, 0, now.Add(time.Second))
			return err
		}, keystore.ErrKeyInactive},
		{"rotate with negative grace", func(st admin.Store, f fixture) error {
			_, _, _, err := st.Rotate(f.active, -time.Second, now)
			return err
		}, keystore.ErrInvalid},
		{"rotate with endless grace", func(st admin.Store, f fixture) error {
			_, _, _, err := st.Rotate(f.active, 1<<63-1, now)
			return err
		}, keystore.ErrInvalid},
		{"revoke at a bad time", func(st admin.Store, f fixture) error {
			_, err := st.Revoke(f.active, time.Unix(0, 0))
			return err
		}, keystore.ErrInvalid},
	}
	for _, tt := range tests {
		for name, st := range stores {
			if err := tt.op(st, fixtures[name]); !errors.Is(err, tt.want) {
				t.Errorf("%s, %s store: %v, want %v", tt.name, name, err, tt.want)
			}
		}
	}
}

func TestAdminReads(t *testing.T) {
	srv := rconntest.Start(t)
	a := startReplica(t, srv, "a", "")
	b := startReplica(t, srv, "b", "")
	now := time.Now().Truncate(time.Second)
	acct, err := a.store.CreateAccount("zeta", "pro", 250, now, keystore.WithAlertBelow(20))
	if err != nil {
		t.Fatal(err)
	}
	want := keystore.Account{ID: "zeta", Tier: "pro", Balance: 250, AlertBelow: 20, CreatedAt: now.UTC()}
	if diff := cmp.Diff(want, acct); diff != "" {
		t.Errorf("CreateAccount (-want +got):\n%s", diff)
	}
	if got, err := b.store.Account("zeta"); err != nil || !cmp.Equal(want, got) {
		t.Errorf("b's Account = %+v, %v; want %+v", got, err, want)
	}
	mustAccount(t, b, "alpha", 0)
	accts, err := b.store.ListAccounts()
	if err != nil || len(accts) != 2 || accts[0].ID != "alpha" || accts[1].ID != "zeta" {
		t.Errorf("ListAccounts = %+v, %v; want alpha then zeta", accts, err)
	}

	nk := keystore.NewKey{
		Account: "zeta", Name: "production", Scopes: []string{"chat:write", "embeddings:write"},
		RateLimit: ratelimit.Rate{N: 500, Per: time.Minute}, SpendCap: 25 * money.PerUSD,
		CapPeriod: keystore.PeriodMonth, ExpiresAt: now.Add(90 * 24 * time.Hour),
	}
	k1, _, err := a.store.CreateKey(nk, now)
	if err != nil {
		t.Fatal(err)
	}
	wantKey := keystore.KeyInfo{
		ID: k1.ID, Account: "zeta", Name: "production", Scopes: nk.Scopes, RateLimit: nk.RateLimit,
		SpendCap: nk.SpendCap, CapPeriod: keystore.PeriodMonth, PeriodResetsAt: keystore.PeriodMonth.ResetsAt(time.Now()),
		CreatedAt: now.UTC(), ExpiresAt: nk.ExpiresAt.UTC(),
	}
	if diff := cmp.Diff(wantKey, k1); diff != "" {
		t.Errorf("CreateKey (-want +got):\n%s", diff)
	}
	if got, err := b.store.Key(k1.ID); err != nil || !cmp.Equal(wantKey, got) {
		t.Errorf("b's Key = %+v, %v; want %+v", got, err, wantKey)
	}
	// The local store holds the same record, without the spend.
	if got, err := a.local.Key(k1.ID); err != nil || !cmp.Equal(wantKey, got) {
		t.Errorf("a's local Key = %+v, %v; want %+v", got, err, wantKey)
	}
	k2, _, err := b.store.CreateKey(keystore.NewKey{Account: "zeta", Scopes: []string{"a"}}, now.Add(time.Second))
	if err != nil {
		t.Fatal(err)
	}
	k3, _, err := b.store.CreateKey(keystore.NewKey{Account: "alpha", Scopes: []string{"a"}}, now.Add(2*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	keys, err := a.store.ListKeys("zeta")
	if err != nil || len(keys) != 2 || keys[0].ID != k1.ID || keys[1].ID != k2.ID {
		t.Errorf("ListKeys(zeta) = %+v, %v; want k1 then k2", keys, err)
	}
	all, err := a.store.ListKeys("")
	if err != nil || len(all) != 3 || all[2].ID != k3.ID {
		t.Errorf("ListKeys() = %+v, %v; want 3 keys, k3 last", all, err)
	}
	if none, err := a.store.ListKeys("ghost"); err != nil || len(none) != 0 {
		t.Errorf("ListKeys(ghost) = %+v, %v; want none", none, err)
	}
}

// TestReadsShowRedisAmounts: balances and spend are rlease's to keep in
// Redis; reads show what it holds, and spend of an ended period as 0.
func TestReadsShowRedisAmounts(t *testing.T) {
	srv := rconntest.Start(t)
	rc := rawClient(t, srv)
	a := startReplica(t, srv, "a", "")
	mustAccount(t, a, "acme", 100)
	daily, _, err := a.store.CreateKey(keystore.NewKey{Account: "acme", Scopes: []string{"a"}, SpendCap: 50, CapPeriod: keystore.PeriodDay}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	life, _ := mustKey(t, a, "acme")
	ctx := context.Background()
	today := keystore.PeriodDay.Index(time.Now())
	if p, err := rc.HGet(ctx, "keygate:key:"+daily.ID, "period").Int64(); err != nil || p != int64(today) {
		t.Errorf("a new key's spend belongs to period %d, %v; want today's, %d", p, err, today)
	}
	for _, err := range []error{
		rc.HIncrBy(ctx, "keygate:acct:acme", "bal", -30).Err(),
		rc.HIncrBy(ctx, "keygate:acct:acme", "leased", 40).Err(),
		rc.HSet(ctx, "keygate:key:"+daily.ID, "spent", 7, "period", today, "leased", 40).Err(),
		rc.HSet(ctx, "keygate:key:"+life.ID, "spent", 9).Err(),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	if got, err := a.store.Account("acme"); err != nil || got.Balance != 70 || got.Reserved != 0 {
		t.Errorf("Account = %+v, %v; want a balance of 70 (leases not shown)", got, err)
	}
	if got, err := a.store.Key(daily.ID); err != nil || got.Spent != 7 {
		t.Errorf("Key(daily) = %+v, %v; want spent 7", got, err)
	}
	if got, err := a.store.Key(life.ID); err != nil || got.Spent != 9 {
		t.Errorf("Key(lifetime cap) = %+v, %v; want spent 9", got, err)
	}
	if err := rc.HSet(ctx, "keygate:key:"+daily.ID, "period", today-1).Err(); err != nil {
		t.Fatal(err)
	}
	if got, err := a.store.Key(daily.ID); err != nil || got.Spent != 0 {
		t.Errorf("Key(daily) with yesterday's spend = %+v, %v; want spent 0", got, err)
	}
}

func TestCredit(t *testing.T) {
	srv := rconntest.Start(t)
	a := startReplica(t, srv, "a", "")
	b := startReplica(t, srv, "b", "")
	mustAccount(t, a, "acme", 100)
	got, err := a.store.Credit("acme", 25, keystore.WithAlertBelow(10))
	if err != nil || got.Balance != 125 || got.AlertBelow != 10 {
		t.Errorf("Credit = %+v, %v; want a balance of 125, alert below 10", got, err)
	}
	if got, err := b.store.Account("acme"); err != nil || got.Balance != 125 || got.AlertBelow != 10 {
		t.Errorf("b's Account = %+v, %v", got, err)
	}
	if local, err := a.local.Account("acme"); err != nil || local.AlertBelow != 10 || local.Balance != 0 {
		t.Errorf("a's local account = %+v, %v; want the alert level, and no local balance", local, err)
	}
	eventually(t, "b mirrors the alert level", func() bool {
		local, err := b.local.Account("acme")
		return err == nil && local.AlertBelow == 10
	})
	// Up to the maximum, and not past it.
	if _, err := a.store.Credit("acme", money.Max-125); err != nil {
		t.Errorf("Credit up to the maximum: %v", err)
	}
	if _, err := a.store.Credit("acme", 1); !errors.Is(err, keystore.ErrInvalid) {
		t.Errorf("Credit past the maximum = %v, want ErrInvalid", err)
	}
	if got, err := b.store.Account("acme"); err != nil || got.Balance != money.Max {
		t.Errorf("Account = %+v, %v; want the maximum balance", got, err)
	}
	// A balance below zero (a settled overdraft) takes a credit too.
	mustAccount(t, a, "owing", 0)
	if err := rawClient(t, srv).HSet(context.Background(), "keygate:acct:owing", "bal", -5).Err(); err != nil {
		t.Fatal(err)
	}
	if got, err := b.store.Credit("owing", 10); err != nil || got.Balance != 5 {
		t.Errorf("Credit of a negative balance = %+v, %v; want a balance of 5", got, err)
	}
}

func TestDebitAndReserve(t *testing.T) {
	srv := rconntest.Start(t)
	a := startReplica(t, srv, "a", "")
	mustAccount(t, a, "acme", 100)
	_, secret := mustKey(t, a, "acme")
	k, ok := a.store.Lookup(secret, time.Now())
	if !ok {
		t.Fatal("Lookup failed")
	}
	if err := a.store.Debit(k, 0); err != nil || a.ledger.count() != 0 {
		t.Errorf("Debit(0) = %v with %d spends; want nil and none", err, a.ledger.count())
	}
	if err := a.store.Debit(k, 3); err != nil || a.ledger.count() != 1 {
		t.Errorf("Debit(3) = %v with %d spends; want nil and one", err, a.ledger.count())
	}
	// Reserve does not go through the ledger (settle_test.go tests it).
	if err := a.store.Reserve(k, "req-1", 3, 5, time.Now().Add(time.Minute)); err != nil || a.ledger.count() != 1 {
		t.Errorf("Reserve = %v with %d spends; want nil and still one", err, a.ledger.count())
	}
	local := keystoretest.Open(t)
	noLedger, err := redisstore.Open(a.conn, local, redisstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := noLedger.Debit(k, 3); !errors.Is(err, redisstore.ErrNoLedger) {
		t.Errorf("Debit without a ledger = %v, want ErrNoLedger", err)
	}
}
