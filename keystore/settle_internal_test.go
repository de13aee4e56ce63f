package keystore

import (
	"runtime"
	"testing"
	"time"
	"weak"
)

// An open reservation does not keep alive the shard array its key was
// found in: an admin write replaces that array, and a store with many open
// reservations and steady admin writes would otherwise hold an old copy of
// a shard (about 125 KB at a million keys) for each write until its
// reservations settle.
func TestReservationDoesNotPinShard(t *testing.T) {
	s, err := Open(t.TempDir()+"/keygate.db", Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	now := time.Now()
	if _, err := s.CreateAccount("acme", "free", 1_000_000, now); err != nil {
		t.Fatal(err)
	}
	info, secret, err := s.CreateKey(NewKey{Account: "acme", Scopes: []string{"a"}}, now)
	if err != nil {
		t.Fatal(err)
	}
	found := func() weak.Pointer[Key] {
		k, ok := s.Lookup(secret, now)
		if !ok {
			t.Fatal("the key is not found")
		}
		if err := s.Reserve(k, "req-1", 10, 10, now.Add(time.Hour)); err != nil {
			t.Fatal(err)
		}
		return weak.Make(k) // a pointer into its shard's array
	}()
	if _, err := s.Revoke(info.ID, now); err != nil { // replaces the array
		t.Fatal(err)
	}
	runtime.GC()
	runtime.GC()
	if found.Value() != nil {
		t.Error("the shard array the Check found its key in is still alive after a write replaced it")
	}
	// The reservation still charges the key's account.
	if got, charged := s.Settle("req-1", true, 7, true); got != SettleCommitted || charged != 7 {
		t.Fatalf("Settle = %v, %d; want charged 7", got, charged)
	}
	if a, _ := s.Account("acme"); a.Balance != 1_000_000-7 {
		t.Errorf("balance %d after a settled charge of 7, want %d", a.Balance, 1_000_000-7)
	}
}
