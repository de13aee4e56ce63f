package keystore

import (
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// TestFlushFailureRetries makes a flush fail (the file is read-only
// underneath the store) and checks that the values stay dirty: the next
// flush writes the latest ones.
func TestFlushFailureRetries(t *testing.T) {
	path := t.TempDir() + "/keygate.db"
	s, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	if _, err := s.CreateAccount("acme", "", 100, now); err != nil {
		t.Fatal(err)
	}
	info, secret, err := s.CreateKey(NewKey{Account: "acme", Scopes: []string{"a"}}, now)
	if err != nil {
		t.Fatal(err)
	}
	k, _ := s.Lookup(secret, now)
	if err := s.Debit(k, 10); err != nil {
		t.Fatal(err)
	}

	// Swap in a read-only handle: writes fail.
	s.wmu.Lock()
	if err := s.db.Close(); err != nil {
		t.Fatal(err)
	}
	ro, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	s.db = ro
	s.wmu.Unlock()
	if err := s.Flush(); err == nil {
		t.Fatal("Flush on a read-only file succeeded")
	}
	if err := s.Debit(k, 5); err != nil { // lands on the re-marked entries
		t.Fatal(err)
	}

	s.wmu.Lock()
	ro.Close()
	if s.db, err = bolt.Open(path, 0o600, nil); err != nil {
		t.Fatal(err)
	}
	s.wmu.Unlock()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	r, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	a, _ := r.Account("acme")
	got, _ := r.Key(info.ID)
	if a.Balance != 85 || got.Spent != 15 {
		t.Errorf("after a failed flush and a good one: balance %d, spent %d; want 85 and 15", a.Balance, got.Spent)
	}
}
