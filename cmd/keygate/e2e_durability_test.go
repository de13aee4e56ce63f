package main_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// TestE2ERestart: keys, balances, spend and revocations survive a clean
// stop (SIGINT here, SIGTERM elsewhere), including debits made just before.
func TestE2ERestart(t *testing.T) {
	t.Parallel()
	s := startServer(t, serverOpts{})
	s.createAccount(t, "acme", "1", "--tier", "tier1")
	live := s.createKey(t, "acme", "chat:write,embeddings:write", "--name", "live", "--rate-limit", "1000/s", "--spend-cap", "0.5")
	dead := s.createKey(t, "acme", "chat:write", "--rate-limit", "1000/s")
	s.ok(t, nil, "keys", "revoke", dead.ID)
	s.ok(t, nil, "accounts", "credit", "acme", "2.5")
	const n = 7
	for range n {
		wantAllowed(t, s.checkKey(t, live.Secret, "POST", "/v1/chat/completions"), live.ID, "acme")
	}
	wantAllowed(t, s.checkKey(t, live.Secret, "POST", "/v1/embeddings"), live.ID, "acme")
	spent := int64(n*priceChat + priceEmbedding)
	s.stopWith(t, syscall.SIGINT) // at once: the last debits are not flushed yet, the stop must do it

	s2 := startServer(t, serverOpts{db: s.db})
	if got, want := s2.account(t, "acme"), (accountJSON{ID: "acme", Tier: "tier1", BalanceMicros: 3_500_000 - spent}); got != want {
		t.Errorf("account after restart = %+v, want %+v", got, want)
	}
	k := s2.key(t, live.ID)
	if k.SpentMicros != spent || k.State != "active" || k.RateLimit != "1000/s" || k.SpendCapMicros == nil ||
		*k.SpendCapMicros != 500_000 || k.Name != "live" || !slices.Equal(k.Scopes, []string{"chat:write", "embeddings:write"}) {
		t.Errorf("key after restart = %+v, want spent %d, active, 1000/s, cap 500000, name live, both scopes", k, spent)
	}
	if got := s2.key(t, dead.ID).State; got != "revoked" {
		t.Errorf("revoked key after restart: state %q", got)
	}
	var keys []keyJSON
	s2.ok(t, &keys, "keys", "list")
	if len(keys) != 2 {
		t.Errorf("keys list after restart: %d keys, want 2", len(keys))
	}
	wantAllowed(t, s2.checkKey(t, live.Secret, "POST", "/v1/chat/completions"), live.ID, "acme")
	wantInvalidKey(t, s2.checkKey(t, dead.Secret, "POST", "/v1/chat/completions"))
	if got := s2.account(t, "acme").BalanceMicros; got != 3_500_000-spent-priceChat {
		t.Errorf("balance = %d, want %d", got, 3_500_000-spent-priceChat)
	}
	s2.stop(t)
}

// TestE2ECrash: after SIGKILL, every debit flushed before the crash is there;
// at most the last batch is lost, and balance and spend stay consistent.
func TestE2ECrash(t *testing.T) {
	t.Parallel()
	s := startServer(t, serverOpts{})
	s.createAccount(t, "acme", "1")
	k := s.createKey(t, "acme", "chat:write", "--rate-limit", "1000/s")
	const flushed, late = 10, 5
	for range flushed {
		wantAllowed(t, s.checkKey(t, k.Secret, "POST", "/v1/chat/completions"), k.ID, "acme")
	}
	// Flushes run every second. Wait 1.5s and for a flush counted after the
	// debits (the counter counts only flushes that wrote something).
	before := metricSum(t, s, "keygate_ledger_flushes_total", `result="ok"`)
	since := time.Now()
	if !eventually(15*time.Second, func() bool {
		return time.Since(since) > 1500*time.Millisecond && metricSum(t, s, "keygate_ledger_flushes_total", `result="ok"`) > before
	}) {
		t.Fatalf("no ledger flush within 15s of the debits (keygate_ledger_flushes_total{result=\"ok\"} stays %v)", before)
	}
	for range late { // these may or may not reach the disk before the crash
		wantAllowed(t, s.checkKey(t, k.Secret, "POST", "/v1/chat/completions"), k.ID, "acme")
	}
	// Admin changes are durable when the command returns, crash or not.
	s.createAccount(t, "late", "3")
	lk := s.createKey(t, "late", "embeddings:write")
	s.ok(t, nil, "keys", "revoke", lk.ID)
	s.kill(t)

	s2 := startServer(t, serverOpts{db: s.db})
	bal := s2.account(t, "acme").BalanceMicros
	spent := s2.key(t, k.ID).SpentMicros
	if spent < flushed*priceChat || spent > (flushed+late)*priceChat {
		t.Errorf("spent after crash = %d, want between %d (flushed) and %d (all)", spent, flushed*priceChat, (flushed+late)*priceChat)
	}
	if bal+spent != 1_000_000 {
		t.Errorf("after crash balance %d + spent %d = %d, want 1000000: balance and spend disagree", bal, spent, bal+spent)
	}
	if got := s2.account(t, "late").BalanceMicros; got != 3_000_000 {
		t.Errorf("account created just before the crash: balance %d, want 3000000", got)
	}
	if got := s2.key(t, lk.ID).State; got != "revoked" {
		t.Errorf("key revoked just before the crash: state %q", got)
	}
	wantInvalidKey(t, s2.checkKey(t, lk.Secret, "POST", "/v1/embeddings"))
	wantAllowed(t, s2.checkKey(t, k.Secret, "POST", "/v1/chat/completions"), k.ID, "acme")
	s2.stop(t)
}

