package keystore

import (
	"bytes"
	"errors"
	"math"
	"testing"

	bolt "go.etcd.io/bbolt"

	"github.com/keygate/keygate/keystore/money"
)

// FuzzLedgerSlot reads arbitrary bytes as a slot, the way Open reads a
// block from the file: as a balance and as a spend, each either refused
// with errRecord or in range, and then written back byte for byte.
func FuzzLedgerSlot(f *testing.F) {
	seed := func(m money.Micros, period int32) []byte {
		b := make([]byte, slotSize)
		setSlot(b, 0, m, period)
		return b
	}
	f.Add(seed(0, 0))
	f.Add(seed(42, 0))
	f.Add(seed(-money.Max, 0))
	f.Add(seed(money.Max, 20_000))
	f.Add(seed(1, -1))
	f.Add(bytes.Repeat([]byte{0xff}, slotSize))
	f.Fuzz(func(t *testing.T, raw []byte) {
		if len(raw) != slotSize {
			return // readBlocks refuses a block of the wrong size
		}
		block := make([]byte, blockSize)
		copy(block[5*slotSize:], raw)
		lb := &ledgerBlocks{blocks: [][]byte{block}}
		if m, err := lb.balance(5); err == nil {
			if m < -money.Max || m > money.Max {
				t.Fatalf("balance %d out of range from %x", m, raw)
			}
			back := make([]byte, slotSize)
			if setSlot(back, 0, m, 0); !bytes.Equal(back, raw) {
				t.Fatalf("balance %d from %x writes back as %x", m, raw, back)
			}
		} else if !errors.Is(err, errRecord) {
			t.Fatalf("balance of %x: %v, want errRecord", raw, err)
		}
		lb.used = nil
		if m, period, err := lb.spend(5); err == nil {
			if m < 0 || m > money.Max || period < 0 {
				t.Fatalf("spend %d, period %d out of range from %x", m, period, raw)
			}
			back := make([]byte, slotSize)
			if setSlot(back, 0, m, period); !bytes.Equal(back, raw) {
				t.Fatalf("spend %d, period %d from %x writes back as %x", m, period, raw, back)
			}
		} else if !errors.Is(err, errRecord) {
			t.Fatalf("spend of %x: %v, want errRecord", raw, err)
		}
	})
}

// TestLedgerSlotTakenTwice: a slot read twice is corruption (two accounts
// or two keys would share a balance); a slot in no block reads as 0.
func TestLedgerSlotTakenTwice(t *testing.T) {
	lb := &ledgerBlocks{blocks: [][]byte{make([]byte, blockSize)}}
	if m, err := lb.balance(3); err != nil || m != 0 {
		t.Fatalf("balance(3) = %d, %v", m, err)
	}
	if _, err := lb.balance(3); err == nil {
		t.Fatal("slot 3 read twice without an error")
	}
	if m, p, err := lb.spend(10 * slotsPerBlock); err != nil || m != 0 || p != 0 {
		t.Fatalf("a slot past the last block: %d, %d, %v; want 0, 0, nil", m, p, err)
	}
}

// TestBlockWriter writes slots across blocks, out of order and twice over,
// in one transaction, and reads them back as Open does.
func TestBlockWriter(t *testing.T) {
	db, err := bolt.Open(t.TempDir()+"/b.db", 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	writes := []struct {
		slot uint32
		m    money.Micros
		p    int32
	}{{0, 1, 0}, {255, 2, 7}, {256, 3, 0}, {1, 4, 0}, {255, 5, 8}, {100_000, 6, 0}}
	err = db.Update(func(tx *bolt.Tx) error {
		if _, err := tx.CreateBucket(bucketLedger); err != nil {
			return err
		}
		w := newBlockWriter(tx)
		for _, x := range writes {
			if err := w.set(blockKeys, x.slot, x.m, x.p); err != nil {
				return err
			}
		}
		if err := w.set(blockAccounts, 0, 9, 0); err != nil {
			return err
		}
		return w.flush()
	})
	if err != nil {
		t.Fatal(err)
	}
	want := map[uint32][2]int64{0: {1, 0}, 255: {5, 8}, 256: {3, 0}, 1: {4, 0}, 100_000: {6, 0}, 2: {0, 0}}
	err = db.View(func(tx *bolt.Tx) error {
		keys, err := readBlocks(tx, blockKeys)
		if err != nil {
			return err
		}
		if len(keys.blocks) != 100_000/slotsPerBlock+1 {
			t.Errorf("%d key blocks", len(keys.blocks))
		}
		for slot, w := range want {
			m, p, err := keys.spend(slot)
			if err != nil || int64(m) != w[0] || int64(p) != w[1] {
				t.Errorf("slot %d: %d, %d, %v; want %d, %d", slot, m, p, err, w[0], w[1])
			}
		}
		accounts, err := readBlocks(tx, blockAccounts)
		if err != nil {
			return err
		}
		if m, err := accounts.balance(0); err != nil || m != 9 {
			t.Errorf("account slot 0: %d, %v; want 9", m, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestSlotSpace: slots are taken when their transaction commits, and the
// space refuses to wrap.
func TestSlotSpace(t *testing.T) {
	var sp slotSpace
	first, err := sp.peek(3)
	if err != nil || first != 0 {
		t.Fatalf("peek = %d, %v", first, err)
	}
	if again, _ := sp.peek(1); again != 0 {
		t.Fatalf("a slot peeked but not committed was taken: next %d", again)
	}
	sp.commit(3)
	sp.commit(2) // an older commit does not go back
	if next, _ := sp.peek(1); next != 3 {
		t.Fatalf("next slot %d, want 3", next)
	}
	sp.next = math.MaxUint32 - 2
	if _, err := sp.peek(2); err == nil {
		t.Fatal("the slot space wrapped around")
	}
	if _, err := sp.peek(1); err != nil {
		t.Fatalf("the last slot: %v", err)
	}
}
