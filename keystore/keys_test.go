package keystore_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/keygate/keygate/authz/ratelimit"
	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/keystoretest"
	"github.com/keygate/keygate/keystore/money"
)

func TestCreateKey(t *testing.T) {
	s := keystoretest.Open(t)
	mustAccount(t, s, "acme", 0)
	nk := keystore.NewKey{
		Account:   "acme",
		Name:      "production",
		Scopes:    []string{"chat:write", "embeddings:write"},
		RateLimit: ratelimit.Rate{N: 500, Per: time.Minute},
		SpendCap:  25 * money.PerUSD,
		ExpiresAt: t0.Add(90 * 24 * time.Hour),
	}
	info, secret, err := s.CreateKey(nk, t0)
	if err != nil {
		t.Fatal(err)
	}
	if !keystore.ValidSecretFormat(secret) || !strings.HasPrefix(secret, "kg_") {
		t.Errorf("secret %q has not the keygate format", secret)
	}
	if !strings.HasPrefix(info.ID, "key_") || len(info.ID) != 20 {
		t.Errorf("key ID %q: want key_ and 16 characters", info.ID)
	}
	want := keystore.KeyInfo{
		ID: info.ID, Account: "acme", Name: "production", Scopes: nk.Scopes, RateLimit: nk.RateLimit,
		SpendCap: nk.SpendCap, CreatedAt: t0, ExpiresAt: nk.ExpiresAt,
	}
	if diff := cmp.Diff(want, info); diff != "" {
		t.Errorf("CreateKey (-want +got):\n%s", diff)
	}
	if got, err := s.Key(info.ID); err != nil || !cmp.Equal(want, got) {
		t.Errorf("Key = %+v, %v; want %+v", got, err, want)
	}
	if got := info.State(t0); got != keystore.StateActive {
		t.Errorf("State = %s, want active", got)
	}
	k, ok := s.Lookup(secret, t0)
	if !ok {
		t.Fatal("Lookup of a new key failed")
	}
	if k.ID != info.ID || k.Account() != "acme" || k.Tier() != "free" || k.RateLimit != nk.RateLimit || k.SpendCap != nk.SpendCap {
		t.Errorf("Lookup = %+v", k)
	}
	if !k.HasScope("chat:write") || !k.HasScope("embeddings:write") || k.HasScope("images:write") || k.HasScope("") {
		t.Errorf("HasScope wrong for scopes %v", k.Scopes)
	}
	// KeyInfo is the caller's copy: changing it changes nothing in the store.
	info.Scopes[0] = "admin:everything"
	if again, _ := s.Key(info.ID); again.Scopes[0] != "chat:write" {
		t.Errorf("a caller's edit reached the store: %v", again.Scopes)
	}
	if k.Scopes[0] != "chat:write" {
		t.Errorf("a caller's edit reached the hot path: %v", k.Scopes)
	}
}