// TestE2ECrashAfterCredit: a credit is durable when it returns; debits not yet
// flushed when it ran must not come out of a crash half applied (taken from
// the balance but missing from the key's spend).
func TestE2ECrashAfterCredit(t *testing.T) {
	t.Parallel()
	s := startServer(t, serverOpts{})
	s.createAccount(t, "acme", "1")
	k := s.createKey(t, "acme", "chat:write", "--rate-limit", "1000/s", "--spend-cap", "0.05")
	// Start right after a flush, so that the debits below are most likely
	// still unflushed when the credit runs.
	wantAllowed(t, s.checkKey(t, k.Secret, "POST", "/v1/chat/completions"), k.ID, "acme")
	if !eventually(15*time.Second, func() bool {
		return metricSum(t, s, "keygate_ledger_flushes_total", `result="ok"`) >= 1
	}) {
		t.Fatal("no ledger flush within 15s")
	}
	const debits = 10
	for range debits {
		wantAllowed(t, s.checkKey(t, k.Secret, "POST", "/v1/chat/completions"), k.ID, "acme")
	}
	s.ok(t, nil, "accounts", "credit", "acme", "2")
	s.kill(t)

	s2 := startServer(t, serverOpts{db: s.db})
	bal := s2.account(t, "acme").BalanceMicros
	spent := s2.key(t, k.ID).SpentMicros
	if bal+spent != 3_000_000 {
		t.Errorf("after a crash right after a credit: balance %d + key spend %d = %d, want 3000000 "+
			"(the account paid for requests its key's spend does not count, so the key can go past its cap)", bal, spent, bal+spent)
	}
	s2.stop(t)
}

// TestE2ESingleWriter: one process owns the store file at a time, and --db
// mode takes over once the server is gone.
func TestE2ESingleWriter(t *testing.T) {
	t.Parallel()
	s := startServer(t, serverOpts{})
	s.createAccount(t, "acme", "1")
	k := s.createKey(t, "acme", "chat:write", "--rate-limit", "1000/s")

	t.Run("second serve fails fast", func(t *testing.T) {
		p := startProc(t, envWithToken("x"), "serve", "--db", s.db,
			"--listen", freeAddr(t), "--admin-listen", freeAddr(t), "--http-listen", freeAddr(t))
		code, ok := p.wait(15 * time.Second)
		if !ok {
			t.Fatalf("second keygate serve on %s still running after 15s\n%s", s.db, p.out.String())
		}
		out := p.out.String()
		if code == 0 || !strings.Contains(out, s.db) || !strings.Contains(out, "in use") {
			t.Errorf("second serve: exit %d, want non-zero with a message naming %s as in use\n%s", code, s.db, out)
		}
		if strings.Contains(out, "panic") {
			t.Errorf("second serve panicked\n%s", out)
		}
	})

	t.Run("--db while serving", func(t *testing.T) {
		for _, args := range [][]string{
			{"accounts", "list"},
			{"accounts", "create", "intruder"},
			{"keys", "create", "--account", "acme", "--scopes", "chat:write"},
		} {
			r := runKeygate(t, baseEnv(), append(args, "--db", s.db)...)
			wantFailure(t, r, s.db, "running")
		}
	})

	// The server is unharmed.
	wantAllowed(t, s.checkKey(t, k.Secret, "POST", "/v1/chat/completions"), k.ID, "acme")
	var accts []accountJSON
	s.ok(t, &accts, "accounts", "list")
	if len(accts) != 1 {
		t.Errorf("accounts after the refused --db writes: %+v, want only acme", accts)
	}
	s.stop(t)

	// Stopped: --db works, with no token.
	dbOK(t, s.db, nil, "accounts", "create", "bob", "--balance", "0.5")
	dbOK(t, s.db, &accts, "accounts", "list")
	if len(accts) != 2 || accts[1].ID != "bob" && accts[0].ID != "bob" {
		t.Errorf("accounts list --db: %+v, want acme and bob", accts)
	}
	var bk keyJSON
	dbOK(t, s.db, &bk, "keys", "create", "--account", "bob", "--scopes", "embeddings:write")

	// The restarted server sees what --db did.
	s2 := startServer(t, serverOpts{db: s.db})
	if got := s2.account(t, "bob").BalanceMicros; got != 500_000 {
		t.Errorf("bob's balance through the restarted server = %d, want 500000", got)
	}
	wantAllowed(t, s2.checkKey(t, bk.Secret, "POST", "/v1/embeddings"), bk.ID, "bob")
	s2.stop(t)
}

