package keystore

import (
	"encoding/binary"
	"fmt"
	"strings"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/keygate/keygate/keystore/money"
)

// Settled says what Settle did with a request's reservation.
type Settled uint8

const (
	// SettleUnknown: no open reservation has this request ID (never
	// reserved, already settled, or expired and committed). Nothing changed.
	SettleUnknown Settled = iota
	// SettleCommitted: the charge was taken from the balance and added to
	// the key's spend.
	SettleCommitted
	// SettleReleased: the reservation was dropped and nothing charged.
	SettleReleased
)

func (s Settled) String() string {
	switch s {
	case SettleCommitted:
		return "committed"
	case SettleReleased:
		return "released"
	}
	return "unknown"
}

// A reservation holds a request's price against its key's account and cap
// from the Check until the access log settles it, or its deadline passes.
type reservation struct {
	id string
	// key is a copy of the Key the Check found: its account and spend are
	// the ones charged. A copy, because the index holds Keys in arrays of
	// a shard that a write replaces, and a pointer would keep the old
	// array alive until the reservation settles.
	key      Key
	price    money.Micros
	maxPrice money.Micros
	deadline int64  // Unix nanoseconds
	seq      uint64 // tells apart, on disk, two reservations of one request ID

	// Guarded by the account's mu. open is false once settled; nextDirty
	// links the account's reservations changed since the last flush (nil:
	// unchanged; Store.endOfRes ends the list).
	open      bool
	nextDirty *reservation
}

// reservationShards split the open reservations by request ID, so that
// Checks reserving at once rarely share a lock.
const reservationShards = 64

type reservationShard struct {
	mu sync.Mutex
	m  map[string]*reservation
	_  [40]byte // one shard per cache line
}

func (s *Store) shardOf(requestID string) *reservationShard {
	h := uint32(2166136261) // FNV-1a: no allocation, no hash.Hash
	for i := 0; i < len(requestID); i++ {
		h = (h ^ uint32(requestID[i])) * 16777619
	}
	return &s.res[h%reservationShards]
}

// Reserve holds price against the key's account balance and its spend cap
// for the request requestID, until Settle or the deadline. It fails like
// Debit, or with ErrDuplicateRequest when requestID already holds an open
// reservation; nothing changes when it fails. maxPrice (>= price) is the
// most that Settle may charge for it. Like Debit, it works in memory; the
// flush writes the reservation, so that it survives a restart.
func (s *Store) Reserve(k *Key, requestID string, price, maxPrice money.Micros, deadline time.Time) error {
	if price <= 0 || price > money.Max || maxPrice < price || maxPrice > money.Max {
		return errNegativePrice
	}
	if requestID == "" || len(requestID) > maxRequestIDLen {
		return errRequestID
	}
	sh := s.shardOf(requestID)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if _, ok := sh.m[requestID]; ok {
		return ErrDuplicateRequest
	}
	a, e := k.acct, k.entry
	a.mu.Lock()
	if err := s.canSpendLocked(k, price); err != nil {
		a.mu.Unlock()
		return err
	}
	r := &reservation{id: strings.Clone(requestID), key: *k, price: price, maxPrice: maxPrice,
		deadline: deadline.UnixNano(), seq: s.resSeq.Add(1), open: true}
	a.reserved += price
	e.reserved += price
	s.markReservationLocked(a, r)
	a.mu.Unlock()
	sh.m[r.id] = r
	s.openReservations.Add(1)
	return nil
}

// Limits of a request ID: Envoy's are UUIDs; a client's own must not make
// the store keep kilobytes per request.
const maxRequestIDLen = 128

var errRequestID = fmt.Errorf("%w: request id empty or longer than %d bytes", ErrInvalid, maxRequestIDLen)

// markReservationLocked puts r on its account's list of changed
// reservations, once. The caller holds a.mu.
func (s *Store) markReservationLocked(a *account, r *reservation) {
	if r.nextDirty == nil {
		next := a.dirtyRes
		if next == nil {
			next = s.endOfRes
		}
		r.nextDirty = next
		a.dirtyRes = r
	}
	s.markDirtyLocked(a, nil)
}