func TestCreateKeyInvalid(t *testing.T) {
	ok := keystore.NewKey{Account: "acme", Scopes: []string{"chat:write"}}
	with := func(f func(*keystore.NewKey)) keystore.NewKey {
		nk := ok
		f(&nk)
		return nk
	}
	tests := []struct {
		name string
		nk   keystore.NewKey
		want error
		msg  string
	}{
		{"unknown account", with(func(nk *keystore.NewKey) { nk.Account = "nobody" }), keystore.ErrAccountNotFound, "nobody"},
		{"bad account id", with(func(nk *keystore.NewKey) { nk.Account = "no body" }), keystore.ErrInvalid, "account id"},
		{"no scopes", with(func(nk *keystore.NewKey) { nk.Scopes = nil }), keystore.ErrInvalid, "at least one scope"},
		{"empty scope", with(func(nk *keystore.NewKey) { nk.Scopes = []string{"chat:write", ""} }), keystore.ErrInvalid, "scope 2 is empty"},
		{"duplicate scope", with(func(nk *keystore.NewKey) { nk.Scopes = []string{"a", "b", "a"} }), keystore.ErrInvalid, `"a" is listed twice`},
		{"long name", with(func(nk *keystore.NewKey) { nk.Name = strings.Repeat("é", 201) }), keystore.ErrInvalid, "201 characters"},
		{"invalid utf-8 name", with(func(nk *keystore.NewKey) { nk.Name = "\xff" }), keystore.ErrInvalid, "UTF-8"},
		{"newline in name", with(func(nk *keystore.NewKey) { nk.Name = "prod\nkey" }), keystore.ErrInvalid, `'\n' at byte 4`},
		{"tab in name", with(func(nk *keystore.NewKey) { nk.Name = "é\tx" }), keystore.ErrInvalid, `'\t' at byte 2`},
		{"NUL in name", with(func(nk *keystore.NewKey) { nk.Name = "\x00" }), keystore.ErrInvalid, `'\x00' at byte 0`},
		{"C1 control in name", with(func(nk *keystore.NewKey) { nk.Name = "a\u0085" }), keystore.ErrInvalid, `'\u0085' at byte 1`},
		{"line separator in name", with(func(nk *keystore.NewKey) { nk.Name = "a\u2028b" }), keystore.ErrInvalid, `'\u2028' at byte 1`},
		{"newline in scope", with(func(nk *keystore.NewKey) { nk.Scopes = []string{"chat:\nwrite"} }), keystore.ErrInvalid, `'\n'`},
		{"negative cap", with(func(nk *keystore.NewKey) { nk.SpendCap = -1 }), keystore.ErrInvalid, "spend cap"},
		{"negative rate", with(func(nk *keystore.NewKey) { nk.RateLimit = ratelimit.Rate{N: -1, Per: time.Second} }), keystore.ErrInvalid, "rate limit"},
		{"rate without period", with(func(nk *keystore.NewKey) { nk.RateLimit = ratelimit.Rate{N: 5} }), keystore.ErrInvalid, "rate limit"},
		{"expired at creation", with(func(nk *keystore.NewKey) { nk.ExpiresAt = t0 }), keystore.ErrInvalid, "not after now"},
	}
	s := keystoretest.Open(t)
	mustAccount(t, s, "acme", 0)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, secret, err := s.CreateKey(tt.nk, t0)
			if !errors.Is(err, tt.want) || !strings.Contains(err.Error(), tt.msg) || secret != "" {
				t.Errorf("got %q, %v; want %v mentioning %q", secret, err, tt.want, tt.msg)
			}
		})
	}
	if keys := s.Keys(""); len(keys) != 0 {
		t.Errorf("invalid creations left keys: %v", keys)
	}
	for _, name := range []string{strings.Repeat("é", 200), "prod 🔑 – ünïcode", "team\u200dname"} {
		if _, _, err := s.CreateKey(with(func(nk *keystore.NewKey) { nk.Name = name }), t0); err != nil {
			t.Errorf("name %q: %v", name, err)
		}
	}
}

func TestLookupRefuses(t *testing.T) {
	s := keystoretest.Open(t)
	mustAccount(t, s, "acme", 0)
	_, live := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}})
	_, expiring := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}, ExpiresAt: t0.Add(time.Hour)})
	revokedInfo, revoked := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}})
	if _, err := s.Revoke(revokedInfo.ID, t0); err != nil {
		t.Fatal(err)
	}
	flipped := []byte(live)
	flipped[10] = map[bool]byte{true: 'b', false: 'a'}[flipped[10] == 'a'] // another base62 character
	tests := []struct {
		name   string
		secret string
		now    time.Time
		want   bool
	}{
		{"live", live, t0, true},
		{"live, years later", live, t0.AddDate(10, 0, 0), true},
		{"expiring, before expiry", expiring, t0.Add(time.Hour - 1), true},
		{"expiring, at expiry", expiring, t0.Add(time.Hour), false},
		{"revoked", revoked, t0, false},
		{"revoked, earlier clock", revoked, t0.Add(-time.Second), true}, // revocation is a point in time
		{"one character changed", string(flipped), t0, false},
		{"unknown but well-formed", wellFormedUnknown(t, s), t0, false},
		{"empty", "", t0, false},
		{"prefix only", "kg_", t0, false},
		{"with Bearer", "Bearer " + live, t0, false},
		{"trailing newline", live + "\n", t0, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k, ok := s.Lookup(tt.secret, tt.now)
			if ok != tt.want || (k != nil) != tt.want {
				t.Errorf("Lookup = %v, %v; want %v", k, ok, tt.want)
			}
		})
	}
}

