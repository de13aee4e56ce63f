package keystore

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	bolt "go.etcd.io/bbolt"
	"go.uber.org/zap"

	"github.com/keygate/keygate/keystore/metric"
	"github.com/keygate/keygate/keystore/money"
)

// account is the live state of one account. Every Key of the account points
// to it, whichever index snapshot the Key came from, so a debit made through
// a Key fetched before an admin write still lands on the one balance.
type account struct {
	mu sync.Mutex // guards the fields up to alerts; never held during disk I/O

	balance    money.Micros // committed: may go below 0 by what Settle allows
	reserved   money.Micros // held by open reservations; Checks spend balance-reserved
	alertBelow money.Micros // 0: no low-balance alert
	// dirty is set when balance, a key's spend, a reservation or the alerts
	// changed since the last flush; the account is then on the store's dirty
	// stack, linked through nextDirty, and its changed keys and reservations
	// are linked from dirtyKeys and dirtyRes.
	dirty     bool
	nextDirty *account
	dirtyKeys *keyEntry
	dirtyRes  *reservation
	alerts    []Alert // crossed since the last flush

	// Immutable after creation.
	id        string
	tier      string
	createdAt int64

	keys []*keyEntry // guarded by Store.mu; written with Store.wmu held too
}

// keyEntry is the long-lived state of one key: its spend and what only
// operators read. Published Keys are immutable and replaced on revocation;
// they all point to the same entry. It is 80 bytes: a million keys count.
type keyEntry struct {
	// Guarded by the account's mu. nextDirty is nil while the spend is
	// flushed, else the next changed key of the account (Store.endOfList
	// ends the list, so that nil can mean "clean").
	spent     money.Micros // in period, when the key has a cap period
	reserved  money.Micros
	nextDirty *keyEntry
	period    int32 // the cap period that spent belongs to
	capPeriod Period

	// Guarded by Store.mu; written with Store.wmu held too.
	cur       *Key
	rotatedTo string

	// Immutable after creation.
	name      string
	createdAt int64
}

// errNegativePrice is prebuilt so that Debit never allocates.
var errNegativePrice = fmt.Errorf("%w: negative or too large price", ErrInvalid)

// Debit takes price from the key's account balance and adds it to the key's
// spend, or changes nothing and returns ErrInsufficientBalance or
// ErrSpendCap. A price of 0 always passes. Open reservations count against
// both. It works in memory under the account's mutex only: Run and Flush
// write the result to disk in batches.
func (s *Store) Debit(k *Key, price money.Micros) error {
	if price == 0 {
		return nil
	}
	if price < 0 || price > money.Max {
		return errNegativePrice
	}
	a := k.acct
	a.mu.Lock()
	if err := s.canSpendLocked(k, price); err != nil {
		a.mu.Unlock()
		return err
	}
	s.chargeLocked(k, price)
	a.mu.Unlock()
	return nil
}

// canSpendLocked reports whether the key may take price more: from what
// its account has left after open reservations, and within its cap after
// its own. It starts the key's new cap period when one has begun. The
// caller holds the account's mutex.
func (s *Store) canSpendLocked(k *Key, price money.Micros) error {
	a, e := k.acct, k.entry
	s.rollLocked(e)
	switch {
	case a.balance-a.reserved < price: // each within ±money.Max: no overflow
		return ErrInsufficientBalance
	case k.SpendCap > 0 && e.spent+e.reserved+price > k.SpendCap:
		return ErrSpendCap
	}
	return nil
}

// rollLocked starts e's cap period over when the clock has moved into a
// later one. The caller holds the account's mutex.
func (s *Store) rollLocked(e *keyEntry) {
	if e.capPeriod == PeriodNone {
		return
	}
	if p := e.capPeriod.index(s.now()); p > e.period {
		e.spent, e.period = 0, p
	}
}

// chargeLocked takes amount from k's account and adds it to k's spend,
// marks both for the flush, and records the alert thresholds the charge
// crossed. The caller holds the account's mutex and has checked what
// needed checking.
func (s *Store) chargeLocked(k *Key, amount money.Micros) {
	a, e := k.acct, k.entry
	s.rollLocked(e)
	bal, spent := a.balance, e.spent
	a.balance -= amount
	e.spent += amount
	if (k.SpendCap > 0 && len(s.thresholds) > 0) || a.alertBelow > 0 {
		s.crossedLocked(k, bal, spent)
	}
	s.markDirtyLocked(a, e)
}

