package redisstore_test

import (
	"context"
	"errors"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap/zaptest"

	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/money"
	"github.com/keygate/keygate/keystore/rconn"
	"github.com/keygate/keygate/keystore/rconn/rconntest"
	"github.com/keygate/keygate/keystore/redisstore"
)

// migrateConn is a connection for Migrate on srv with key prefix prefix
// ("" : the default).
func migrateConn(t *testing.T, srv *rconntest.Server, prefix string) *rconn.Conn {
	t.Helper()
	c, err := rconn.Dial(rconn.Config{Addr: srv.Addr(), KeyPrefix: prefix, Timeout: 5 * time.Second}, rconn.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// fixture is a bbolt store's content as Migrate takes it, with the
// secrets of its keys.
type fixture struct {
	m       redisstore.Migration
	secrets map[string]string // key ID → secret
}

// Names of the fixture's keys.
const (
	kPlain   = 0 // acme: no cap, spent 1.25
	kDaily   = 1 // acme: daily cap 5, spent 0.75 today
	kStale   = 2 // beta: daily cap 5, spent 3 in an earlier day: reads as 0
	kRevoked = 3 // beta: revoked an hour ago
	kGrace   = 4 // acme: rotated, revoked in an hour
)

func newFixture(t *testing.T, now time.Time) fixture {
	t.Helper()
	f := fixture{secrets: map[string]string{}}
	acct := func(id, tier string, bal money.Micros, opts ...keystore.AccountOption) {
		rec, err := keystore.NewAccountRecord(id, tier, 0, now.Add(-48*time.Hour), opts...)
		if err != nil {
			t.Fatal(err)
		}
		f.m.Accounts = append(f.m.Accounts, redisstore.MigrateAccount{Record: rec, Balance: bal})
	}
	acct("acme", "free", 10*money.PerUSD, keystore.WithAlertBelow(money.PerUSD))
	acct("beta", "tier1", -250) // a settlement above its reservation took it below zero
	key := func(account string, nk keystore.NewKey, spent money.Micros, period int32) *keystore.KeyRecord {
		nk.Account, nk.Scopes = account, []string{"chat:write", "chat:read"}
		rec, secret, err := keystore.NewKeyRecord(nk, now.Add(-24*time.Hour))
		if err != nil {
			t.Fatal(err)
		}
		f.secrets[rec.ID] = secret
		f.m.Keys = append(f.m.Keys, redisstore.MigrateKey{Record: rec, Spent: spent, Period: period})
		return &f.m.Keys[len(f.m.Keys)-1].Record
	}
	today := keystore.PeriodDay.Index(now)
	key("acme", keystore.NewKey{Name: "plain"}, 1_250_000, 0)
	key("acme", keystore.NewKey{Name: "daily", SpendCap: 5 * money.PerUSD, CapPeriod: keystore.PeriodDay}, 750_000, today)
	key("beta", keystore.NewKey{Name: "stale", SpendCap: 5 * money.PerUSD, CapPeriod: keystore.PeriodDay}, 3*money.PerUSD, today-1)
	key("beta", keystore.NewKey{Name: "revoked"}, 0, 0).RevokedAt = now.Add(-time.Hour).UTC()
	g := key("acme", keystore.NewKey{Name: "grace", SpendCap: 2 * money.PerUSD}, 100, 0)
	g.RevokedAt, g.RotatedTo = now.Add(time.Hour).UTC(), f.m.Keys[kPlain].Record.ID
	f.m.Reservations = []redisstore.MigrateReservation{
		{ID: "req-open", KeyID: f.m.Keys[kDaily].Record.ID, Price: 2000, MaxPrice: 50_000, Deadline: now.Add(time.Hour)},
		{ID: "req-due", KeyID: f.m.Keys[kPlain].Record.ID, Price: 3000, MaxPrice: 3000, Deadline: now.Add(-time.Minute)},
		{ID: "req-open\x00123", KeyID: f.m.Keys[kDaily].Record.ID, Price: 500, MaxPrice: 500, Deadline: now.Add(10 * time.Millisecond)},
	}
	return f
}

func (f *fixture) id(i int) string { return f.m.Keys[i].Record.ID }

// TestMigrate: a migrated store serves as the bbolt store did: the old
// secrets authenticate (revoked ones do not), the balances, spends and
// settings read the same, and the reservations settle and expire as if a
// replica had made them.
func TestMigrate(t *testing.T) {
	srv := rconntest.Start(t)
	now := time.Now()
	f := newFixture(t, now)
	res, err := redisstore.Migrate(context.Background(), migrateConn(t, srv, ""), f.m,
		redisstore.MigrateOptions{Source: "test.db", Batch: 2, Log: zaptest.NewLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	want := redisstore.MigrateResult{Accounts: 2, Keys: 5, Reservations: 3, MarkerCreated: true, Version: 7}
	if diff := cmp.Diff(want, res, cmp.FilterPath(func(p cmp.Path) bool { return p.Last().String() == ".Epoch" }, cmp.Ignore())); diff != "" {
		t.Errorf("result (-want +got):\n%s", diff)
	}
	if res.Epoch == "" {
		t.Error("no epoch")
	}
	rc := rawClient(t, srv)
	if n := rc.Exists(context.Background(), "keygate:migrating").Val(); n != 0 {
		t.Error("keygate:migrating is left after a complete migration")
	}
	if got := rc.Get(context.Background(), "keygate:marker").Val(); got != res.Epoch {
		t.Errorf("marker %q, want the epoch returned, %q", got, res.Epoch)
	}

	r := startReplica(t, srv, "a", "")
	eventually(t, "the replica syncs the migrated keys", func() bool { return r.accepts(f.secrets[f.id(kPlain)], now) })
	for i, want := range []bool{kPlain: true, kDaily: true, kStale: true, kRevoked: false, kGrace: true} {
		if got := r.accepts(f.secrets[f.id(i)], now); got != want {
			t.Errorf("key %s (%s): accepted %v, want %v", f.id(i), f.m.Keys[i].Record.Name, got, want)
		}
	}
	if r.accepts(f.secrets[f.id(kGrace)], now.Add(2*time.Hour)) {
		t.Error("the rotated key is accepted after its grace")
	}

	accts, err := r.store.ListAccounts()
	if err != nil {
		t.Fatal(err)
	}
	wantAccts := []keystore.Account{
		{ID: "acme", Tier: "free", Balance: 10 * money.PerUSD, Reserved: 5500, AlertBelow: money.PerUSD, CreatedAt: f.m.Accounts[0].Record.CreatedAt},
		{ID: "beta", Tier: "tier1", Balance: -250, CreatedAt: f.m.Accounts[1].Record.CreatedAt},
	}
	if diff := cmp.Diff(wantAccts, accts); diff != "" {
		t.Errorf("accounts (-want +got):\n%s", diff)
	}
	for i, want := range []struct {
		spent, reserved money.Micros
	}{kPlain: {1_250_000, 3000}, kDaily: {750_000, 2500}, kStale: {0, 0}, kRevoked: {0, 0}, kGrace: {100, 0}} {
		k, err := r.store.Key(f.id(i))
		if err != nil {
			t.Fatal(err)
		}
		rec := f.m.Keys[i].Record
		wantInfo := keystore.KeyInfo{ID: rec.ID, Account: rec.Account, Name: rec.Name, Scopes: rec.Scopes, SpendCap: rec.SpendCap,
			Spent: want.spent, Reserved: want.reserved, CapPeriod: rec.CapPeriod, PeriodResetsAt: k.PeriodResetsAt,
			CreatedAt: rec.CreatedAt, RevokedAt: rec.RevokedAt, RotatedTo: rec.RotatedTo}
		if diff := cmp.Diff(wantInfo, k); diff != "" {
			t.Errorf("key %s (-want +got):\n%s", rec.Name, diff)
		}
	}
	keys, err := r.store.ListKeys("beta")
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) != 2 {
		t.Errorf("keys of beta: %d, want 2", len(keys))
	}

	// A reservation settles from any replica, as one it made would.
	if got, charged := r.store.Settle("req-open", true, 1500, true); got != keystore.SettleCommitted || charged != 1500 {
		t.Errorf("Settle(req-open) = %v, %d; want committed, 1500", got, charged)
	}
	// The one past its deadline, and the older duplicate once due, are
	// committed at their price.
	if n := r.store.ExpireReservations(now); n != 1 {
		t.Errorf("ExpireReservations(now) = %d, want 1 (req-due)", n)
	}
	if n := r.store.ExpireReservations(now.Add(time.Second)); n != 1 {
		t.Errorf("ExpireReservations(+1s) = %d, want 1 (the older req-open)", n)
	}
	a, err := r.store.Account("acme")
	if err != nil {
		t.Fatal(err)
	}
	if want := 10*money.PerUSD - 1500 - 3000 - 500; a.Balance != want || a.Reserved != 0 {
		t.Errorf("acme after settling: balance %d reserved %d, want %d and 0", a.Balance, a.Reserved, want)
	}
	k, err := r.store.Key(f.id(kDaily))
	if err != nil {
		t.Fatal(err)
	}
	if want := money.Micros(750_000 + 1500 + 500); k.Spent != want || k.Reserved != 0 {
		t.Errorf("daily key after settling: spent %d reserved %d, want %d and 0", k.Spent, k.Reserved, want)
	}
}

// TestMigrateRefusesData: a prefix that holds accounts, keys or
// reservations is never migrated into, with or without Force, and nothing
// is written; another prefix of the same Redis is.
func TestMigrateRefusesData(t *testing.T) {
	srv := rconntest.Start(t)
	ctx := context.Background()
	now := time.Now()
	conn := migrateConn(t, srv, "")
	if _, err := redisstore.Migrate(ctx, conn, newFixture(t, now).m, redisstore.MigrateOptions{}); err != nil {
		t.Fatal(err)
	}
	rc := rawClient(t, srv)
	version := rc.Get(ctx, "keygate:version").Val()
	for _, force := range []bool{false, true} {
		_, err := redisstore.Migrate(ctx, conn, newFixture(t, now).m, redisstore.MigrateOptions{Force: force})
		want := redisstore.ErrTargetNotEmpty
		if force {
			want = redisstore.ErrNothingToForce
		}
		if !errors.Is(err, want) {
			t.Errorf("a second Migrate (force %v): %v, want %v", force, err, want)
		}
	}
	if n := rc.SCard(ctx, "keygate:accounts").Val(); n != 2 {
		t.Errorf("%d accounts after the refused migrations, want 2", n)
	}
	if v := rc.Get(ctx, "keygate:version").Val(); v != version {
		t.Errorf("version %s after the refused migrations, want %s", v, version)
	}

	// Records that the sets do not list count too: what a replica or a
	// partial copy left.
	for _, stray := range []string{"acct:x", "key:key_x", "acctkeys:x", "res:r"} {
		t.Run(stray, func(t *testing.T) {
			prefix := "p" + strings.ReplaceAll(stray, ":", "-") + ":"
			rc.HSet(ctx, prefix+stray, "f", "v")
			_, err := redisstore.Migrate(ctx, migrateConn(t, srv, prefix), newFixture(t, now).m, redisstore.MigrateOptions{})
			if !errors.Is(err, redisstore.ErrTargetNotEmpty) || !strings.Contains(err.Error(), prefix+stray) {
				t.Errorf("Migrate beside %s: %v, want %v naming it", stray, err, redisstore.ErrTargetNotEmpty)
			}
		})
	}

	// A glob character in the prefix is not a pattern: "o*:" is empty
	// although "other:" is not.
	rc.SAdd(ctx, "other:accounts", "x")
	rc.HSet(ctx, "other:acct:x", "tier", "free")
	if _, err := redisstore.Migrate(ctx, migrateConn(t, srv, "o*:"), newFixture(t, now).m, redisstore.MigrateOptions{}); err != nil {
		t.Errorf("Migrate into o*: beside other:: %v", err)
	}
}

// TestMigrateInterrupted: what an interrupted migration leaves (P
// migrating and some records, with P version untouched) makes the next
// Migrate refuse and say where it came from; Force clears it all and
// migrates, and a replica that was running syncs in full.
func TestMigrateInterrupted(t *testing.T) {
	srv := rconntest.Start(t)
	ctx := context.Background()
	now := time.Now()
	r := startReplica(t, srv, "a", "") // running on the empty Redis: it writes the marker
	eventually(t, "the replica's first sync", func() bool { return r.syncs("start") == 1 })
	conn := migrateConn(t, srv, "")
	rc := rawClient(t, srv)
	epoch := rc.Get(ctx, "keygate:marker").Val()
	if epoch == "" {
		t.Fatal("the replica wrote no marker")
	}
	rc.HSet(ctx, "keygate:migrating", "token", "t0", "source", "old.db", "started_at", "2026-01-02T03:04:05Z", "host", "h")
	rc.HSet(ctx, "keygate:acct:gone", "tier", "free", "created_at", "1", "bal", "5")
	rc.SAdd(ctx, "keygate:accounts", "gone")
	rc.HSet(ctx, "keygate:key:key_gone", "rec", "x", "account", "gone")
	rc.SAdd(ctx, "keygate:acctkeys:gone", "key_gone")
	rc.HSet(ctx, "keygate:res:r", "key", "key_gone")
	rc.ZAdd(ctx, "keygate:resdue", redis.Z{Score: 1, Member: "r"})

	f := newFixture(t, now)
	_, err := redisstore.Migrate(ctx, conn, f.m, redisstore.MigrateOptions{})
	if !errors.Is(err, redisstore.ErrMigrationInterrupted) || !strings.Contains(err.Error(), "old.db") ||
		!strings.Contains(err.Error(), "2026-01-02T03:04:05Z") {
		t.Fatalf("Migrate after an interrupted one: %v, want %v naming its source and start", err, redisstore.ErrMigrationInterrupted)
	}
	if rc.Exists(ctx, "keygate:acct:gone").Val() != 1 {
		t.Fatal("the refused Migrate changed what it found")
	}

	res, err := redisstore.Migrate(ctx, conn, f.m, redisstore.MigrateOptions{Force: true})
	if err != nil {
		t.Fatal(err)
	}
	// acct:gone, key:key_gone, acctkeys:gone, res:r, accounts and resdue
	// (keys was not there).
	if res.Cleared != 6 {
		t.Errorf("cleared %d redis keys, want 6", res.Cleared)
	}
	if res.Epoch != epoch || res.MarkerCreated {
		t.Errorf("epoch %q (created %v), want the replica's %q kept", res.Epoch, res.MarkerCreated, epoch)
	}
	for _, k := range []string{"keygate:acct:gone", "keygate:key:key_gone", "keygate:acctkeys:gone", "keygate:res:r", "keygate:migrating"} {
		if rc.Exists(ctx, k).Val() != 0 {
			t.Errorf("%s is left", k)
		}
	}
	if got := rc.SMembers(ctx, "keygate:accounts").Val(); len(got) != 2 || slices.Contains(got, "gone") {
		t.Errorf("accounts %v, want acme and beta", got)
	}
	if got := rc.ZCard(ctx, "keygate:resdue").Val(); got != 3 {
		t.Errorf("%d reservations due, want 3", got)
	}
	// The replica was at version 0: the one change, at version 7, skips
	// versions, and it syncs everything.
	eventually(t, "the running replica accepts a migrated key", func() bool { return r.accepts(f.secrets[f.id(kDaily)], now) })
	if n := r.syncs("gap"); n != 1 {
		t.Errorf("full syncs for a gap: %v, want 1", n)
	}
	if !r.accepts(f.secrets[f.id(kGrace)], now) || r.accepts(f.secrets[f.id(kRevoked)], now) {
		t.Error("after the sync the replica does not hold the migrated keys as they are")
	}
	if r.store.DataLost() {
		t.Error("the replica believes Redis lost its data")
	}
}

// TestMigrateChecksFirst: a migration that keygate would not accept is
// refused before anything is written.
func TestMigrateChecksFirst(t *testing.T) {
	srv := rconntest.Start(t)
	ctx := context.Background()
	now := time.Now()
	conn := migrateConn(t, srv, "")
	for _, tt := range []struct {
		name   string
		change func(*redisstore.Migration)
		want   error
	}{
		{"key of an unknown account", func(m *redisstore.Migration) { m.Keys[0].Record.Account = "nobody" }, keystore.ErrAccountNotFound},
		{"account twice", func(m *redisstore.Migration) { m.Accounts = append(m.Accounts, m.Accounts[0]) }, keystore.ErrInvalid},
		{"bad tier", func(m *redisstore.Migration) { m.Accounts[0].Record.Tier = "no tier" }, keystore.ErrInvalid},
		{"key without scopes", func(m *redisstore.Migration) { m.Keys[1].Record.Scopes = nil }, keystore.ErrInvalid},
		{"key twice", func(m *redisstore.Migration) { m.Keys = append(m.Keys, m.Keys[2]) }, keystore.ErrInvalid},
		{"negative spend", func(m *redisstore.Migration) { m.Keys[2].Spent = -1 }, keystore.ErrInvalid},
		{"reservation of an unknown key", func(m *redisstore.Migration) { m.Reservations[0].KeyID = "key_nope" }, keystore.ErrKeyNotFound},
		{"reservation above its max", func(m *redisstore.Migration) { m.Reservations[0].MaxPrice = 1 }, keystore.ErrInvalid},
		{"reservation twice", func(m *redisstore.Migration) { m.Reservations[1].ID = m.Reservations[0].ID }, keystore.ErrInvalid},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t, now)
			tt.change(&f.m)
			if _, err := redisstore.Migrate(ctx, conn, f.m, redisstore.MigrateOptions{}); !errors.Is(err, tt.want) {
				t.Errorf("Migrate: %v, want %v", err, tt.want)
			}
		})
	}
	if n, _ := rawClient(t, srv).DBSize(ctx).Result(); n != 0 {
		t.Errorf("%d redis keys after refused migrations, want 0", n)
	}
}