// wellFormedUnknown returns a secret of valid format that the store does not
// have: a key created in another store.
func wellFormedUnknown(t *testing.T, s *keystore.Store) string {
	other := keystoretest.Open(t)
	mustAccount(t, other, "acme", 0)
	_, secret := mustKey(t, other, keystore.NewKey{Account: "acme", Scopes: []string{"a"}})
	if !keystore.ValidSecretFormat(secret) {
		t.Fatal("bad format")
	}
	return secret
}

func TestRevoke(t *testing.T) {
	s := keystoretest.Open(t)
	mustAccount(t, s, "acme", 0)
	info, secret := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}})
	k := mustLookup(t, s, secret)
	at := t0.Add(time.Minute)
	got, err := s.Revoke(info.ID, at)
	if err != nil {
		t.Fatal(err)
	}
	if !got.RevokedAt.Equal(at) || got.State(at) != keystore.StateRevoked {
		t.Errorf("Revoke = %+v", got)
	}
	if _, ok := s.Lookup(secret, at); ok {
		t.Error("Lookup accepts a revoked key")
	}
	if !k.ActiveAt(at) {
		// A Key fetched before the revocation is a snapshot: the next Lookup is
		// what refuses the key.
		t.Error("an earlier Key snapshot changed")
	}
	again, err := s.Revoke(info.ID, at.Add(time.Hour))
	if err != nil || !again.RevokedAt.Equal(at) {
		t.Errorf("second Revoke = %+v, %v; want unchanged RevokedAt %v", again, err, at)
	}
	if _, err := s.Revoke("key_nonexistent0000", at); !errors.Is(err, keystore.ErrKeyNotFound) {
		t.Errorf("Revoke(unknown) = %v, want ErrKeyNotFound", err)
	}
	if _, err := s.Key("key_nonexistent0000"); !errors.Is(err, keystore.ErrKeyNotFound) {
		t.Errorf("Key(unknown) = %v, want ErrKeyNotFound", err)
	}
}

func TestRotate(t *testing.T) {
	s := keystoretest.Open(t)
	mustAccount(t, s, "acme", 100)
	nk := keystore.NewKey{
		Account: "acme", Name: "ci", Scopes: []string{"chat:write", "chat:read"},
		RateLimit: ratelimit.Rate{N: 10, Per: time.Second}, SpendCap: 50,
		ExpiresAt: t0.Add(90 * 24 * time.Hour),
	}
	oldInfo, oldSecret := mustKey(t, s, nk)
	if err := s.Debit(mustLookup(t, s, oldSecret), 7); err != nil {
		t.Fatal(err)
	}
	now := t0.Add(30 * 24 * time.Hour)
	grace := time.Hour
	old, nw, secret, err := s.Rotate(oldInfo.ID, grace, now)
	if err != nil {
		t.Fatal(err)
	}
	wantNew := keystore.KeyInfo{
		ID: nw.ID, Account: "acme", Name: "ci", Scopes: nk.Scopes, RateLimit: nk.RateLimit, SpendCap: 50,
		CreatedAt: now, ExpiresAt: now.Add(90 * 24 * time.Hour), // the same lifetime, from now
	}
	if diff := cmp.Diff(wantNew, nw); diff != "" {
		t.Errorf("new key (-want +got):\n%s", diff)
	}
	wantOld := oldInfo
	wantOld.Spent, wantOld.RevokedAt, wantOld.RotatedTo = 7, now.Add(grace), nw.ID
	if diff := cmp.Diff(wantOld, old); diff != "" {
		t.Errorf("old key (-want +got):\n%s", diff)
	}
	if nw.ID == old.ID || secret == oldSecret {
		t.Fatal("rotation reused the ID or the secret")
	}
	if _, ok := s.Lookup(oldSecret, now.Add(grace-1)); !ok {
		t.Error("old key refused during the grace period")
	}
	if _, ok := s.Lookup(oldSecret, now.Add(grace)); ok {
		t.Error("old key accepted after the grace period")
	}
	if _, ok := s.Lookup(secret, now.Add(grace)); !ok {
		t.Error("new key refused")
	}
	if _, _, _, err := s.Rotate(old.ID, 0, now); !errors.Is(err, keystore.ErrKeyInactive) {
		t.Errorf("rotating a rotated key in its grace: %v, want ErrKeyInactive", err)
	}
	// Revoke ends the grace at once.
	cut := now.Add(time.Minute)
	if r, err := s.Revoke(old.ID, cut); err != nil || !r.RevokedAt.Equal(cut) {
		t.Errorf("Revoke during grace = %+v, %v", r, err)
	}
	if _, ok := s.Lookup(oldSecret, cut); ok {
		t.Error("old key accepted after Revoke cut its grace short")
	}
}