// markDirtyLocked records that a's balance and e's spend (e may be nil)
// need flushing. The caller holds a.mu. An account joins the store's dirty
// stack once per flush interval, with a compare-and-swap: no lock is taken
// and nothing is allocated.
func (s *Store) markDirtyLocked(a *account, e *keyEntry) {
	if e != nil && e.nextDirty == nil {
		next := a.dirtyKeys
		if next == nil {
			next = s.endOfList
		}
		e.nextDirty = next
		a.dirtyKeys = e
	}
	if a.dirty {
		return
	}
	a.dirty = true
	s.dirtyCount.Add(1)
	for {
		head := s.dirty.Load()
		a.nextDirty = head
		if s.dirty.CompareAndSwap(head, a) {
			return
		}
	}
}

// Run flushes the ledger every FlushInterval until ctx is done (or the store
// is closed), then returns nil. A failed flush is logged and counted, and
// its values are retried with the next one. Run does not flush on the way
// out: the caller drains the Checks that may still debit, then calls Close.
//
// Run's flushes are paced (see pacer): each spreads its work over up to
// half the interval, so that the Checks sharing its CPU barely notice it.
func (s *Store) Run(ctx context.Context) error {
	t := time.NewTicker(s.flushEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			if n := s.ExpireReservations(s.now()); n > 0 {
				s.log.Warn("reservations expired without an access-log entry; committed at their reserved price",
					zap.Int("count", n))
			}
			err := s.flush(&pacer{
				deadline: time.Now().Add(s.flushEvery / 2),
				hurry:    func() bool { return s.waiting.Load() > 0 || ctx.Err() != nil },
			})
			if errors.Is(err, ErrClosed) {
				return nil
			}
			if err != nil {
				s.log.Error("ledger flush; retrying with the next one", zap.Error(err))
			}
		}
	}
}

// Flush writes every balance and spend changed since the last flush in one
// bbolt transaction, at full speed. Values are copied under each account's
// mutex and written after it is released, so Checks never wait on the
// disk. If the write fails, the values stay marked and the next flush
// writes them.
func (s *Store) Flush() error { return s.flush(nil) }

func (s *Store) flush(p *pacer) error {
	if p == nil {
		s.lock()
	} else {
		s.wmu.Lock() // the flusher itself: not an admin write to hurry for
	}
	defer s.wmu.Unlock()
	if s.closed {
		return ErrClosed
	}
	return s.flushLocked(p)
}

// lock takes s.wmu for an admin write (or Close, or an explicit Flush),
// telling a paced flush that holds it to finish at full speed.
func (s *Store) lock() {
	s.waiting.Add(1)
	s.wmu.Lock()
	s.waiting.Add(-1)
}

// flushBatch holds one flush's snapshot; the Store keeps it between flushes
// so that a steady flusher does not allocate. Its entries and IDs hold no
// pointers: a flush of 100,000 accounts keeps 200,000 of them alive for a
// few seconds, and the garbage collector, which runs several times during
// such a flush and shares the Checks' CPU, does not have to scan them.
type flushBatch struct {
	accounts []batchEntry // balances by account ID
	keys     []batchEntry // spends by key ID
	tmp      []batchEntry // the radix sort's other buffer
	ids      []byte       // the entries' IDs, end to end
	values   []byte       // what bbolt holds on to until the commit

	// Reservations opened or settled, and alerts raised, since the last
	// flush: rare next to debits, so kept simple.
	res    []resChange
	alerts []Alert
}

// resChange is a reservation's state as the snapshot saw it.
type resChange struct {
	r    *reservation
	open bool
}

// flushEntry is a value to write: a balance, or a spend and its cap period.
type flushEntry struct {
	id     string
	val    money.Micros
	period int32 // of a spend: its cap period's number, or 0
}

// batchEntry is one value of a flush. pre holds the first 16 bytes of the
// ID, big-endian and zero-padded, so that sorting reads no pointer (a
// comparison sort through the accounts and keys, three dependent loads a
// side, cost more than the writes); the ID itself is flushBatch.ids[off:
// off+n].
type batchEntry struct {
	pre    [2]uint64
	val    money.Micros
	off, n uint32
	period int32
	// last: the account raised alerts since the last flush, so its
	// balance and spends go in the flush's last transaction, with them.
	last bool
}

