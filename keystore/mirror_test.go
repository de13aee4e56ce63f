package keystore_test

import (
	"bytes"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/keygate/keygate/authz/ratelimit"
	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/keystoretest"
	"github.com/keygate/keygate/keystore/money"
)

// mirrorKey makes a record as another replica's CreateKey would, with its
// secret.
func mirrorKey(t testing.TB, nk keystore.NewKey, now time.Time) (keystore.KeyRecord, string) {
	t.Helper()
	r, secret, err := keystore.NewKeyRecord(nk, now)
	if err != nil {
		t.Fatal(err)
	}
	return r, secret
}

func mirrorAccount(t testing.TB, id string, opts ...keystore.AccountOption) keystore.AccountRecord {
	t.Helper()
	r, err := keystore.NewAccountRecord(id, "free", 0, t0, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestMirrorCreate(t *testing.T) {
	s := keystoretest.Open(t)
	acct := mirrorAccount(t, "acme", keystore.WithAlertBelow(5*money.PerUSD))
	nk := keystore.NewKey{
		Account: "acme", Name: "production", Scopes: []string{"chat:write", "embeddings:write"},
		RateLimit: ratelimit.Rate{N: 500, Per: time.Minute}, SpendCap: 25 * money.PerUSD,
		CapPeriod: keystore.PeriodMonth, ExpiresAt: t0.Add(90 * 24 * time.Hour),
	}
	rec, secret := mirrorKey(t, nk, t0)
	if err := s.Mirror([]keystore.AccountRecord{acct}, []keystore.KeyRecord{rec}); err != nil {
		t.Fatal(err)
	}
	a, err := s.Account("acme")
	if err != nil {
		t.Fatal(err)
	}
	wantAcct := keystore.Account{ID: "acme", Tier: "free", AlertBelow: 5 * money.PerUSD, CreatedAt: t0}
	if diff := cmp.Diff(wantAcct, a); diff != "" {
		t.Errorf("account (-want +got):\n%s", diff)
	}
	info, err := s.Key(rec.ID)
	if err != nil {
		t.Fatal(err)
	}
	want := keystore.KeyInfo{
		ID: rec.ID, Account: "acme", Name: "production", Scopes: nk.Scopes, RateLimit: nk.RateLimit,
		SpendCap: nk.SpendCap, CapPeriod: keystore.PeriodMonth, PeriodResetsAt: info.PeriodResetsAt,
		CreatedAt: t0, ExpiresAt: nk.ExpiresAt,
	}
	if diff := cmp.Diff(want, info); diff != "" {
		t.Errorf("key (-want +got):\n%s", diff)
	}
	k, ok := s.Lookup(secret, t0)
	if !ok {
		t.Fatal("Lookup of a mirrored key failed")
	}
	if k.ID != rec.ID || k.Tier() != "free" || k.SpendCap != nk.SpendCap || k.CapPeriod() != keystore.PeriodMonth {
		t.Errorf("Lookup = %+v", k)
	}
	if got := s.Keys("acme"); len(got) != 1 || got[0].ID != rec.ID {
		t.Errorf("Keys(acme) = %+v", got)
	}
}

func TestMirrorRevokeAndRotate(t *testing.T) {
	s := keystoretest.Open(t)
	acct := mirrorAccount(t, "acme")
	r1, secret1 := mirrorKey(t, keystore.NewKey{Account: "acme", Scopes: []string{"a"}}, t0)
	r2, secret2 := mirrorKey(t, keystore.NewKey{Account: "acme", Name: "ci", Scopes: []string{"a", "b"}}, t0)
	if err := s.Mirror([]keystore.AccountRecord{acct}, []keystore.KeyRecord{r1, r2}); err != nil {
		t.Fatal(err)
	}
	held := mustLookup(t, s, secret1)

	// Revoke r1; rotate r2 with an hour of grace.
	now := t0.Add(time.Minute)
	r1.RevokedAt = now
	r3, secret3 := mirrorKey(t, keystore.NewKey{Account: "acme", Name: "ci", Scopes: []string{"a", "b"}}, now)
	r2.RevokedAt, r2.RotatedTo = now.Add(time.Hour), r3.ID
	if err := s.Mirror(nil, []keystore.KeyRecord{r1, r2, r3}); err != nil {
		t.Fatal(err)
	}
	if _, ok := s.Lookup(secret1, now); ok {
		t.Error("a revoked key is accepted")
	}
	if !held.ActiveAt(now) {
		t.Error("a Key fetched before the revocation changed")
	}
	if _, ok := s.Lookup(secret2, now.Add(time.Hour-1)); !ok {
		t.Error("a rotated key is refused during its grace")
	}
	if _, ok := s.Lookup(secret2, now.Add(time.Hour)); ok {
		t.Error("a rotated key is accepted after its grace")
	}
	if _, ok := s.Lookup(secret3, now); !ok {
		t.Error("the rotation's new key is refused")
	}
	old, err := s.Key(r2.ID)
	if err != nil || old.RotatedTo != r3.ID || !old.RevokedAt.Equal(now.Add(time.Hour)) || old.Name != "ci" {
		t.Errorf("Key(old) = %+v, %v", old, err)
	}
	if got := s.Keys(""); len(got) != 3 {
		t.Errorf("Keys = %d keys, want 3", len(got))
	}
	// Cutting the grace short, as Revoke does, takes effect at once.
	r2.RevokedAt = now.Add(time.Second)
	if err := s.Mirror(nil, []keystore.KeyRecord{r2}); err != nil {
		t.Fatal(err)
	}
	if _, ok := s.Lookup(secret2, now.Add(time.Second)); ok {
		t.Error("a key whose grace was cut short is accepted")
	}
}

func TestMirrorUpdatesMutableFields(t *testing.T) {
	s := keystoretest.Open(t)
	r, secret := mirrorKey(t, keystore.NewKey{Account: "acme", Scopes: []string{"a"}}, t0)
	if err := s.Mirror([]keystore.AccountRecord{mirrorAccount(t, "acme")}, []keystore.KeyRecord{r}); err != nil {
		t.Fatal(err)
	}
	r.Name, r.Scopes, r.RateLimit, r.SpendCap = "renamed", []string{"a", "b"}, ratelimit.Rate{N: 3, Per: time.Second}, 9
	r.ExpiresAt = t0.Add(time.Hour)
	acct := mirrorAccount(t, "acme", keystore.WithAlertBelow(7))
	if err := s.Mirror([]keystore.AccountRecord{acct}, []keystore.KeyRecord{r}); err != nil {
		t.Fatal(err)
	}
	k := mustLookup(t, s, secret)
	if !k.HasScope("b") || k.RateLimit != r.RateLimit || k.SpendCap != 9 || k.ActiveAt(t0.Add(time.Hour)) {
		t.Errorf("Lookup after an update = %+v", k)
	}
	info, err := s.Key(r.ID)
	if err != nil || info.Name != "renamed" || !info.ExpiresAt.Equal(r.ExpiresAt) {
		t.Errorf("Key after an update = %+v, %v", info, err)
	}
	if a, err := s.Account("acme"); err != nil || a.AlertBelow != 7 {
		t.Errorf("Account after an update = %+v, %v", a, err)
	}
}

func TestMirrorIdempotent(t *testing.T) {
	s := keystoretest.Open(t)
	acct := mirrorAccount(t, "acme")
	var recs []keystore.KeyRecord
	for range 3 {
		r, _ := mirrorKey(t, keystore.NewKey{Account: "acme", Scopes: []string{"a"}}, t0)
		recs = append(recs, r)
	}
	recs[0].RevokedAt = t0.Add(time.Minute)
	for range 3 {
		if err := s.Mirror([]keystore.AccountRecord{acct}, recs); err != nil {
			t.Fatal(err)
		}
	}
	before := s.Keys("")
	// The same records again, and an ID listed twice (the last one wins).
	twice := append(recs, recs[1])
	twice[len(twice)-1].Name = "last"
	if err := s.Mirror([]keystore.AccountRecord{acct, acct}, twice); err != nil {
		t.Fatal(err)
	}
	after := s.Keys("")
	if len(after) != 3 || len(s.Accounts()) != 1 {
		t.Fatalf("after mirroring again: %d keys, %d accounts; want 3 and 1", len(after), len(s.Accounts()))
	}
	for i := range before {
		if before[i].ID == recs[1].ID {
			before[i].Name = "last"
		}
	}
	if diff := cmp.Diff(before, after); diff != "" {
		t.Errorf("keys changed (-before +after):\n%s", diff)
	}
}

func TestMirrorSurvivesReopen(t *testing.T) {
	path := tempPath(t)
	s := mustOpen(t, path)
	acct := mirrorAccount(t, "acme")
	live, liveSecret := mirrorKey(t, keystore.NewKey{Account: "acme", Scopes: []string{"a"}}, t0)
	gone, goneSecret := mirrorKey(t, keystore.NewKey{Account: "acme", Scopes: []string{"a"}}, t0)
	if err := s.Mirror([]keystore.AccountRecord{acct}, []keystore.KeyRecord{live, gone}); err != nil {
		t.Fatal(err)
	}
	gone.RevokedAt = t0
	if err := s.Mirror(nil, []keystore.KeyRecord{gone}); err != nil {
		t.Fatal(err)
	}
	if err := s.SetMeta("redis_epoch", "e1"); err != nil {
		t.Fatal(err)
	}
	want := s.Keys("")
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	r := mustOpen(t, path)
	defer r.Close()
	if diff := cmp.Diff(want, r.Keys("")); diff != "" {
		t.Errorf("keys after a reopen (-want +got):\n%s", diff)
	}
	if _, ok := r.Lookup(liveSecret, t0); !ok {
		t.Error("a mirrored key is refused after a reopen")
	}
	if _, ok := r.Lookup(goneSecret, t0); ok {
		t.Error("a mirrored revocation is lost after a reopen")
	}
	if a, err := r.Account("acme"); err != nil || a.Balance != 0 {
		t.Errorf("Account = %+v, %v; want a balance of 0", a, err)
	}
	if v, err := r.Meta("redis_epoch"); err != nil || v != "e1" {
		t.Errorf("Meta = %q, %v; want e1", v, err)
	}
	// Mirroring into the reopened store adds to what it loaded.
	more, moreSecret := mirrorKey(t, keystore.NewKey{Account: "acme", Scopes: []string{"a"}}, t0)
	if err := r.Mirror(nil, []keystore.KeyRecord{more, live}); err != nil {
		t.Fatal(err)
	}
	if _, ok := r.Lookup(moreSecret, t0); !ok {
		t.Error("a key mirrored after a reopen is refused")
	}
}

func TestMirrorRefuses(t *testing.T) {
	s := keystoretest.Open(t)
	acct := mirrorAccount(t, "acme")
	good, goodSecret := mirrorKey(t, keystore.NewKey{Account: "acme", Scopes: []string{"a"}}, t0)
	orphan, _ := mirrorKey(t, keystore.NewKey{Account: "ghost", Scopes: []string{"a"}}, t0)
	noScopes, _ := mirrorKey(t, keystore.NewKey{Account: "acme", Scopes: []string{"a"}}, t0)
	noScopes.Scopes = nil
	badAcct := keystore.AccountRecord{ID: "bad id", CreatedAt: t0}
	err := s.Mirror([]keystore.AccountRecord{acct, badAcct}, []keystore.KeyRecord{good, orphan, noScopes})
	if !errors.Is(err, keystore.ErrAccountNotFound) || !errors.Is(err, keystore.ErrInvalid) {
		t.Errorf("Mirror = %v; want ErrAccountNotFound and ErrInvalid", err)
	}
	if _, ok := s.Lookup(goodSecret, t0); !ok {
		t.Error("the valid key was not applied with the others")
	}
	if _, err := s.Key(orphan.ID); !errors.Is(err, keystore.ErrKeyNotFound) {
		t.Errorf("Key(orphan) = %v, want ErrKeyNotFound", err)
	}
	if _, err := s.Account("bad id"); !errors.Is(err, keystore.ErrAccountNotFound) {
		t.Errorf("Account(bad id) = %v, want ErrAccountNotFound", err)
	}

	// A known key's hash, account and creation time never change.
	for name, change := range map[string]func(r *keystore.KeyRecord){
		"hash":    func(r *keystore.KeyRecord) { r.Hash[0]++ },
		"account": func(r *keystore.KeyRecord) { r.Account = "other" },
		"created": func(r *keystore.KeyRecord) { r.CreatedAt = r.CreatedAt.Add(time.Second) },
		"period":  func(r *keystore.KeyRecord) { r.SpendCap, r.CapPeriod = 5, keystore.PeriodMonth },
	} {
		r := good
		r.RevokedAt = t0
		change(&r)
		if err := s.Mirror([]keystore.AccountRecord{mirrorAccount(t, "other")}, []keystore.KeyRecord{r}); !errors.Is(err, keystore.ErrInvalid) {
			t.Errorf("%s changed: Mirror = %v, want ErrInvalid", name, err)
		}
		if _, ok := s.Lookup(goodSecret, t0); !ok {
			t.Errorf("%s changed: the refused record was applied", name)
		}
	}
}

func TestMirrorClosed(t *testing.T) {
	s := mustOpen(t, tempPath(t))
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Mirror([]keystore.AccountRecord{mirrorAccount(t, "acme")}, nil); !errors.Is(err, keystore.ErrClosed) {
		t.Errorf("Mirror after Close = %v, want ErrClosed", err)
	}
	if err := s.SetMeta("a", "b"); !errors.Is(err, keystore.ErrClosed) {
		t.Errorf("SetMeta after Close = %v, want ErrClosed", err)
	}
}

func TestMirrorMany(t *testing.T) {
	s := keystoretest.Open(t)
	if _, err := s.CreateAccount("local", "free", 100, t0); err != nil {
		t.Fatal(err)
	}
	local, localSecret := mustKey(t, s, keystore.NewKey{Account: "local", Scopes: []string{"a"}})
	var accts []keystore.AccountRecord
	var recs []keystore.KeyRecord
	var secrets []string
	for i := range 50 {
		accts = append(accts, mirrorAccount(t, fmt.Sprintf("acct-%02d", i)))
		for range 40 {
			r, secret := mirrorKey(t, keystore.NewKey{Account: accts[i].ID, Scopes: []string{"a"}}, t0)
			recs = append(recs, r)
			secrets = append(secrets, secret)
		}
	}
	if err := s.Mirror(accts, recs); err != nil {
		t.Fatal(err)
	}
	for i, r := range recs {
		if k, ok := s.Lookup(secrets[i], t0); !ok || k.ID != r.ID {
			t.Fatalf("Lookup of mirrored key %d = %v, %v", i, k, ok)
		}
		if _, err := s.Key(r.ID); err != nil {
			t.Fatalf("Key(%s): %v", r.ID, err)
		}
	}
	if got := len(s.Keys("")); got != len(recs)+1 {
		t.Errorf("Keys = %d, want %d", got, len(recs)+1)
	}
	if got := len(s.Keys("acct-07")); got != 40 {
		t.Errorf("Keys(acct-07) = %d, want 40", got)
	}
	if k, ok := s.Lookup(localSecret, t0); !ok || k.ID != local.ID {
		t.Error("a key created locally was lost among mirrored ones")
	}
}

func TestMirrorNewRecords(t *testing.T) {
	if _, err := keystore.NewAccountRecord("bad id", "", 0, t0); !errors.Is(err, keystore.ErrInvalid) {
		t.Errorf("NewAccountRecord(bad id) = %v, want ErrInvalid", err)
	}
	if _, err := keystore.NewAccountRecord("acme", "", -1, t0); !errors.Is(err, keystore.ErrInvalid) {
		t.Errorf("NewAccountRecord(negative balance) = %v, want ErrInvalid", err)
	}
	if _, err := keystore.NewAccountRecord("acme", "", 0, t0, keystore.WithAlertBelow(-1)); !errors.Is(err, keystore.ErrInvalid) {
		t.Errorf("NewAccountRecord(negative alert) = %v, want ErrInvalid", err)
	}
	if _, _, err := keystore.NewKeyRecord(keystore.NewKey{Account: "acme"}, t0); !errors.Is(err, keystore.ErrInvalid) {
		t.Errorf("NewKeyRecord(no scopes) = %v, want ErrInvalid", err)
	}
	if _, _, err := keystore.NewKeyRecord(keystore.NewKey{Account: "acme", Scopes: []string{"a"}, ExpiresAt: t0}, t0); !errors.Is(err, keystore.ErrInvalid) {
		t.Errorf("NewKeyRecord(expired) = %v, want ErrInvalid", err)
	}
	r, secret, err := keystore.NewKeyRecord(keystore.NewKey{Account: "acme", Scopes: []string{"a"}, RateLimit: ratelimit.Rate{Per: time.Second}}, t0)
	if err != nil || !keystore.ValidSecretFormat(secret) || r.RateLimit != (ratelimit.Rate{}) || r.ID == "" {
		t.Errorf("NewKeyRecord = %+v, %q, %v", r, secret, err)
	}
	if below, set, err := keystore.AccountOptions(keystore.WithAlertBelow(0)); below != 0 || !set || err != nil {
		t.Errorf("AccountOptions(WithAlertBelow(0)) = %v, %v, %v; want 0, true, nil", below, set, err)
	}
	if _, set, err := keystore.AccountOptions(); set || err != nil {
		t.Errorf("AccountOptions() = %v, %v; want false, nil", set, err)
	}
}

func TestMirrorRecordsRoundTrip(t *testing.T) {
	r, _ := mirrorKey(t, keystore.NewKey{
		Account: "acme", Name: "ünïcode", Scopes: []string{"a", "b"}, RateLimit: ratelimit.Rate{N: 5, Per: time.Second},
		SpendCap: 7, CapPeriod: keystore.PeriodDay, ExpiresAt: t0.Add(time.Hour),
	}, t0)
	r.RevokedAt, r.RotatedTo = t0.Add(time.Minute), "key_next"
	b, err := r.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	got := keystore.KeyRecord{ID: r.ID}
	if err := got.UnmarshalBinary(b); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(r, got); diff != "" {
		t.Errorf("key round trip (-want +got):\n%s", diff)
	}
	a := mirrorAccount(t, "acme", keystore.WithAlertBelow(3))
	b, err = a.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	gotA := keystore.AccountRecord{ID: "acme"}
	if err := gotA.UnmarshalBinary(b); err != nil || gotA != a {
		t.Errorf("account round trip = %+v, %v; want %+v", gotA, err, a)
	}
	r.Scopes = nil
	if _, err := r.MarshalBinary(); !errors.Is(err, keystore.ErrInvalid) {
		t.Errorf("MarshalBinary without scopes = %v, want ErrInvalid", err)
	}
	if err := got.UnmarshalBinary(b[:1]); err == nil {
		t.Error("UnmarshalBinary accepts an account record as a key record")
	}
}

func FuzzMirrorKeyRecord(f *testing.F) {
	r, _, err := keystore.NewKeyRecord(keystore.NewKey{Account: "acme", Name: "n", Scopes: []string{"a", "b"},
		RateLimit: ratelimit.Rate{N: 5, Per: time.Second}, SpendCap: 7, CapPeriod: keystore.PeriodDay}, t0)
	if err != nil {
		f.Fatal(err)
	}
	r.RevokedAt, r.RotatedTo = t0, "key_x"
	b, err := r.MarshalBinary()
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	f.Add(b[:len(b)-1])
	f.Add([]byte{1})
	f.Fuzz(func(t *testing.T, b []byte) {
		var r keystore.KeyRecord
		if err := r.UnmarshalBinary(b); err != nil {
			return
		}
		again, err := r.MarshalBinary()
		if err != nil {
			return // decodable, but not a record CreateKey could make
		}
		// Encoding normalises (a rate of 0 per anything is no rate): from
		// the first encoding on, a round trip changes nothing.
		var r2 keystore.KeyRecord
		if err := r2.UnmarshalBinary(again); err != nil {
			t.Fatalf("re-encoded record does not decode: %v", err)
		}
		third, err := r2.MarshalBinary()
		if err != nil || !bytes.Equal(third, again) {
			t.Fatalf("round trip: %x, %v; want %x", third, err, again)
		}
	})
}
