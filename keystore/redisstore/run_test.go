package redisstore_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/rconn"
	"github.com/keygate/keygate/keystore/rconn/rconntest"
	"github.com/keygate/keygate/keystore/redisstore"
)

func TestCreateOnOneUseOnAnother(t *testing.T) {
	srv := rconntest.Start(t)
	a := startReplica(t, srv, "a", "")
	b := startReplica(t, srv, "b", "")
	mustAccount(t, a, "acme", 100)
	k, secret := mustKey(t, a, "acme")
	if !a.accepts(secret, time.Now()) {
		t.Error("the replica that created the key refuses it")
	}
	eventually(t, "b accepts a key created on a", func() bool { return b.accepts(secret, time.Now()) })
	got, ok := b.store.Lookup(secret, time.Now())
	if !ok || got.ID != k.ID || got.Account() != "acme" || got.Tier() != "free" || !got.HasScope("chat:write") {
		t.Errorf("b's Lookup = %+v, %v", got, ok)
	}
	// The mirror survives in b's file: a restart authenticates from it.
	b = b.restart(srv)
	if !b.accepts(secret, time.Now()) {
		t.Error("b refuses the key after a restart")
	}
}

func TestRevokePropagates(t *testing.T) {
	srv := rconntest.Start(t)
	a := startReplica(t, srv, "a", "")
	b := startReplica(t, srv, "b", "")
	mustAccount(t, a, "acme", 100)
	k, secret := mustKey(t, a, "acme")
	eventually(t, "b accepts the key", func() bool { return b.accepts(secret, time.Now()) })
	if _, err := a.store.Revoke(k.ID, time.Now()); err != nil {
		t.Fatal(err)
	}
	if a.accepts(secret, time.Now()) {
		t.Error("the replica that revoked the key still accepts it")
	}
	eventually(t, "b refuses the revoked key", func() bool { return !b.accepts(secret, time.Now()) })
	got, err := b.store.Key(k.ID)
	if err != nil || got.State(time.Now()) != keystore.StateRevoked {
		t.Errorf("b's Key = %+v, %v; want revoked", got, err)
	}
}

func TestRotatePropagates(t *testing.T) {
	srv := rconntest.Start(t)
	a := startReplica(t, srv, "a", "")
	b := startReplica(t, srv, "b", "")
	mustAccount(t, a, "acme", 100)
	k, oldSecret := mustKey(t, a, "acme")
	eventually(t, "b accepts the key", func() bool { return b.accepts(oldSecret, time.Now()) })

	now := time.Now()
	grace := time.Hour
	old, nw, secret, err := b.store.Rotate(k.ID, grace, now)
	if err != nil {
		t.Fatal(err)
	}
	if old.RotatedTo != nw.ID || !old.RevokedAt.Equal(now.Add(grace)) || nw.Account != "acme" || nw.Name != k.Name {
		t.Errorf("Rotate = %+v, %+v", old, nw)
	}
	if !b.accepts(secret, now) {
		t.Error("the replica that rotated refuses the new key")
	}
	eventually(t, "a accepts the rotated key", func() bool { return a.accepts(secret, time.Now()) })
	eventually(t, "a knows the rotation", func() bool {
		info, err := a.local.Key(k.ID)
		return err == nil && info.RotatedTo == nw.ID
	})
	for name, r := range map[string]*replica{"a": a, "b": b} {
		if !r.accepts(oldSecret, now.Add(grace-time.Second)) {
			t.Errorf("%s refuses the old key during its grace", name)
		}
		// The grace's end needs no message: each replica compares with its clock.
		if r.accepts(oldSecret, now.Add(grace)) {
			t.Errorf("%s accepts the old key after its grace", name)
		}
	}
	// Revoking during the grace ends it everywhere.
	if _, err := a.store.Revoke(k.ID, time.Now()); err != nil {
		t.Fatal(err)
	}
	eventually(t, "b refuses the old key once revoked", func() bool { return !b.accepts(oldSecret, time.Now()) })
	if !b.accepts(secret, time.Now()) {
		t.Error("b refuses the new key")
	}
}

func TestLateReplicaSyncs(t *testing.T) {
	srv := rconntest.Start(t)
	a := startReplica(t, srv, "a", "")
	secrets := map[string]string{}
	for i := range 3 {
		acct := fmt.Sprintf("acct-%d", i)
		mustAccount(t, a, acct, 100)
		for range 10 {
			k, secret := mustKey(t, a, acct)
			secrets[k.ID] = secret
		}
	}
	var revoked string
	for id := range secrets {
		revoked = id
		break
	}
	if _, err := a.store.Revoke(revoked, time.Now()); err != nil {
		t.Fatal(err)
	}
	c := startReplica(t, srv, "c", "")
	eventually(t, "c syncs", func() bool { return len(c.local.Keys("")) == len(secrets) })
	for id, secret := range secrets {
		if got := c.accepts(secret, time.Now()); got != (id != revoked) {
			t.Errorf("c's Lookup of %s = %v, want %v", id, got, id != revoked)
		}
	}
	if got := len(c.local.Accounts()); got != 3 {
		t.Errorf("c mirrors %d accounts, want 3", got)
	}
	if got := c.syncs("start"); got != 1 {
		t.Errorf("c did %v start syncs, want 1", got)
	}
}