// add appends the entry for id to es, copying id into b.ids.
func (b *flushBatch) add(es []batchEntry, id string, val money.Micros, period int32, last bool) []batchEntry {
	var p [16]byte
	copy(p[:], id)
	es = append(es, batchEntry{
		pre: [2]uint64{binary.BigEndian.Uint64(p[:8]), binary.BigEndian.Uint64(p[8:])},
		val: val, off: uint32(len(b.ids)), n: uint32(len(id)), period: period, last: last,
	})
	b.ids = append(b.ids, id...)
	return es
}

// id is f's ID; it is valid until the next flush.
func (b *flushBatch) id(f *batchEntry) []byte { return b.ids[f.off : f.off+f.n : f.off+f.n] }

// Relative costs of a flush's work per value, for the pacer's measure of
// progress (measured: a bbolt put with sorted keys is about 0.75µs, the
// snapshot 0.2µs a value, the sort 0.15µs). The commits, bursts that
// cannot be split, count as part of the puts.
const (
	costSnapshot = 0.25
	costSort     = 0.15
	costPut      = 1
)

// flushLocked is Flush with s.wmu held; p is nil for a flush at full speed.
// Admin writes wait for the flush; a paced one finishes at full speed when
// one does.
//
// A large flush is several bbolt transactions (see defaultFlushPart), in
// an order that makes a crash between two of them cost no more than
// losing the whole flush would, and never charge twice or let a key pass
// its cap:
//  1. reservations opened and settled: a settled one is deleted before
//     its charge reaches the balance, so a restart cannot expire it and
//     charge it again (a crash in between loses the charge, as it would
//     lose any unflushed debit);
//  2. spends, in ID order: a key's spend reaches the disk before the
//     balance its debits came from, so after a crash a cap counts every
//     debit the balance does, and perhaps a few more, never fewer;
//  3. balances, in ID order;
//  4. last, in one transaction, the accounts that raised alerts, whole
//     (balance and spends), with the alerts: an alert is neither lost
//     nor raised twice by a crash.
//
// Each part is a run of sorted IDs, so it rewrites few pages: splitting by
// account instead spreads every part over the whole spend bucket (measured:
// 2.6 times the CPU in 40 parts).
func (s *Store) flushLocked(p *pacer) error {
	start := time.Now()
	dirty := int(max(s.dirtyCount.Swap(0), 0))
	p.begin(start, float64(dirty)*(costSnapshot+2*(costSort+costPut)))
	b := &s.batch
	// Room for every dirty account and one key each, at once: growing
	// by doubling would leave as much again as garbage.
	b.accounts = slices.Grow(b.accounts[:0], dirty)
	b.keys = slices.Grow(b.keys[:0], dirty)
	b.ids = slices.Grow(b.ids[:0], 2*dirty*idSizeGuess)
	b.res, b.alerts = b.res[:0], b.alerts[:0]
	defer func() {
		clear(b.res) // settled reservations must not stay reachable
		clear(b.alerts)
	}()
	const part = 64 // accounts between the pacer's ticks
	var n0 int
	for a := s.dirty.Swap(nil); a != nil; {
		a = s.snapshotLocked(a, b)
		if len(b.accounts)%part == 0 || a == nil {
			n := len(b.accounts) + len(b.keys)
			p.tick(costSnapshot * float64(n-n0))
			n0 = n
		}
	}
	n := len(b.accounts) + len(b.keys)
	if n == 0 {
		return nil // no account was dirty: nor were its reservations and alerts
	}
	p.left(float64(n) * (costSort + costPut))
	// Sorted keys make bbolt's puts sequential: each page is changed by a
	// run of puts while it is in the cache (random order costs twice).
	b.accounts, b.tmp = sortEntries(b.accounts, b.tmp, b.ids, p)
	b.keys, b.tmp = sortEntries(b.keys, b.tmp, b.ids, p)
	p.left(float64(n) * costPut)
	err := s.writeLocked(b, p)
	if err != nil {
		s.remarkLocked(b)
		err = fmt.Errorf("flush %d balances and %d spends: %w", len(b.accounts), len(b.keys), err)
	}
	s.metrics.observe(err, start, n)
	if err == nil && len(b.alerts) > 0 && s.onAlert != nil {
		s.onAlert(slices.Clone(b.alerts))
	}
	return err
}