// Settle ends the reservation of requestID. A successful request is
// charged cost clamped to the reservation's maxPrice when hasCost, else
// the reserved price; a failed one is released. It returns what it did and
// the amount charged. A charge above the reserved price can take the
// balance below zero, and the key past its cap, by at most maxPrice-price:
// the reservation held only the price.
func (s *Store) Settle(requestID string, success bool, cost money.Micros, hasCost bool) (Settled, money.Micros) {
	r := s.take(requestID)
	if r == nil {
		return SettleUnknown, 0
	}
	charge := money.Micros(0)
	if success {
		charge = r.price
		if hasCost {
			charge = min(max(cost, 0), r.maxPrice)
		}
	}
	s.finish(r, charge)
	if !success {
		return SettleReleased, 0
	}
	return SettleCommitted, charge
}

// take removes requestID's open reservation from the map and returns it,
// or nil. Whoever takes a reservation settles it: it is settled once.
func (s *Store) take(requestID string) *reservation {
	sh := s.shardOf(requestID)
	sh.mu.Lock()
	r := sh.m[requestID]
	if r != nil {
		delete(sh.m, requestID)
	}
	sh.mu.Unlock()
	if r != nil {
		s.openReservations.Add(-1)
	}
	return r
}

// finish releases r's hold and charges charge (0: nothing).
func (s *Store) finish(r *reservation, charge money.Micros) {
	k := &r.key
	a, e := k.acct, k.entry
	a.mu.Lock()
	a.reserved -= r.price
	e.reserved -= r.price
	r.open = false
	s.markReservationLocked(a, r)
	if charge > 0 {
		s.chargeLocked(k, charge)
	}
	a.mu.Unlock()
}

// ExpireReservations commits, at their reserved price, the reservations
// whose deadline is not after now, and returns how many: a request whose
// log entry never came (a lost stream, an Envoy restart) is charged as if
// it had succeeded, so that revenue is never lost silently. Run calls it
// before each flush.
func (s *Store) ExpireReservations(now time.Time) int {
	n := now.UnixNano()
	var due []*reservation
	for i := range s.res {
		sh := &s.res[i]
		sh.mu.Lock()
		for id, r := range sh.m {
			if r.deadline <= n {
				delete(sh.m, id)
				due = append(due, r)
			}
		}
		sh.mu.Unlock()
	}
	s.openReservations.Add(int64(-len(due)))
	for _, r := range due {
		s.finish(r, r.price)
	}
	if len(due) > 0 {
		s.metrics.expired.Add(float64(len(due)))
	}
	return len(due)
}

// diskKey is r's key in the reservations bucket: the request ID, a zero
// byte and the sequence number. A request ID can be reserved again once
// settled, even by another account, whose flush may come first: each
// reservation's record is its own, so deleting one never deletes another.
func (r *reservation) diskKey() []byte {
	return binary.BigEndian.AppendUint64(append([]byte(r.id), 0), r.seq)
}

// loadReservations restores the open reservations, and what they hold
// against balances and caps. One whose key is gone (never: keys are not
// deleted) makes the store corrupt rather than silently uncharged.
func (s *Store) loadReservations(tx *bolt.Tx) error {
	return tx.Bucket(bucketReserved).ForEach(func(dk, v []byte) error {
		if len(dk) < 10 || dk[len(dk)-9] != 0 {
			return fmt.Errorf("reservation key %q", dk)
		}
		id, seq := dk[:len(dk)-9], binary.BigEndian.Uint64(dk[len(dk)-8:])
		rec, err := decodeReservation(v)
		if err != nil {
			return fmt.Errorf("reservation %q: %w", id, err)
		}
		e := s.keyByIDLocked(rec.KeyID)
		if e == nil {
			return fmt.Errorf("reservation %q: key %s does not exist", id, rec.KeyID)
		}
		if len(id) == 0 || len(id) > maxRequestIDLen {
			return fmt.Errorf("reservation id of %d bytes", len(id))
		}
		r := &reservation{id: string(id), key: *e.cur, price: rec.Price, maxPrice: rec.MaxPrice,
			deadline: rec.Deadline, seq: seq, open: true}
		// Two open reservations of one request ID are what a crash leaves
		// between the write of the newer (by a Credit of its account, or a
		// flush that caught it) and the deletion of the older, settled on
		// another account: that settlement was lost with the crash. Both
		// stay held. A log entry settles the newer; the older is kept under
		// its disk key, which no request ID takes, and expires at its price.
		sh, mapKey := s.shardOf(r.id), r.id
		if old := sh.m[r.id]; old != nil {
			if old.seq < r.seq {
				sh.m[string(old.diskKey())] = old
			} else {
				mapKey = string(r.diskKey())
			}
		}
		a := e.cur.acct
		a.reserved += r.price
		e.reserved += r.price
		sh.m[mapKey] = r
		s.openReservations.Add(1)
		return nil
	})
}