// TestMigrateOneAccount: a migration of a single account is one version,
// whose change names it: a running replica mirrors it from the stream.
func TestMigrateOneAccount(t *testing.T) {
	srv := rconntest.Start(t)
	r := startReplica(t, srv, "a", "")
	rec, err := keystore.NewAccountRecord("solo", "free", 42, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	m := redisstore.Migration{Accounts: []redisstore.MigrateAccount{{Record: rec, Balance: 42}}}
	res, err := redisstore.Migrate(context.Background(), migrateConn(t, srv, ""), m, redisstore.MigrateOptions{})
	if err != nil || res.Version != 1 {
		t.Fatalf("Migrate: version %d, %v; want 1", res.Version, err)
	}
	eventually(t, "the replica mirrors the account", func() bool { _, err := r.local.Account("solo"); return err == nil })
	if a, err := r.store.Account("solo"); err != nil || a.Balance != 42 {
		t.Errorf("Account(solo) = %+v, %v; want a balance of 42", a, err)
	}
}

// TestMigrateFailsMidway: a migration that Redis stops accepting midway
// (here: out of memory) leaves what it wrote, invisible to replicas (P
// version untouched) and marked; the next Migrate refuses and says so;
// with Force it clears that and migrates in full.
func TestMigrateFailsMidway(t *testing.T) {
	srv := rconntest.Start(t)
	ctx := context.Background()
	now := time.Now()
	conn := migrateConn(t, srv, "")
	rc := rawClient(t, srv)
	rec, err := keystore.NewAccountRecord("big", "free", 0, now)
	if err != nil {
		t.Fatal(err)
	}
	m := redisstore.Migration{Accounts: []redisstore.MigrateAccount{{Record: rec, Balance: money.PerUSD}}}
	secrets := map[string]string{}
	scopes := make([]string, 16) // about 2 KB a key
	for i := range scopes {
		scopes[i] = strconv.Itoa(i) + strings.Repeat("s", 120)
	}
	for i := range 3000 {
		k, secret, err := keystore.NewKeyRecord(keystore.NewKey{Account: "big", Name: "k" + strconv.Itoa(i), Scopes: scopes}, now)
		if err != nil {
			t.Fatal(err)
		}
		secrets[k.ID] = secret
		m.Keys = append(m.Keys, redisstore.MigrateKey{Record: k, Spent: money.Micros(i)})
	}
	info := rc.InfoMap(ctx, "memory").Val()["Memory"]["used_memory"]
	base, err := strconv.ParseInt(info, 10, 64)
	if err != nil {
		t.Fatalf("used_memory %q: %v", info, err)
	}
	// Room for the first batches, not for the 3000 keys (about 6 MB).
	if err := rc.ConfigSet(ctx, "maxmemory", strconv.FormatInt(base+2<<20, 10)).Err(); err != nil {
		t.Fatal(err)
	}
	_, err = redisstore.Migrate(ctx, conn, m, redisstore.MigrateOptions{Batch: 100, Source: "big.db"})
	if err == nil || !strings.Contains(err.Error(), "OOM") {
		t.Fatalf("Migrate into a full Redis: %v, want an OOM error", err)
	}
	written := rc.SCard(ctx, "keygate:keys").Val()
	if written == 0 || written == int64(len(m.Keys)) {
		t.Fatalf("%d keys written before the failure (%v; used_memory %s, base %d): the test wants a failure midway", written, err, rc.InfoMap(ctx, "memory").Val()["Memory"]["used_memory"], base)
	}
	t.Logf("%d of %d keys written before Redis refused: %v", written, len(m.Keys), err)
	if v := rc.Get(ctx, "keygate:version").Val(); v != "" {
		t.Errorf("version %q after a failed migration, want none", v)
	}
	if err := rc.ConfigSet(ctx, "maxmemory", "0").Err(); err != nil {
		t.Fatal(err)
	}
	_, err = redisstore.Migrate(ctx, conn, m, redisstore.MigrateOptions{})
	if !errors.Is(err, redisstore.ErrMigrationInterrupted) || !strings.Contains(err.Error(), "big.db") {
		t.Fatalf("Migrate after the failed one: %v, want %v naming big.db", err, redisstore.ErrMigrationInterrupted)
	}
	res, err := redisstore.Migrate(ctx, conn, m, redisstore.MigrateOptions{Force: true})
	if err != nil {
		t.Fatal(err)
	}
	if res.Keys != len(m.Keys) || res.Cleared == 0 || res.Version != int64(1+len(m.Keys)) {
		t.Errorf("Migrate with Force: %+v, want %d keys, something cleared, version %d", res, len(m.Keys), 1+len(m.Keys))
	}
	r := startReplica(t, srv, "a", "")
	eventually(t, "the replica holds every key", func() bool {
		for _, s := range secrets {
			if !r.accepts(s, now) {
				return false
			}
		}
		return true
	})
	k, err := r.store.Key(m.Keys[2999].Record.ID)
	if err != nil || k.Spent != 2999 {
		t.Errorf("the last key: spent %d, %v; want 2999", k.Spent, err)
	}
}