// idSizeGuess is about the length of an account or key ID, to size the
// batch's IDs before the snapshot.
const idSizeGuess = 24

// snapshotLocked copies a's balance and changed spends into b, marks them
// clean, and returns the next dirty account. The caller holds s.wmu, so the
// keys' IDs are stable.
func (s *Store) snapshotLocked(a *account, b *flushBatch) *account {
	a.mu.Lock()
	next := a.nextDirty
	a.nextDirty, a.dirty = nil, false
	last := len(a.alerts) > 0
	b.accounts = b.add(b.accounts, a.id, a.balance, 0, last)
	for e := a.dirtyKeys; e != nil && e != s.endOfList; {
		n := e.nextDirty
		e.nextDirty = nil
		b.keys = b.add(b.keys, e.cur.ID, e.spent, e.period, last)
		e = n
	}
	a.dirtyKeys = nil
	for r := a.dirtyRes; r != nil && r != s.endOfRes; {
		n := r.nextDirty
		r.nextDirty = nil
		b.res = append(b.res, resChange{r: r, open: r.open})
		r = n
	}
	a.dirtyRes = nil
	b.alerts = append(b.alerts, a.alerts...)
	clear(a.alerts)
	a.alerts = a.alerts[:0]
	a.mu.Unlock()
	return next
}

// defaultFlushPart is the most values one of a flush's transactions
// writes. A commit is a burst the pacer cannot split: bbolt serialises
// every page the transaction changed, writes them and fsyncs. In one
// transaction, 100,000 accounts made a commit of about 50ms of CPU, which
// held up every Check sharing its core; 8,192 sorted values change a few
// hundred pages, a commit of about 2ms.
const defaultFlushPart = 8192

// writeLocked writes the sorted batch, in parts, in flushLocked's order.
func (s *Store) writeLocked(b *flushBatch, p *pacer) error {
	w := partWriter{s: s, p: p, size: s.flushPart, vals: b.values[:0]}
	defer func() {
		w.rollback()
		b.values = w.vals[:0]
	}()
	for i := range b.res {
		if err := w.reservation(&b.res[i]); err != nil {
			return err
		}
	}
	if err := w.values(bucketSpend, "spend", b, b.keys, false); err != nil {
		return err
	}
	if err := w.values(bucketBalances, "balance", b, b.accounts, false); err != nil {
		return err
	}
	// The accounts with alerts, and the alerts, in one transaction.
	w.size = 0
	if err := w.values(bucketSpend, "spend", b, b.keys, true); err != nil {
		return err
	}
	if err := w.values(bucketBalances, "balance", b, b.accounts, true); err != nil {
		return err
	}
	if err := w.alerts(b.alerts); err != nil {
		return err
	}
	return w.commit()
}

// partWriter writes a flush as a series of transactions, each of at most
// size values (0: no limit), opened as they are needed.
type partWriter struct {
	s    *Store
	p    *pacer
	size int
	tx   *bolt.Tx
	n    int    // values put in tx
	vals []byte // room for values: bbolt holds on to them until the commit
}

// next returns the open transaction, committing it first and opening
// another when it holds size values already.
func (w *partWriter) next() (*bolt.Tx, error) {
	if w.tx != nil && w.size > 0 && w.n >= w.size {
		if err := w.commit(); err != nil {
			return nil, err
		}
	}
	if w.tx == nil {
		tx, err := w.s.db.Begin(true)
		if err != nil {
			return nil, err
		}
		w.tx, w.n = tx, 0
	}
	w.n++
	if w.n%16 == 0 {
		w.p.tick(16 * costPut)
	}
	return w.tx, nil
}

// commit commits the open transaction, if any.
func (w *partWriter) commit() error {
	if w.tx == nil {
		return nil
	}
	tx := w.tx
	w.tx = nil
	if err := tx.Commit(); err != nil {
		return err
	}
	w.vals = w.vals[:0] // the values are on disk: their room is free
	if w.s.afterPart != nil {
		w.s.afterPart()
	}
	return nil
}