func TestRotateNoGrace(t *testing.T) {
	s := keystoretest.Open(t)
	mustAccount(t, s, "acme", 0)
	info, oldSecret := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}})
	old, nw, secret, err := s.Rotate(info.ID, 0, t0)
	if err != nil {
		t.Fatal(err)
	}
	if !old.RevokedAt.Equal(t0) || old.State(t0) != keystore.StateRevoked || !nw.ExpiresAt.IsZero() {
		t.Errorf("old %+v, new %+v", old, nw)
	}
	if _, ok := s.Lookup(oldSecret, t0); ok {
		t.Error("old key accepted after a rotation without grace")
	}
	if _, ok := s.Lookup(secret, t0); !ok {
		t.Error("new key refused")
	}
}

func TestRotateInactive(t *testing.T) {
	s := keystoretest.Open(t)
	mustAccount(t, s, "acme", 0)
	revoked, _ := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}})
	if _, err := s.Revoke(revoked.ID, t0); err != nil {
		t.Fatal(err)
	}
	expiring, _ := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}, ExpiresAt: t0.Add(time.Hour)})
	live, _ := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}})
	tests := []struct {
		name  string
		id    string
		grace time.Duration
		now   time.Time
		want  error
	}{
		{"revoked", revoked.ID, 0, t0, keystore.ErrKeyInactive},
		{"expired", expiring.ID, 0, t0.Add(time.Hour), keystore.ErrKeyInactive},
		{"unknown", "key_0000000000000000", 0, t0, keystore.ErrKeyNotFound},
		{"negative grace", live.ID, -time.Second, t0, keystore.ErrInvalid},
		{"endless grace", live.ID, time.Duration(1<<63 - 1), t0, keystore.ErrInvalid},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, _, secret, err := s.Rotate(tt.id, tt.grace, tt.now); !errors.Is(err, tt.want) || secret != "" {
				t.Errorf("Rotate = %q, %v; want %v", secret, err, tt.want)
			}
		})
	}
	if n := len(s.Keys("acme")); n != 3 {
		t.Errorf("failed rotations created keys: %d keys, want 3", n)
	}
}

