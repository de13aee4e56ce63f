package main_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestE2EDBMissingFile: a read with --db on a path with no store names the
// problem and leaves no empty store behind; a create makes the store.
func TestE2EDBMissingFile(t *testing.T) {
	t.Parallel()
	db := filepath.Join(t.TempDir(), "typo.db")
	for _, args := range [][]string{{"accounts", "list"}, {"keys", "list"}, {"accounts", "get", "acme"}, {"keys", "get", "key_x"}} {
		r := runKeygate(t, baseEnv(), append(args, "--db", db)...)
		if r.code == 0 || !strings.Contains(r.stderr, "no such store file") {
			t.Errorf("keygate %v --db on a missing file: %s", args, r)
		}
		if _, err := os.Stat(db); !os.IsNotExist(err) {
			t.Fatalf("keygate %v --db created %s", args, db)
		}
	}
	var acct struct {
		ID string `json:"id"`
	}
	dbOK(t, db, &acct, "accounts", "create", "acme", "--balance", "1")
	if acct.ID != "acme" {
		t.Fatalf("created %+v", acct)
	}
	var list []map[string]any
	dbOK(t, db, &list, "accounts", "list")
	if len(list) != 1 {
		t.Fatalf("accounts list after create: %v", list)
	}
}