// rollback drops the open transaction after a failure.
func (w *partWriter) rollback() {
	if w.tx != nil {
		w.tx.Rollback()
		w.tx = nil
	}
}

// values puts the entries of es whose last field is last into bucket.
func (w *partWriter) values(bucket []byte, what string, b *flushBatch, es []batchEntry, last bool) error {
	for i := range es {
		f := &es[i]
		if f.last != last {
			continue
		}
		tx, err := w.next()
		if err != nil {
			return err
		}
		if len(w.vals)+12 > cap(w.vals) {
			// Only the last, unbounded transaction gets here: the
			// values already put keep the old array alive.
			w.vals = make([]byte, 0, max(12*w.s.flushPart, 2*cap(w.vals)))
		}
		v := putSpend(w.vals[len(w.vals):len(w.vals)+12], f.val, f.period)
		w.vals = w.vals[:len(w.vals)+len(v)]
		if err := tx.Bucket(bucket).Put(b.id(f), v); err != nil {
			return fmt.Errorf("%s of %s: %w", what, b.id(f), err)
		}
	}
	return nil
}

// reservation writes a reservation opened, or deletes one settled.
func (w *partWriter) reservation(c *resChange) error {
	tx, err := w.next()
	if err != nil {
		return err
	}
	return putReservation(tx.Bucket(bucketReserved), c)
}

// alerts puts the alerts in the outbox, when there is one.
func (w *partWriter) alerts(alerts []Alert) error {
	if !w.s.outbox {
		return nil
	}
	for i := range alerts {
		tx, err := w.next()
		if err != nil {
			return err
		}
		if err := putAlert(tx.Bucket(bucketOutbox), &alerts[i]); err != nil {
			return err
		}
	}
	return nil
}

// writeChangesLocked writes reservations opened and settled, and alerts
// raised, in the transaction that writes the charges they go with (an
// admin write's: see flushLocked for a flush's order).
func (s *Store) writeChangesLocked(tx *bolt.Tx, res []resChange, alerts []Alert) error {
	rb := tx.Bucket(bucketReserved)
	for i := range res {
		if err := putReservation(rb, &res[i]); err != nil {
			return err
		}
	}
	if !s.outbox {
		return nil
	}
	ob := tx.Bucket(bucketOutbox)
	for i := range alerts {
		if err := putAlert(ob, &alerts[i]); err != nil {
			return err
		}
	}
	return nil
}

// putReservation writes a reservation opened, or deletes one settled.
func putReservation(rb *bolt.Bucket, c *resChange) error {
	if !c.open {
		if err := rb.Delete(c.r.diskKey()); err != nil {
			return fmt.Errorf("reservation %q: %w", c.r.id, err)
		}
		return nil
	}
	rec := reservationRecord{KeyID: c.r.key.ID, Price: c.r.price, MaxPrice: c.r.maxPrice, Deadline: c.r.deadline}
	if err := rb.Put(c.r.diskKey(), rec.appendTo(nil)); err != nil {
		return fmt.Errorf("reservation %q: %w", c.r.id, err)
	}
	return nil
}

// putAlert puts a in the outbox.
func putAlert(ob *bolt.Bucket, a *Alert) error {
	v, err := json.Marshal(a)
	if err != nil {
		return err
	}
	if err := ob.Put([]byte(a.ID), v); err != nil {
		return fmt.Errorf("alert %s: %w", a.ID, err)
	}
	return nil
}

