package main_test

import (
	"os"
	"path/filepath"
	"testing"
)

// TestE2EConfigFileFields: every serve flag has a config-file field, and
// flags win over the file.
func TestE2EConfigFileFields(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	fileDB, flagDB := filepath.Join(dir, "from-file.db"), filepath.Join(dir, "from-flag.db")
	listen, admin, httpAddr := freeAddr(t), freeAddr(t), freeAddr(t)
	cfg := filepath.Join(dir, "keygate.yaml")
	conf := exampleConfig + "db: " + fileDB + "\nlisten: " + listen + "\nadmin_listen: " + admin +
		"\nhttp_listen: " + httpAddr + "\nlog_level: warn\nlog_format: console\n"
	if err := os.WriteFile(cfg, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	const token = "e2e-config-token"
	start := func(t *testing.T, s *server, args ...string) *server {
		s.t, s.token = t, token
		s.proc = startProc(t, envWithToken(token), append([]string{"serve", "--config", cfg}, args...)...)
		if err := s.waitReady(); err != nil {
			t.Fatalf("keygate serve %v: %v\n%s", args, err, s.out.String())
		}
		return s
	}

	t.Run("from the file", func(t *testing.T) {
		s := start(t, &server{db: fileDB, listen: listen, admin: admin, http: httpAddr})
		s.createAccount(t, "acme", "1")
		k := s.createKey(t, "acme", "chat:write")
		wantAllowed(t, s.checkKey(t, k.Secret, "POST", "/v1/chat/completions"), k.ID, "acme")
		s.stop(t)
		var accts []accountJSON
		dbOK(t, fileDB, &accts, "accounts", "list")
		if len(accts) != 1 || accts[0].ID != "acme" {
			t.Errorf("%s (the file's db): accounts %+v, want acme", fileDB, accts)
		}
	})

	t.Run("flags win", func(t *testing.T) {
		admin2, http2 := freeAddr(t), freeAddr(t)
		s := start(t, &server{db: flagDB, listen: listen, admin: admin2, http: http2},
			"--db", flagDB, "--admin-listen", admin2, "--http-listen", http2)
		var accts []accountJSON
		s.ok(t, &accts, "accounts", "list")
		if len(accts) != 0 {
			t.Errorf("--db %s: accounts %+v, want a new, empty store", flagDB, accts)
		}
		s.createAccount(t, "other", "1")
		k := s.createKey(t, "other", "chat:write")
		// listen still comes from the file.
		wantAllowed(t, s.checkKey(t, k.Secret, "POST", "/v1/chat/completions"), k.ID, "other")
		s.stop(t)
		dbOK(t, fileDB, &accts, "accounts", "list")
		if len(accts) != 1 || accts[0].ID != "acme" {
			t.Errorf("%s: accounts %+v, want only acme: --db did not win", fileDB, accts)
		}
	})
}
