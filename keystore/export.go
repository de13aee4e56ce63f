package keystore

import (
	"encoding/binary"
	"fmt"
	"strconv"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/keygate/keygate/keystore/money"
)

// Export is everything another store needs to take over from this one
// (keygate migrate writes it into Redis): each account with its balance,
// each key with the hash of its secret and its spend, and the open
// reservations. The alert outbox is not part of it (see PendingAlerts).
type Export struct {
	Accounts     []ExportedAccount     // sorted by ID
	Keys         []ExportedKey         // sorted by ID
	Reservations []ExportedReservation // in the file's order: by request ID
}

// ExportedAccount is an account and its committed balance.
type ExportedAccount struct {
	Record  AccountRecord
	Balance money.Micros // may be below zero: a settled charge above its reservation
}

// ExportedKey is a key and its spend, in the cap period the store
// recorded with it: a spend of a period that has ended is exported as it
// is, with that period, and the next store reads it as 0 (Account and Key
// show it as 0 already).
type ExportedKey struct {
	Record KeyRecord
	Spent  money.Micros // in cap period Period
	Period int32        // Period.Index of the cap period Spent belongs to; 0 for none
}

// ExportedReservation is an open reservation (settle: on_response). Its
// price is held against its key's spend and its account's balance, which
// do not include it.
type ExportedReservation struct {
	// ID is the request ID that a Settle names. A crash can leave two open
	// reservations of one request ID (see loadReservations); both are
	// held, and both are exported: the newest under the request ID, each
	// older one under an ID that no request can have (the request ID, a
	// NUL byte and its sequence number in decimal), so that it is never
	// settled and expires at its price, as this store does with it.
	ID       string
	KeyID    string
	Price    money.Micros
	MaxPrice money.Micros
	Deadline time.Time
}

// Export flushes the ledger, then reads the store from its file in one
// transaction, with keystore's own decoders, holding the store's write
// lock throughout. The result is consistent, and is what Open would load
// from the file at that moment: no admin write or other flush can come
// between the flush and the read, and a flush writes each account's
// balance together with its keys' spend and its reservations (see
// snapshotLocked). It includes every debit, reservation and settlement
// made before the call; those of Checks running meanwhile go to the next
// flush, not to the export, so a store to be exported whole is one that
// no server uses (keygate migrate opens it, and holds it until it is
// done).
//
// Admin writes and flushes wait for it, Checks do not. After Close it
// fails with ErrClosed.
func (s *Store) Export() (Export, error) {
	s.lock()
	defer s.wmu.Unlock()
	if s.closed {
		return Export{}, ErrClosed
	}
	if err := s.flushLocked(nil); err != nil {
		return Export{}, fmt.Errorf("export %s: %w", s.path, err)
	}
	var x Export
	err := s.db.View(func(tx *bolt.Tx) error {
		if err := x.readAccounts(tx); err != nil {
			return err
		}
		if err := x.readKeys(tx); err != nil {
			return err
		}
		return x.readReservations(tx)
	})
	if err != nil {
		return Export{}, fmt.Errorf("export %s: %w", s.path, err)
	}
	return x, nil
}

// readAccounts reads the accounts and their balances.
func (x *Export) readAccounts(tx *bolt.Tx) error {
	blocks, err := readBlocks(tx, blockAccounts)
	if err != nil {
		return err
	}
	slots := tx.Bucket(bucketAccountSlots)
	b := tx.Bucket(bucketAccounts)
	x.Accounts = make([]ExportedAccount, 0, b.Stats().KeyN)
	return b.ForEach(func(k, v []byte) error {
		a := ExportedAccount{Record: AccountRecord{ID: string(k)}}
		if err := a.Record.UnmarshalBinary(v); err != nil {
			return fmt.Errorf("account %s: %w", k, err)
		}
		slot, err := getSlot(slots.Get(k))
		if err != nil {
			return fmt.Errorf("account %s: %w", k, err)
		}
		if a.Balance, err = blocks.balance(slot); err != nil {
			return fmt.Errorf("account %s: %w", k, err)
		}
		x.Accounts = append(x.Accounts, a)
		return nil
	})
}

// readKeys reads the keys and their spend.
func (x *Export) readKeys(tx *bolt.Tx) error {
	blocks, err := readBlocks(tx, blockKeys)
	if err != nil {
		return err
	}
	slots := tx.Bucket(bucketKeySlots)
	b := tx.Bucket(bucketKeys)
	x.Keys = make([]ExportedKey, 0, b.Stats().KeyN)
	return b.ForEach(func(k, v []byte) error {
		key := ExportedKey{Record: KeyRecord{ID: string(k)}}
		if err := key.Record.UnmarshalBinary(v); err != nil {
			return fmt.Errorf("key %s: %w", k, err)
		}
		slot, err := getSlot(slots.Get(k))
		if err != nil {
			return fmt.Errorf("key %s: %w", k, err)
		}
		if key.Spent, key.Period, err = blocks.spend(slot); err != nil {
			return fmt.Errorf("key %s: %w", k, err)
		}
		x.Keys = append(x.Keys, key)
		return nil
	})
}

// readReservations reads the open reservations, and names each as
// ExportedReservation.ID says.
func (x *Export) readReservations(tx *bolt.Tx) error {
	var seqs []uint64
	newest := map[string]uint64{} // request ID → its newest reservation's sequence number
	err := tx.Bucket(bucketReserved).ForEach(func(dk, v []byte) error {
		id, seq, ok := splitDiskKey(dk)
		if !ok {
			return fmt.Errorf("reservation key %q", dk)
		}
		rec, err := decodeReservation(v)
		if err != nil {
			return fmt.Errorf("reservation %q: %w", id, err)
		}
		x.Reservations = append(x.Reservations, ExportedReservation{ID: string(id), KeyID: rec.KeyID,
			Price: rec.Price, MaxPrice: rec.MaxPrice, Deadline: time.Unix(0, rec.Deadline).UTC()})
		seqs = append(seqs, seq)
		newest[string(id)] = max(newest[string(id)], seq)
		return nil
	})
	if err != nil {
		return err
	}
	for i := range x.Reservations {
		if r := &x.Reservations[i]; seqs[i] != newest[r.ID] {
			r.ID += "\x00" + strconv.FormatUint(seqs[i], 10)
		}
	}
	return nil
}

// splitDiskKey splits a reservation's key in the bucket (see diskKey)
// into its request ID and sequence number; ok is false for a key that
// diskKey cannot have made.
func splitDiskKey(dk []byte) (id []byte, seq uint64, ok bool) {
	if len(dk) < 10 || dk[len(dk)-9] != 0 {
		return nil, 0, false
	}
	return dk[:len(dk)-9], binary.BigEndian.Uint64(dk[len(dk)-8:]), true
}