// sortEntries sorts es by ID (ids holds the IDs), using tmp's array as
// scratch space, and returns the sorted slice and the other array (empty),
// for the next sort. It is a least-significant-digit radix sort on the IDs'
// first 16 bytes (skipping the bytes that every ID shares, like "key_"),
// which pauses cleanly between parts of its passes; entries whose first 16
// bytes are equal are then sorted by the whole ID.
func sortEntries(es, tmp []batchEntry, ids []byte, p *pacer) (sorted, other []batchEntry) {
	const part = 4096 // entries between the pacer's ticks
	var counts [16][256]int
	for i := range es {
		hi, lo := es[i].pre[0], es[i].pre[1]
		for d := range 8 {
			counts[d][byte(hi>>(56-8*d))]++
			counts[8+d][byte(lo>>(56-8*d))]++
		}
		if i%part == part-1 {
			p.tick(part * costSort / 4)
		}
	}
	src, dst := es, slices.Grow(tmp[:0], len(es))[:len(es)]
	for d := 15; d >= 0; d-- {
		c := &counts[d]
		if slices.Contains(c[:], len(es)) {
			continue // every ID has the same byte here
		}
		var next [256]int
		for v, sum := 0, 0; v < 256; v++ {
			next[v], sum = sum, sum+c[v]
		}
		shift, half := 56-8*(d%8), d/8
		for i := range src {
			v := byte(src[i].pre[half] >> shift)
			dst[next[v]] = src[i]
			next[v]++
			if i%part == part-1 {
				p.tick(part * costSort / 16)
			}
		}
		src, dst = dst, src
	}
	for lo := 0; lo < len(src); {
		hi := lo + 1
		for hi < len(src) && src[hi].pre == src[lo].pre {
			hi++
		}
		if hi-lo > 1 {
			slices.SortFunc(src[lo:hi], func(x, y batchEntry) int {
				return bytes.Compare(ids[x.off:x.off+x.n], ids[y.off:y.off+y.n])
			})
		}
		lo = hi
	}
	return src, dst[:0]
}

// remarkLocked marks a failed flush's accounts and keys dirty again. Their
// current values, not the snapshot, are written next time. The caller holds
// s.wmu.
func (s *Store) remarkLocked(b *flushBatch) {
	for _, c := range b.res {
		a := c.r.key.acct
		a.mu.Lock()
		s.markReservationLocked(a, c.r)
		a.mu.Unlock()
	}
	for _, al := range b.alerts {
		if a := s.accounts[al.Account]; a != nil {
			a.mu.Lock()
			a.alerts = append(a.alerts, al)
			s.markDirtyLocked(a, nil)
			a.mu.Unlock()
		}
	}
	for i := range b.keys {
		if e := s.keyByIDLocked(string(b.id(&b.keys[i]))); e != nil {
			a := e.cur.acct
			a.mu.Lock()
			s.markDirtyLocked(a, e)
			a.mu.Unlock()
		}
	}
	for i := range b.accounts {
		if a := s.accounts[string(b.id(&b.accounts[i]))]; a != nil {
			a.mu.Lock()
			s.markDirtyLocked(a, nil)
			a.mu.Unlock()
		}
	}
}

// A pacer spreads a background flush over time, so that the Checks sharing
// its CPU (one core, often) see a light, steady load rather than a burst of
// a few hundred milliseconds. The work before the commit is scheduled
// evenly over flushAim of the time to the deadline: after each slice of
// work the flush sleeps for as long as it is ahead of that schedule, but no
// longer than keeps it to flushShare of a CPU (a small flush is not
// stretched over the whole interval); not at all when it is behind, or
// once hurry says so (an admin write waits for the store, or Run is
// stopping). Progress is measured in cost units, not time: a slice's wall
// time also counts the Checks and garbage collection that interrupted it,
// and an estimate of the work left from it made flushes end early, at a
// higher share of the CPU than they needed. Sleeping, rather than
// runtime.Gosched, is what lets Checks in: the scheduler polls the network
// when it has nothing else to run, and a goroutine that yields is still
// something to run. The commit at the end cannot be split, so it stays a
// burst of a few tens of milliseconds at 100,000 accounts.
//
// A nil *pacer is a flush at full speed (Flush, Close).
type pacer struct {
	deadline time.Time
	hurry    func() bool

	start, resumed time.Time
	total, done    float64 // work, in cost units
}

const (
	flushShare = 0.05 // of a CPU at least, however far the deadline
	// flushSlice is the work between pauses: long enough that resuming
	// (a timer, a trip through the scheduler, caches the Checks have
	// emptied) costs little next to it, short enough that a Check barely
	// waits for it.
	flushSlice = 250 * time.Microsecond
	flushAim   = 0.9 // of the time to the deadline, for the work before the commit
)

// begin starts the clock, with an estimate of the total work.
func (p *pacer) begin(start time.Time, total float64) {
	if p == nil {
		return
	}
	p.start, p.resumed, p.total = start, start, total
}

