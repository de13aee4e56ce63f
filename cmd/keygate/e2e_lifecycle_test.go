package main_test

import (
	"slices"
	"testing"
	"time"
)

// TestE2EKeyLifecycle covers revocation, expiry and rotation as Envoy sees
// them: through Checks on the running server right after the admin command
// returns.
func TestE2EKeyLifecycle(t *testing.T) {
	t.Parallel()
	s := startServer(t, serverOpts{})
	const chat = "/v1/chat/completions"

	t.Run("revoke is effective on the next Check", func(t *testing.T) {
		t.Parallel()
		s.createAccount(t, "revoke", "10")
		k := s.createKey(t, "revoke", "chat:write", "--rate-limit", "1000/s")
		other := s.createKey(t, "revoke", "chat:write", "--rate-limit", "1000/s")
		wantAllowed(t, s.checkKey(t, k.Secret, "POST", chat), k.ID, "revoke")
		var revoked keyJSON
		s.ok(t, &revoked, "keys", "revoke", k.ID)
		if revoked.State != "revoked" || revoked.RevokedAt == nil {
			t.Errorf("keys revoke -o json: state %q revoked_at %v, want revoked with a time", revoked.State, revoked.RevokedAt)
		}
		wantInvalidKey(t, s.checkKey(t, k.Secret, "POST", chat))
		if got := s.key(t, k.ID).State; got != "revoked" {
			t.Errorf("keys get state = %q, want revoked", got)
		}
		// The account's other key is untouched.
		wantAllowed(t, s.checkKey(t, other.Secret, "POST", chat), other.ID, "revoke")
		// A revoked key cannot be rotated back to life.
		wantFailure(t, s.cli(t, "keys", "rotate", k.ID), k.ID)
	})

	t.Run("expiry", func(t *testing.T) {
		t.Parallel()
		s.createAccount(t, "expiry", "10")
		k := s.createKey(t, "expiry", "chat:write", "--rate-limit", "1000/s", "--expires-in", "2s")
		if k.ExpiresAt == nil {
			t.Fatalf("keys create --expires-in 2s: no expires_at")
		}
		exp := *k.ExpiresAt
		if time.Now().Before(exp.Add(-500 * time.Millisecond)) {
			wantAllowed(t, s.checkKey(t, k.Secret, "POST", chat), k.ID, "expiry")
		} // else the machine is too slow to see the key alive; its expiry still counts
		var d decision
		if !eventually(time.Until(exp)+10*time.Second, func() bool {
			d = s.checkKey(t, k.Secret, "POST", chat)
			return !d.allowed
		}) {
			t.Fatalf("key still allowed 10s after its expires_at %s", exp)
		}
		if now := time.Now(); now.Before(exp) {
			t.Errorf("key refused at %s, before its expires_at %s", now, exp)
		}
		wantInvalidKey(t, d)
		if got := s.key(t, k.ID).State; got != "expired" {
			t.Errorf("keys get state = %q, want expired", got)
		}
	})

	t.Run("rotate without grace", func(t *testing.T) {
		t.Parallel()
		s.createAccount(t, "rotate", "10")
		old := s.createKey(t, "rotate", "chat:write,embeddings:write", "--name", "prod",
			"--rate-limit", "5/h", "--spend-cap", "0.0061")
		wantAllowed(t, s.checkKey(t, old.Secret, "POST", chat), old.ID, "rotate")

		var nw keyJSON
		s.ok(t, &nw, "keys", "rotate", old.ID)
		if nw.ID == "" || nw.Secret == "" || nw.ID == old.ID || nw.Secret == old.Secret {
			t.Fatalf("keys rotate -o json: id %q secret %q: want a new id and secret", nw.ID, nw.Secret)
		}
		if nw.OldKey == nil || nw.OldKey.ID != old.ID {
			t.Errorf("keys rotate -o json: old_key %+v, want %s", nw.OldKey, old.ID)
		}
		wantInvalidKey(t, s.checkKey(t, old.Secret, "POST", chat)) // at once
		if got := s.key(t, old.ID).State; got != "revoked" {
			t.Errorf("old key state = %q, want revoked", got)
		}

		got := s.key(t, nw.ID)
		if got.Account != "rotate" || !slices.Equal(got.Scopes, []string{"chat:write", "embeddings:write"}) ||
			got.RateLimit != "5/h" || got.SpendCapMicros == nil || *got.SpendCapMicros != 6100 || got.Name != "prod" ||
			got.State != "active" || got.SpentMicros != 0 {
			t.Errorf("new key %+v: want account rotate, the same scopes, name, rate limit 5/h and cap 6100, active, nothing spent", got)
		}
		// The new key works, with the same cap (its own spend starts at 0:
		// three chats of 0.002 fit in 0.0061, a fourth does not, an embedding
		// of 0.0001 still does) and the same rate limit (the 6th request).
		for range 3 {
			d := s.checkKey(t, nw.Secret, "POST", chat)
			wantAllowed(t, d, nw.ID, "rotate")
			if d.respHdrs["x-ratelimit-limit-requests"] != "5" {
				t.Errorf("new key rate limit header %q, want 5", d.respHdrs["x-ratelimit-limit-requests"])
			}
		}
		d := s.checkKey(t, nw.Secret, "POST", chat)
		wantDenied(t, d, 429, "insufficient_quota")
		wantAllowed(t, s.checkKey(t, nw.Secret, "POST", "/v1/embeddings"), nw.ID, "rotate")
		wantDenied(t, s.checkKey(t, nw.Secret, "POST", "/v1/embeddings"), 429, "rate_limit_error")
		if got := s.account(t, "rotate").BalanceMicros; got != 10_000_000-4*priceChat-priceEmbedding {
			t.Errorf("balance = %d, want %d", got, 10_000_000-4*priceChat-priceEmbedding)
		}
	})

	t.Run("rotate with grace", func(t *testing.T) {
		t.Parallel()
		s.createAccount(t, "grace", "10")
		old := s.createKey(t, "grace", "chat:write", "--rate-limit", "1000/s")
		var nw keyJSON
		s.ok(t, &nw, "keys", "rotate", old.ID, "--grace", "3s")
		if nw.OldKey == nil || nw.OldKey.RevokedAt == nil {
			t.Fatalf("keys rotate --grace 3s: old_key %+v, want its revoked_at", nw.OldKey)
		}
		end := *nw.OldKey.RevokedAt
		wantAllowed(t, s.checkKey(t, nw.Secret, "POST", chat), nw.ID, "grace")
		if time.Now().Before(end.Add(-time.Second)) {
			wantAllowed(t, s.checkKey(t, old.Secret, "POST", chat), old.ID, "grace")
			if got := s.key(t, old.ID).State; got != "active" {
				t.Errorf("old key in its grace period: state %q, want active", got)
			}
		} else {
			t.Log("the machine is too slow to see the grace period from inside")
		}
		var d decision
		if !eventually(time.Until(end)+10*time.Second, func() bool {
			d = s.checkKey(t, old.Secret, "POST", chat)
			return !d.allowed
		}) {
			t.Fatalf("old key still allowed 10s after its grace ended at %s", end)
		}
		if now := time.Now(); now.Before(end) {
			t.Errorf("old key refused at %s, before its grace ended at %s", now, end)
		}
		wantInvalidKey(t, d)
		wantAllowed(t, s.checkKey(t, nw.Secret, "POST", chat), nw.ID, "grace")
		if got := s.key(t, old.ID).State; got != "revoked" {
			t.Errorf("old key after grace: state %q, want revoked", got)
		}
	})
}