// TestE2ECorruptStore: a file that is not a healthy keygate store is an
// error that names it, never a panic, for serve and for --db alike.
func TestE2ECorruptStore(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	good := filepath.Join(dir, "good.db")
	dbOK(t, good, nil, "accounts", "create", "acme", "--balance", "1")
	data, err := os.ReadFile(good)
	if err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{
		"garbage.db":   bytes.Repeat([]byte("not a keygate store\n"), 4096),
		"empty.db":     {},
		"truncated.db": data[:len(data)/3],
		"zeroed.db":    make([]byte, len(data)),
	}
	for name, content := range files {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			path := filepath.Join(dir, name)
			if err := os.WriteFile(path, content, 0o600); err != nil {
				t.Fatal(err)
			}
			wantFailure(t, runKeygate(t, baseEnv(), "accounts", "list", "--db", path), path)

			p := startProc(t, envWithToken("x"), "serve", "--db", path,
				"--listen", freeAddr(t), "--admin-listen", freeAddr(t), "--http-listen", freeAddr(t))
			code, ok := p.wait(15 * time.Second)
			if !ok {
				t.Fatalf("keygate serve on %s still running after 15s\n%s", name, p.out.String())
			}
			out := p.out.String()
			if code == 0 || !strings.Contains(out, path) {
				t.Errorf("serve on %s: exit %d, want non-zero with a message naming the file\n%s", name, code, out)
			}
			if strings.Contains(out, "goroutine ") || strings.Contains(out, "panic:") {
				t.Errorf("serve on %s panicked\n%s", name, out)
			}
		})
	}
}

// TestE2EStopUnderLoad: SIGTERM while Checks stream in. Every Check that got
// an allow was paid for, and nothing else was: after the restart the key's
// spend is exactly the allows counted by the clients.
func TestE2EStopUnderLoad(t *testing.T) {
	t.Parallel()
	s := startServer(t, serverOpts{})
	s.createAccount(t, "acme", "1000")
	k := s.createKey(t, "acme", "chat:write", "--rate-limit", "1000000/s")
	const workers = 16
	var (
		allowed atomic.Int64
		wg      sync.WaitGroup
	)
	client := s.authz(t)
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
				resp, err := client.Check(ctx, bearerRequest(k.Secret, "POST", "/v1/chat/completions"))
				cancel()
				if err != nil {
					return // the server is going away
				}
				if resp.GetOkResponse() == nil {
					t.Errorf("denied under load: %v", resp)
					return
				}
				allowed.Add(1)
			}
		}()
	}
	if !eventually(30*time.Second, func() bool { return allowed.Load() >= 200 }) {
		t.Fatalf("only %d Checks allowed in 30s", allowed.Load())
	}
	s.stop(t)
	wg.Wait()

	s2 := startServer(t, serverOpts{db: s.db})
	n := allowed.Load()
	if got := s2.key(t, k.ID).SpentMicros; got != n*priceChat {
		t.Errorf("after a stop under load: spent %d = %d Checks, but the clients saw %d allows", got, got/priceChat, n)
	}
	if got := s2.account(t, "acme").BalanceMicros; got != 1_000_000_000-n*priceChat {
		t.Errorf("balance %d, want %d", got, 1_000_000_000-n*priceChat)
	}
	s2.stop(t)
}