func TestRestartDuringOutage(t *testing.T) {
	srv := rconntest.Start(t)
	a := startReplica(t, srv, "a", "")
	b := startReplica(t, srv, "b", "")
	mustAccount(t, a, "acme", 100)
	_, secret := mustKey(t, a, "acme")
	eventually(t, "b accepts the key", func() bool { return b.accepts(secret, time.Now()) })

	srv.Stop()
	b = b.restart(srv)
	if !b.accepts(secret, time.Now()) {
		t.Error("b, restarted while Redis is down, refuses a key its file holds")
	}
	if b.store.DataLost() {
		t.Error("b reports data lost while Redis is merely down")
	}
	eventually(t, "admin writes are refused while Redis is down", func() bool {
		_, err := b.store.CreateAccount("other", "free", 0, time.Now())
		return errors.Is(err, rconn.ErrUnavailable)
	})
	if _, err := b.store.ListKeys(""); err == nil {
		t.Error("ListKeys works while Redis is down")
	}

	srv.Restart() // its AOF brings the data back
	k2, secret2 := mustKeyEventually(t, a, "acme")
	eventually(t, "b accepts a key created after the outage", func() bool { return b.accepts(secret2, time.Now()) })
	if _, err := a.store.Revoke(k2.ID, time.Now()); err != nil {
		t.Fatal(err)
	}
	eventually(t, "b refuses it once revoked", func() bool { return !b.accepts(secret2, time.Now()) })
	if b.store.DataLost() || a.store.DataLost() {
		t.Error("data lost after a restart that kept the data")
	}
}

// mustKeyEventually creates a key once r's Redis answers again.
func mustKeyEventually(t *testing.T, r *replica, account string) (keystore.KeyInfo, string) {
	t.Helper()
	var (
		k      keystore.KeyInfo
		secret string
	)
	eventually(t, "a key can be created", func() bool {
		var err error
		k, secret, err = r.store.CreateKey(keystore.NewKey{Account: account, Scopes: []string{"chat:write"}}, time.Now())
		return err == nil
	})
	return k, secret
}

func TestStreamTrimmed(t *testing.T) {
	srv := rconntest.Start(t)
	rc := rawClient(t, srv)
	a := startReplica(t, srv, "a", "")
	b := startReplica(t, srv, "b", "")
	mustAccount(t, a, "acme", 100)
	k1, secret1 := mustKey(t, a, "acme")
	eventually(t, "b accepts k1", func() bool { return b.accepts(secret1, time.Now()) })

	// b stops following; meanwhile changes come and the stream is trimmed
	// past them.
	b.stopRun()
	if _, err := a.store.Revoke(k1.ID, time.Now()); err != nil {
		t.Fatal(err)
	}
	_, secret2 := mustKey(t, a, "acme")
	if err := rc.XTrimMaxLen(context.Background(), "keygate:changes", 0).Err(); err != nil {
		t.Fatal(err)
	}
	_, secret3 := mustKey(t, a, "acme")
	b.startRun()
	eventually(t, "b catches up", func() bool {
		return !b.accepts(secret1, time.Now()) && b.accepts(secret2, time.Now()) && b.accepts(secret3, time.Now())
	})
	if got := b.syncs("gap"); got < 1 {
		t.Errorf("b did %v gap syncs, want at least 1", got)
	}
}

