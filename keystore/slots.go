package keystore

import (
	"encoding/binary"
	"errors"
	"fmt"

	bolt "go.etcd.io/bbolt"

	"github.com/keygate/keygate/keystore/money"
)

// Balances and spends live in ledger blocks (schema 3). Each account and
// each key has a slot, given when it is created and never reused (nothing
// is ever deleted); the slot's 12 bytes in its block hold the balance, or
// the spend and its cap period. A block holds slotsPerBlock slots, one
// bbolt value of about a page.
//
// Why blocks: a flush writes every changed balance and spend, and a bbolt
// Put costs about a microsecond whatever its size (a descent from the
// root, a copy of the key, a cursor). A flush of 100,000 accounts and
// their keys was 200,000 Puts and 370 ms of CPU; in blocks it is under a
// thousand Puts of a page each. Accounts and keys have separate slot
// spaces (blockAccounts, blockKeys), so that a flush can write every
// spend before any balance (see flushLocked).
const (
	slotSize       = 12 // 8-byte value, 4-byte cap period (0 for a balance)
	slotsPerBlock  = 256
	blockSize      = slotSize * slotsPerBlock
	blockAccounts  = 'a' // first byte of an account block's bbolt key
	blockKeys      = 'k' // of a key block's
	blockKeyLength = 5   // kind byte, then the block number, big-endian
)

// noSlot is past the last slot: the slot spaces stop before it, and a
// file that holds it is refused.
const noSlot = ^uint32(0)

// slotSpace hands out the slots of one kind. The caller holds Store.wmu.
type slotSpace struct{ next uint32 }

// peek returns the first of the next n slots. They are taken once their
// transaction commits (commit): a failed one leaves them free.
func (sp *slotSpace) peek(n int) (uint32, error) {
	if uint64(sp.next)+uint64(n) >= uint64(noSlot) {
		return 0, errors.New("no slot left in the ledger")
	}
	return sp.next, nil
}

// commit records that the slots below next are in use.
func (sp *slotSpace) commit(next uint32) { sp.next = max(sp.next, next) }

// blockKey is the bbolt key of the block that holds slot.
func blockKey(kind byte, slot uint32) [blockKeyLength]byte {
	var k [blockKeyLength]byte
	k[0] = kind
	binary.BigEndian.PutUint32(k[1:], slot/slotsPerBlock)
	return k
}

// setSlot writes slot's value into its block.
func setSlot(block []byte, slot uint32, val money.Micros, period int32) {
	off := int(slot%slotsPerBlock) * slotSize
	binary.BigEndian.PutUint64(block[off:], uint64(val))
	binary.BigEndian.PutUint32(block[off+8:], uint32(period))
}

// slotRecord encodes a slot for the account_slots and key_slots buckets.
func slotRecord(slot uint32) []byte { return binary.BigEndian.AppendUint32(nil, slot) }

// getSlot decodes what slotRecord wrote.
func getSlot(v []byte) (uint32, error) {
	if len(v) != 4 {
		return 0, fmt.Errorf("slot of %d bytes, want 4", len(v))
	}
	s := binary.BigEndian.Uint32(v)
	if s == noSlot {
		return 0, errors.New("slot out of range")
	}
	return s, nil
}

// ledgerBlocks reads the blocks of one kind in a read transaction, for
// Open and Export. The blocks point into bbolt's memory map: they are
// valid until the transaction ends.
type ledgerBlocks struct {
	blocks [][]byte // by block number; nil: never written
	used   []uint64 // a bit per slot seen: a slot held twice is corruption
}

// readBlocks reads every block of kind.
func readBlocks(tx *bolt.Tx, kind byte) (*ledgerBlocks, error) {
	lb := &ledgerBlocks{}
	c := tx.Bucket(bucketLedger).Cursor()
	for k, v := c.Seek([]byte{kind}); k != nil && k[0] == kind; k, v = c.Next() {
		if len(k) != blockKeyLength {
			return nil, fmt.Errorf("ledger block key %x", k)
		}
		if len(v) != blockSize {
			return nil, fmt.Errorf("ledger block %x of %d bytes, want %d", k, len(v), blockSize)
		}
		n := int(binary.BigEndian.Uint32(k[1:]))
		if n >= int(noSlot/slotsPerBlock) {
			return nil, fmt.Errorf("ledger block %x out of range", k)
		}
		for len(lb.blocks) <= n {
			lb.blocks = append(lb.blocks, nil)
		}
		lb.blocks[n] = v
	}
	return lb, nil
}

// balance returns the balance in slot, or an error if it is out of range
// or another account already took the slot.
func (lb *ledgerBlocks) balance(slot uint32) (money.Micros, error) {
	raw, err := lb.take(slot)
	if err != nil || raw == nil {
		return 0, err
	}
	if binary.BigEndian.Uint32(raw[8:]) != 0 {
		return 0, fmt.Errorf("%w: a balance with a cap period", errRecord)
	}
	return getBalance(raw[:8])
}

// spend returns the spend and cap period in slot, or an error if they are
// out of range or another key already took the slot.
func (lb *ledgerBlocks) spend(slot uint32) (money.Micros, int32, error) {
	raw, err := lb.take(slot)
	if err != nil || raw == nil {
		return 0, 0, err
	}
	if binary.BigEndian.Uint32(raw[8:]) == 0 {
		return getSpend(raw[:8])
	}
	return getSpend(raw)
}

// take returns the raw bytes of slot (nil: a block never written, all
// zeros), and an error if the slot was taken already.
func (lb *ledgerBlocks) take(slot uint32) ([]byte, error) {
	w, bit := slot/64, uint64(1)<<(slot%64)
	for uint32(len(lb.used)) <= w {
		lb.used = append(lb.used, 0)
	}
	if lb.used[w]&bit != 0 {
		return nil, fmt.Errorf("ledger slot %d is held twice", slot)
	}
	lb.used[w] |= bit
	n := int(slot / slotsPerBlock)
	if n >= len(lb.blocks) || lb.blocks[n] == nil {
		return nil, nil
	}
	off := int(slot%slotsPerBlock) * slotSize
	return lb.blocks[n][off : off+slotSize], nil
}

// blockWriter changes slots in the blocks of one write transaction. It
// keeps the block it changes last in its buffer, so that a run of slots in
// one block costs one Get and one Put.
type blockWriter struct {
	lb    *bolt.Bucket
	key   [blockKeyLength]byte
	buf   []byte // the current block, changed; nil: none
	dirty bool
}

func newBlockWriter(tx *bolt.Tx) *blockWriter { return &blockWriter{lb: tx.Bucket(bucketLedger)} }

// set writes val and period into slot of kind.
func (w *blockWriter) set(kind byte, slot uint32, val money.Micros, period int32) error {
	k := blockKey(kind, slot)
	if w.buf == nil || k != w.key {
		if err := w.flush(); err != nil {
			return err
		}
		w.key = k
		if w.buf == nil {
			w.buf = make([]byte, blockSize)
		}
		if old := w.lb.Get(k[:]); len(old) == blockSize {
			copy(w.buf, old)
		} else {
			clear(w.buf)
		}
	}
	setSlot(w.buf, slot, val, period)
	w.dirty = true
	return nil
}

// flush puts the current block if it changed. bbolt holds on to the value
// until the commit, so each Put gets its own copy.
func (w *blockWriter) flush() error {
	if !w.dirty {
		return nil
	}
	w.dirty = false
	if err := w.lb.Put(w.key[:], append([]byte(nil), w.buf...)); err != nil {
		return fmt.Errorf("ledger block %x: %w", w.key, err)
	}
	return nil
}