func TestKeysListing(t *testing.T) {
	s := keystoretest.Open(t)
	mustAccount(t, s, "a", 0)
	mustAccount(t, s, "b", 0)
	var want []string
	for i, acct := range []string{"a", "b", "a", "a"} {
		k, _, err := s.CreateKey(keystore.NewKey{Account: acct, Scopes: []string{"x"}}, t0.Add(time.Duration(3-i)*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		want = append(want, k.ID)
	}
	ids := func(ks []keystore.KeyInfo) []string {
		out := []string{}
		for _, k := range ks {
			out = append(out, k.ID)
		}
		return out
	}
	// Created at t0+3s, +2s, +1s, +0s: newest last means reverse order.
	if diff := cmp.Diff([]string{want[3], want[2], want[1], want[0]}, ids(s.Keys(""))); diff != "" {
		t.Errorf("Keys(\"\") (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]string{want[3], want[2], want[0]}, ids(s.Keys("a"))); diff != "" {
		t.Errorf("Keys(a) (-want +got):\n%s", diff)
	}
	if got := s.Keys("nobody"); len(got) != 0 {
		t.Errorf("Keys(nobody) = %v", got)
	}
}

// TestKeysSameTime checks the tie-break: keys created at one instant come in
// ID order.
func TestKeysSameTime(t *testing.T) {
	s := keystoretest.Open(t)
	mustAccount(t, s, "a", 0)
	for range 20 {
		mustKey(t, s, keystore.NewKey{Account: "a", Scopes: []string{"x"}})
	}
	keys := s.Keys("a")
	for i := 1; i < len(keys); i++ {
		if keys[i-1].ID >= keys[i].ID {
			t.Fatalf("keys %d and %d out of ID order: %s, %s", i-1, i, keys[i-1].ID, keys[i].ID)
		}
	}
}

// TestExpiredAndRevokedStay: the store keeps both for operators to list, and
// says which is which.
func TestExpiredAndRevokedStay(t *testing.T) {
	s := keystoretest.Open(t)
	mustAccount(t, s, "acme", 0)
	expiring, _ := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}, ExpiresAt: t0.Add(time.Hour)})
	revoked, _ := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}})
	if _, err := s.Revoke(revoked.ID, t0); err != nil {
		t.Fatal(err)
	}
	later := t0.Add(2 * time.Hour)
	states := map[string]string{}
	for _, k := range s.Keys("acme") {
		states[k.ID] = k.State(later)
	}
	want := map[string]string{expiring.ID: keystore.StateExpired, revoked.ID: keystore.StateRevoked}
	if diff := cmp.Diff(want, states); diff != "" {
		t.Errorf("states (-want +got):\n%s", diff)
	}
}

// A key's rate-limit bucket outlives the Key values that an admin write
// republishes: a key spent to its limit stays spent when it is rotated
// (the old key, in its grace period, is a new Key value) or when keys are
// added beside it, while the key it rotated to starts full.
func TestRateBucketFollowsTheKey(t *testing.T) {
	s := keystoretest.Open(t)
	mustAccount(t, s, "acme", 0)
	r := ratelimit.Rate{N: 2, Per: time.Hour}
	info, secret, err := s.CreateKey(keystore.NewKey{Account: "acme", Scopes: []string{"chat:write"}, RateLimit: r}, t0)
	if err != nil {
		t.Fatal(err)
	}
	lookup := func(secret string) *keystore.Key {
		t.Helper()
		k, ok := s.Lookup(secret, t0)
		if !ok {
			t.Fatal("Lookup failed")
		}
		return k
	}
	before := lookup(secret)
	for range 2 {
		if d := before.RateBucket().Take(r, t0); !d.OK {
			t.Fatalf("denied within the limit: %+v", d)
		}
	}
	for range 300 { // enough to copy every shard, the key's among them
		if _, _, err := s.CreateKey(keystore.NewKey{Account: "acme", Scopes: []string{"chat:write"}}, t0); err != nil {
			t.Fatal(err)
		}
	}
	_, rotated, newSecret, err := s.Rotate(info.ID, time.Hour, t0)
	if err != nil {
		t.Fatal(err)
	}
	after := lookup(secret)
	if after == before {
		t.Fatal("the test needs the key republished: Lookup returned the same Key")
	}
	if d := after.RateBucket().Take(r, t0); d.OK {
		t.Errorf("the key's bucket was full again after admin writes: %+v", d)
	}
	if d := lookup(newSecret).RateBucket().Take(r, t0); !d.OK {
		t.Errorf("the rotated-to key %s starts with an empty bucket: %+v", rotated.ID, d)
	}
}