func TestLostChangeRepaired(t *testing.T) {
	srv := rconntest.Start(t)
	rc := rawClient(t, srv)
	a := startReplica(t, srv, "a", "")
	b := startReplica(t, srv, "b", "")
	mustAccount(t, a, "acme", 100)
	k, secret := mustKey(t, a, "acme")
	eventually(t, "b accepts the key", func() bool { return b.accepts(secret, time.Now()) })

	// A revocation whose stream entry is lost: the record and the version
	// change, the stream does not.
	ctx := context.Background()
	raw, err := rc.HGet(ctx, "keygate:key:"+k.ID, "rec").Bytes()
	if err != nil {
		t.Fatal(err)
	}
	rec := keystore.KeyRecord{ID: k.ID}
	if err := rec.UnmarshalBinary(raw); err != nil {
		t.Fatal(err)
	}
	rec.RevokedAt = time.Now()
	revoked, err := rec.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := rc.TxPipelined(ctx, func(p redis.Pipeliner) error {
		p.HSet(ctx, "keygate:key:"+k.ID, "rec", revoked)
		p.Incr(ctx, "keygate:version")
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "b repairs the lost revocation", func() bool { return !b.accepts(secret, time.Now()) })
	if got := b.syncs("version"); got < 1 {
		t.Errorf("b did %v version syncs, want at least 1", got)
	}
}

func TestDataLost(t *testing.T) {
	srv := rconntest.Start(t)
	rc := rawClient(t, srv)
	a := startReplica(t, srv, "a", "")
	b := startReplica(t, srv, "b", "")
	mustAccount(t, a, "acme", 100)
	_, secret := mustKey(t, a, "acme")
	eventually(t, "b accepts the key", func() bool { return b.accepts(secret, time.Now()) })
	key, _ := a.store.Lookup(secret, time.Now())
	if err := a.store.Debit(key, 1); err != nil || a.ledger.count() != 1 {
		t.Fatalf("Debit = %v with %d spends; want it to reach the ledger", err, a.ledger.count())
	}
	epoch, err := a.local.Meta("redis_epoch")
	if err != nil || epoch == "" {
		t.Fatalf("a remembers epoch %q, %v", epoch, err)
	}

	if err := rc.FlushAll(context.Background()).Err(); err != nil {
		t.Fatal(err)
	}
	// A running replica finds out at its next check; a restarted one at once.
	eventually(t, "a detects the loss", a.store.DataLost)
	// b checks at Open, or (should Redis be slow to answer then) as soon
	// as Run reaches it.
	b = b.restart(srv)
	eventually(t, "b, reopened on a flushed Redis, reports data lost", b.store.DataLost)
	for name, r := range map[string]*replica{"a": a, "b": b} {
		if err := r.store.Debit(key, 1); !errors.Is(err, redisstore.ErrDataLost) {
			t.Errorf("%s: Debit after the loss = %v, want ErrDataLost", name, err)
		}
		if got := metricValue(t, r.reg, "keygate_redis_data_lost", ""); got != 1 {
			t.Errorf("%s: keygate_redis_data_lost = %v, want 1", name, got)
		}
		if !r.accepts(secret, time.Now()) {
			t.Errorf("%s: keys stop authenticating after the loss", name)
		}
	}
	if err := a.store.Debit(key, 0); err != nil {
		t.Errorf("Debit of 0 after the loss = %v, want nil: nothing is spent", err)
	}
	if _, err := a.store.Credit("acme", 5); !errors.Is(err, redisstore.ErrDataLost) {
		t.Errorf("Credit after the loss = %v, want ErrDataLost", err)
	}
	if _, err := a.store.CreateAccount("fresh", "", 5, time.Now()); !errors.Is(err, redisstore.ErrDataLost) {
		t.Errorf("CreateAccount after the loss = %v, want ErrDataLost", err)
	}
	if a.ledger.count() != 1 {
		t.Errorf("the ledger was asked to spend after the loss")
	}

	// A new replica starts a new epoch; it does not make the others trust
	// the empty Redis.
	c := startReplica(t, srv, "c", "")
	if c.store.DataLost() {
		t.Error("a new replica reports data lost")
	}
	time.Sleep(2500 * time.Millisecond) // a's next check
	if !a.store.DataLost() {
		t.Error("a new epoch made a trust the empty Redis")
	}

	// The operator puts the old marker back (after restoring the data).
	if err := rc.Set(context.Background(), "keygate:marker", epoch, 0).Err(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "a resumes", func() bool { return !a.store.DataLost() })
	if err := a.store.Debit(key, 1); err != nil {
		t.Errorf("Debit after recovery = %v", err)
	}
	if _, err := a.store.CreateAccount("fresh", "", 5, time.Now()); err != nil {
		t.Errorf("CreateAccount after recovery = %v", err)
	}
	if got := metricValue(t, a.reg, "keygate_redis_data_lost", ""); got != 0 {
		t.Errorf("keygate_redis_data_lost = %v after recovery, want 0", got)
	}
}

func TestConcurrentAdmin(t *testing.T) {
	srv := rconntest.Start(t)
	a := startReplica(t, srv, "a", "")
	b := startReplica(t, srv, "b", "")
	mustAccount(t, a, "acme", 100)
	type made struct {
		id, secret string
		revoked    bool
	}
	results := make(chan made, 40)
	errs := make(chan error, 40)
	for _, r := range []*replica{a, b, a, b} {
		go func() {
			for i := range 10 {
				k, secret, err := r.store.CreateKey(keystore.NewKey{Account: "acme", Scopes: []string{"a"}}, time.Now())
				if err != nil {
					errs <- err
					continue
				}
				revoked := i%3 == 0
				if revoked {
					if _, err := r.store.Revoke(k.ID, time.Now()); err != nil {
						errs <- err
						continue
					}
				}
				results <- made{k.ID, secret, revoked}
			}
		}()
	}
	var all []made
	for range 40 {
		select {
		case m := <-results:
			all = append(all, m)
		case err := <-errs:
			t.Fatal(err)
		}
	}
	for _, r := range []*replica{a, b} {
		eventually(t, r.name+" mirrors every key", func() bool {
			for _, m := range all {
				if r.accepts(m.secret, time.Now()) == m.revoked {
					return false
				}
			}
			return true
		})
	}
	keys, err := a.store.ListKeys("acme")
	if err != nil || len(keys) != 40 {
		t.Errorf("ListKeys = %d keys, %v; want 40", len(keys), err)
	}
}