// left corrects the estimate of the work left.
func (p *pacer) left(units float64) {
	if p == nil {
		return
	}
	p.total = p.done + units
}

// tick records units of work done, and pauses after each slice of work.
func (p *pacer) tick(units float64) {
	if p == nil {
		return
	}
	p.done += units
	now := time.Now()
	w := now.Sub(p.resumed)
	if w < flushSlice {
		return
	}
	if d := p.delay(now, w); d > 0 {
		time.Sleep(d)
		now = time.Now()
	}
	p.resumed = now
}

// delay is the pause after a slice of work w that ended at now.
func (p *pacer) delay(now time.Time, w time.Duration) time.Duration {
	if p.hurry != nil && p.hurry() {
		return 0
	}
	longest := time.Duration(float64(w) * (1 - flushShare) / flushShare)
	if p.total <= 0 {
		return longest
	}
	// The time at which the schedule reaches the work done so far.
	span := float64(p.deadline.Sub(p.start)) * flushAim
	due := p.start.Add(time.Duration(span * min(p.done/p.total, 1)))
	return min(longest, max(due.Sub(now), 0))
}

// Metric names, declared once.
const (
	metricFlushes  = "keygate_ledger_flushes_total"
	metricDuration = "keygate_ledger_flush_duration_seconds"
	metricEntries  = "keygate_ledger_flushed_entries_total"
)

type ledgerMetrics struct {
	ok, failed prometheus.Counter
	duration   prometheus.Histogram
	entries    prometheus.Counter
	expired    prometheus.Counter
	reg        prometheus.Registerer
}

// newLedgerMetrics builds the ledger's metrics and registers them with reg
// when it is not nil. A collector already registered under the same name (a
// second store in one registry, as in tests) is shared rather than refused.
func newLedgerMetrics(reg prometheus.Registerer) (*ledgerMetrics, error) {
	flushes, err := metric.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: metricFlushes,
		Help: "Ledger flushes that had balances or spends to write, by result.",
	}, []string{"result"}))
	if err != nil {
		return nil, err
	}
	duration, err := metric.Register(reg, prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    metricDuration,
		Help:    "Time taken by one ledger flush, from the snapshot to the fsync, pauses of a paced flush included.",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14), // 0.5ms .. 4s
	}))
	if err != nil {
		return nil, err
	}
	entries, err := metric.Register(reg, prometheus.NewCounter(prometheus.CounterOpts{
		Name: metricEntries,
		Help: "Balances and key spends written by successful ledger flushes.",
	}))
	if err != nil {
		return nil, err
	}
	expired, err := ExpiredReservations(reg)
	if err != nil {
		return nil, err
	}
	return &ledgerMetrics{
		ok:       flushes.WithLabelValues("ok"),
		failed:   flushes.WithLabelValues("error"),
		duration: duration,
		entries:  entries,
		expired:  expired,
		reg:      reg,
	}, nil
}

// ExpiredReservations returns keygate_reservations_expired_total,
// registered with reg (shared with any store already registered there):
// the bbolt store and the Redis-mode store count expiries in the one
// counter.
func ExpiredReservations(reg prometheus.Registerer) (prometheus.Counter, error) {
	return metric.Register(reg, prometheus.NewCounter(prometheus.CounterOpts{
		Name: "keygate_reservations_expired_total",
		Help: "Reservations whose access-log entry never came, committed at their reserved price after settle_timeout.",
	}))
}

// openReservations exports s's count of open reservations. A second store
// in one registry (tests) keeps the first one's gauge.
func (m *ledgerMetrics) openReservations(s *Store) {
	if m.reg == nil {
		return
	}
	_ = m.reg.Register(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "keygate_reservations_open",
		Help: "Reservations held by allowed requests whose access-log entry has not settled them yet.",
	}, func() float64 { return float64(s.openReservations.Load()) }))
}

// observe records one flush that had n values to write (0: nothing to do,
// not counted, so that an idle store's histogram stays meaningful).
func (m *ledgerMetrics) observe(err error, start time.Time, n int) {
	if err == nil && n == 0 {
		return
	}
	m.duration.Observe(time.Since(start).Seconds())
	if err != nil {
		m.failed.Inc()
		return
	}
	m.ok.Inc()
	m.entries.Add(float64(n))
}
