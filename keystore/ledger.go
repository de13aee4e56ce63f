package keystore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	bolt "go.etcd.io/bbolt"
	"go.uber.org/zap"

	"github.com/keygate/keygate/authz/ratelimit"
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
	slot      uint32 // in the ledger (slots.go)

	keys []*keyEntry // guarded by Store.mu; written with Store.wmu held too
}

// keyEntry is the long-lived state of one key: its spend and what only
// operators read. Published Keys are immutable and replaced on revocation;
// they all point to the same entry. It is 96 bytes: a million keys count.
type keyEntry struct {
	// The key's rate-limit bucket, in process memory only (Key.RateBucket),
	// beside the spend that the same Check debits next.
	rate ratelimit.Bucket

	// Guarded by the account's mu. nextDirty is nil while the spend is
	// flushed, else the next changed key of the account (Store.endOfList
	// ends the list, so that nil can mean "clean").
	spent     money.Micros // in period, when the key has a cap period
	reserved  money.Micros
	nextDirty *keyEntry
	period    int32 // the cap period that spent belongs to
	capPeriod Period
	slot      uint32 // in the ledger (slots.go); immutable after creation

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
// so that a steady flusher does not allocate. Its entries hold no
// pointers: a flush of 100,000 accounts keeps 200,000 of them alive for a
// few seconds, and the garbage collector, which runs several times during
// such a flush and shares the Checks' CPU, does not have to scan them.
type flushBatch struct {
	accounts []batchEntry // balances, by slot once sorted
	keys     []batchEntry // spends, by slot once sorted
	tmp      []batchEntry // the radix sort's other buffer

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

// batchEntry is one value of a flush (or of a Credit), in its ledger slot:
// a balance, or a spend and its cap period's number (or 0).
type batchEntry struct {
	slot   uint32
	period int32
	val    money.Micros
	// last: the account raised alerts since the last flush, so its
	// balance and spends go in the flush's last transaction, with them.
	last bool
}

// Relative costs of a flush's work, for the pacer's measure of progress,
// in microseconds (BenchmarkFlush, 100,000 accounts and their keys: the
// snapshot 0.1µs a value, the sort 0.04µs, a block's Get, changes, Put
// and share of the commit 16µs).
const (
	costSnapshot = 0.1
	costSort     = 0.04
	costBlock    = 16
)

// flushLocked is Flush with s.wmu held; p is nil for a flush at full speed.
// Admin writes wait for the flush; a paced one finishes at full speed when
// one does.
//
// A large flush is several bbolt transactions (see defaultFlushPart), in
// an order that makes a crash between two of them cost no more than
// losing the whole flush would, and never charge twice or let a key pass
// its cap:
//  1. reservations opened and settled: a settled one is deleted no later
//     than its charge reaches the balance, so a restart cannot expire it
//     and charge it again (a crash in between loses the charge, as it
//     would lose any unflushed debit);
//  2. spends, by block: a key's spend reaches the disk before the balance
//     its debits came from, so after a crash a cap counts every debit the
//     balance does, and perhaps a few more, never fewer;
//  3. balances, by block;
//  4. last, in one transaction, the accounts that raised alerts, whole
//     (balance and spends), with the alerts: an alert is neither lost nor
//     raised twice by a crash.
func (s *Store) flushLocked(p *pacer) error {
	start := time.Now()
	dirty := int(max(s.dirtyCount.Swap(0), 0))
	p.begin(start, float64(dirty)*(2*(costSnapshot+costSort)+costBlock/16))
	b := &s.batch
	// Room for every dirty account and one key each, at once: growing
	// by doubling would leave as much again as garbage.
	b.accounts = slices.Grow(b.accounts[:0], dirty)
	b.keys = slices.Grow(b.keys[:0], dirty)
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
	p.left(float64(n)*costSort + float64(n)*costBlock/16)
	b.accounts, b.tmp = sortBySlot(b.accounts, b.tmp, p)
	b.keys, b.tmp = sortBySlot(b.keys, b.tmp, p)
	p.left(float64(blocks(b.accounts)+blocks(b.keys)+len(b.res)/64+1) * costBlock)
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

// snapshotLocked copies a's balance and changed spends into b, marks them
// clean, and returns the next dirty account. The caller holds s.wmu, so the
// keys are stable.
func (s *Store) snapshotLocked(a *account, b *flushBatch) *account {
	a.mu.Lock()
	next := a.nextDirty
	a.nextDirty, a.dirty = nil, false
	last := len(a.alerts) > 0
	b.accounts = append(b.accounts, batchEntry{slot: a.slot, val: a.balance, last: last})
	for e := a.dirtyKeys; e != nil && e != s.endOfList; {
		n := e.nextDirty
		e.nextDirty = nil
		b.keys = append(b.keys, batchEntry{slot: e.slot, val: e.spent, period: e.period, last: last})
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

// blocks counts the ledger blocks that the sorted es touch.
func blocks(es []batchEntry) int {
	n := 0
	for i := range es {
		if i == 0 || es[i].slot/slotsPerBlock != es[i-1].slot/slotsPerBlock {
			n++
		}
	}
	return n
}

// defaultFlushPart bounds one of a flush's transactions, in units of a
// 64th of a block: 512 blocks (2 MiB of pages), or 32,768 reservation
// records. A commit is a burst the pacer cannot split: bbolt serialises
// every page the transaction changed, writes them and fsyncs, and with one
// P (one core) the fsync holds up every Check until it returns. Parts keep
// each burst to a few milliseconds; few of them keep the fsyncs few.
const defaultFlushPart = 512 * blockUnits

// blockUnits is a block's weight in a part; a reservation or alert weighs 1.
const blockUnits = 64

// writeLocked writes the sorted batch, in parts, in flushLocked's order.
func (s *Store) writeLocked(b *flushBatch, p *pacer) error {
	w := partWriter{s: s, p: p, size: s.flushPart}
	defer w.rollback()
	if err := putEach(&w, bucketReserved, b.res, putReservation); err != nil {
		return err
	}
	if err := w.blocks(blockKeys, b.keys, false); err != nil {
		return err
	}
	if err := w.blocks(blockAccounts, b.accounts, false); err != nil {
		return err
	}
	// The accounts with alerts, whole, and the alerts, in one transaction.
	w.size = 0
	if err := w.blocks(blockKeys, b.keys, true); err != nil {
		return err
	}
	if err := w.blocks(blockAccounts, b.accounts, true); err != nil {
		return err
	}
	if s.outbox {
		if err := putEach(&w, bucketOutbox, b.alerts, putAlert); err != nil {
			return err
		}
	}
	return w.commit()
}

// putEach writes items with put into bucket, each weighing 1 in its part.
func putEach[T any](w *partWriter, bucket []byte, items []T, put func(*bolt.Bucket, *T) error) error {
	for i := range items {
		tx, err := w.next(1)
		if err != nil {
			return err
		}
		if err := put(tx.Bucket(bucket), &items[i]); err != nil {
			return err
		}
	}
	return nil
}

// partWriter writes a flush as a series of transactions, each of at most
// size units (0: no limit), opened as they are needed.
type partWriter struct {
	s    *Store
	p    *pacer
	size int
	tx   *bolt.Tx
	bw   *blockWriter // tx's
	n    int          // units in tx
}

// next returns the open transaction for units more of work, committing it
// first and opening another when it is full.
func (w *partWriter) next(units int) (*bolt.Tx, error) {
	if w.tx != nil && w.size > 0 && w.n+units > w.size && w.n > 0 {
		if err := w.commit(); err != nil {
			return nil, err
		}
	}
	if w.tx == nil {
		tx, err := w.s.db.Begin(true)
		if err != nil {
			return nil, err
		}
		w.tx, w.bw, w.n = tx, newBlockWriter(tx), 0
	}
	w.n += units
	w.p.tick(float64(units) * costBlock / blockUnits)
	return w.tx, nil
}

// commit commits the open transaction, if any.
func (w *partWriter) commit() error {
	if w.tx == nil {
		return nil
	}
	tx := w.tx
	if err := w.bw.flush(); err != nil {
		return err
	}
	w.tx, w.bw = nil, nil
	if err := tx.Commit(); err != nil {
		return err
	}
	if w.s.afterPart != nil {
		w.s.afterPart()
	}
	return nil
}

// rollback drops the open transaction after a failure.
func (w *partWriter) rollback() {
	if w.tx != nil {
		w.tx.Rollback()
		w.tx, w.bw = nil, nil
	}
}

// blocks writes the entries of es (sorted by slot) whose last field is
// last into their blocks of kind. A block that holds both kinds of entry
// is written twice, each time with its own entries: the other slots keep
// what the disk has.
func (w *partWriter) blocks(kind byte, es []batchEntry, last bool) error {
	for i := 0; i < len(es); {
		blk := es[i].slot / slotsPerBlock
		j, any := i, false
		for ; j < len(es) && es[j].slot/slotsPerBlock == blk; j++ {
			any = any || es[j].last == last
		}
		if any {
			if _, err := w.next(blockUnits); err != nil {
				return err
			}
			for _, f := range es[i:j] {
				if f.last != last {
					continue
				}
				if err := w.bw.set(kind, f.slot, f.val, f.period); err != nil {
					return err
				}
			}
		}
		i = j
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

// sortBySlot sorts es by slot, using tmp's array as scratch space, and
// returns the sorted slice and the other array (empty), for the next sort.
// It is a least-significant-digit radix sort, a byte at a time, which
// skips the bytes every slot shares and pauses cleanly between parts of
// its passes.
func sortBySlot(es, tmp []batchEntry, p *pacer) (sorted, other []batchEntry) {
	const part = 4096 // entries between the pacer's ticks
	var counts [4][256]int
	for i := range es {
		for d := range 4 {
			counts[d][byte(es[i].slot>>(8*d))]++
		}
	}
	src, dst := es, slices.Grow(tmp[:0], len(es))[:len(es)]
	for d := range 4 {
		c := &counts[d]
		if slices.Contains(c[:], len(es)) {
			continue // every slot has the same byte here
		}
		var next [256]int
		for v, sum := 0, 0; v < 256; v++ {
			next[v], sum = sum, sum+c[v]
		}
		for i := range src {
			v := byte(src[i].slot >> (8 * d))
			dst[next[v]] = src[i]
			next[v]++
			if i%part == part-1 {
				p.tick(part * costSort / 2)
			}
		}
		src, dst = dst, src
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
	// The batch holds slots, not pointers (see flushBatch): find the
	// accounts and keys by walking them all, which a failure can afford.
	slots := func(es []batchEntry) map[uint32]bool {
		m := make(map[uint32]bool, len(es))
		for i := range es {
			m[es[i].slot] = true
		}
		return m
	}
	keys, accounts := slots(b.keys), slots(b.accounts)
	for _, e := range s.byID {
		if keys[e.slot] {
			a := e.cur.acct
			a.mu.Lock()
			s.markDirtyLocked(a, e)
			a.mu.Unlock()
		}
	}
	for _, a := range s.accounts {
		if accounts[a.slot] {
			a.mu.Lock()
			s.markDirtyLocked(a, nil)
			a.mu.Unlock()
		}
	}
}

// A pacer spreads a background flush over time, so that the Checks sharing
// its CPU (one core, often) see a light, steady load rather than a burst of
// tens of milliseconds. The work is scheduled evenly over flushAim of the
// time to the deadline: after each slice of
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
// something to run. A commit cannot be split: each part's is one burst of
// a few milliseconds (see defaultFlushPart).
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
