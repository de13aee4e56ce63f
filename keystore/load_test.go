package keystore

import (
	"runtime"
	"slices"
	"strings"
	"testing"

	bolt "go.etcd.io/bbolt"
)

// TestOpenInRanges opens a store big enough to be loaded by several
// goroutines and checks that every part came back.
func TestOpenInRanges(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(3)) // three ranges, whatever the machine
	f := getFixture(t, 700, 25_000)
	s := openFixture(t, f)
	defer s.Close()
	if len(s.byID) != 25_000 || len(s.accounts) != 700 {
		t.Fatalf("%d keys and %d accounts loaded", len(s.byID), len(s.accounts))
	}
	if !slices.IsSortedFunc(s.byID, func(a, b *keyEntry) int { return strings.Compare(a.cur.ID, b.cur.ID) }) {
		t.Error("byID is not sorted")
	}
	for i, id := range f.keyIDs {
		if s.byID[i].cur.ID != id {
			t.Fatalf("byID[%d] = %s, want %s", i, s.byID[i].cur.ID, id)
		}
	}
	for i, secret := range f.secrets {
		k, ok := s.Lookup(secret, benchNow)
		if !ok || k.Account() != accountName(i%700) || k.Tier() != "tier1" {
			t.Fatalf("secret %d: Lookup = %+v, %v", i, k, ok)
		}
	}
	keys := 0
	for _, a := range s.Accounts() {
		ks := s.Keys(a.ID)
		keys += len(ks)
		for _, k := range ks {
			if k.Account != a.ID {
				t.Fatalf("Keys(%s) lists %s of %s", a.ID, k.ID, k.Account)
			}
		}
	}
	if keys != 25_000 {
		t.Errorf("accounts list %d keys in all, want 25000", keys)
	}
	spent := 0
	for _, e := range s.byID {
		if e.spent > 0 {
			spent++
		}
	}
	if spent == 0 {
		t.Error("no spend was loaded")
	}
}

func TestSplitKeys(t *testing.T) {
	f := getFixture(t, 700, 25_000)
	s := openFixture(t, f)
	defer s.Close()
	s.db.View(func(tx *bolt.Tx) error {
		for _, parts := range []int{1, 2, 3, 7} {
			rs := splitKeys(tx.Bucket(bucketKeys), parts)
			total := 0
			for i, r := range rs {
				total += r.n
				if i > 0 && string(r.from) != string(rs[i-1].to) {
					t.Errorf("parts=%d: range %d starts at %q, range %d ends at %q", parts, i, r.from, i-1, rs[i-1].to)
				}
			}
			if len(rs) != parts || total != 25_000 || rs[0].from != nil || rs[len(rs)-1].to != nil {
				t.Errorf("parts=%d: %d ranges, %d keys", parts, len(rs), total)
			}
		}
		return nil
	})
}
