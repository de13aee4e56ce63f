package keystore

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	bolt "go.etcd.io/bbolt"
	"go.uber.org/zap"

	"github.com/keygate/keygate/keystore/money"
)

// account is the live state of one account. Every Key of the account points
// to it, whichever index snapshot the Key came from, so a debit made through
// a Key fetched before an admin write still lands on the one balance.
type account struct {
	mu sync.Mutex // guards the fields up to dirtyKeys; never held during disk I/O

	balance  money.Micros
	reserved money.Micros // for settlement after the response; 0 until then
	// dirty is set when balance or a key's spend changed since the last
	// flush; the account is then on the store's dirty stack, linked through
	// nextDirty, and its changed keys are linked from dirtyKeys.
	dirty     bool
	nextDirty *account
	dirtyKeys *keyEntry

	// Immutable after creation.
	id        string
	tier      string
	createdAt int64

	keys []*keyEntry // guarded by Store.mu; written with Store.wmu held too
}

// keyEntry is the long-lived state of one key: its spend and what only
// operators read. Published Keys are immutable and replaced on revocation;
// they all point to the same entry. It is 64 bytes: a million keys count.
type keyEntry struct {
	// Guarded by the account's mu. nextDirty is nil while the spend is
	// flushed, else the next changed key of the account (Store.endOfList
	// ends the list, so that nil can mean "clean").
	spent     money.Micros
	nextDirty *keyEntry

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
// ErrSpendCap. A price of 0 always passes. It works in memory under the
// account's mutex only: Run and Flush write the result to disk in batches.
func (s *Store) Debit(k *Key, price money.Micros) error {
	if price == 0 {
		return nil
	}
	if price < 0 || price > money.Max {
		return errNegativePrice
	}
	a, e := k.acct, k.entry
	a.mu.Lock()
	switch {
	case a.balance < price:
		a.mu.Unlock()
		return ErrInsufficientBalance
	case k.SpendCap > 0 && e.spent+price > k.SpendCap: // both <= money.Max: no overflow
		a.mu.Unlock()
		return ErrSpendCap
	}
	a.balance -= price
	e.spent += price
	s.markDirtyLocked(a, e)
	a.mu.Unlock()
	return nil
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
	for {
		head := s.dirty.Load()
		a.nextDirty = head
		if s.dirty.CompareAndSwap(head, a) {
			return
		}
	}
}

// Run flushes the ledger every FlushInterval until ctx is done, then returns
// nil. A failed flush is logged and counted, and its values are retried with
// the next one. Run does not flush on the way out: the caller drains the
// Checks that may still debit and then calls Close (or Flush).
func (s *Store) Run(ctx context.Context) error {
	t := time.NewTicker(s.flushEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			err := s.Flush()
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
// bbolt transaction. Values are copied under each account's mutex and
// written after it is released, so Checks never wait on the disk. If the
// write fails, the values stay marked and the next flush writes them.
func (s *Store) Flush() error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if s.closed {
		return ErrClosed
	}
	return s.flushLocked()
}

// flushBatch holds one flush's snapshot; the Store keeps it between flushes
// so that a steady flusher does not allocate.
type flushBatch struct {
	accounts []flushAccount
	keys     []flushKey
	values   []byte
}

type flushAccount struct {
	a       *account
	balance money.Micros
}

type flushKey struct {
	a     *account
	e     *keyEntry
	spent money.Micros
}

// flushLocked is Flush with s.wmu held.
func (s *Store) flushLocked() error {
	start := time.Now()
	b := &s.batch
	b.accounts, b.keys = b.accounts[:0], b.keys[:0]
	for a := s.dirty.Swap(nil); a != nil; {
		a.mu.Lock()
		next := a.nextDirty
		a.nextDirty, a.dirty = nil, false
		b.accounts = append(b.accounts, flushAccount{a: a, balance: a.balance})
		for e := a.dirtyKeys; e != nil && e != s.endOfList; {
			n := e.nextDirty
			e.nextDirty = nil
			b.keys = append(b.keys, flushKey{a: a, e: e, spent: e.spent})
			e = n
		}
		a.dirtyKeys = nil
		a.mu.Unlock()
		a = next
	}
	n := len(b.accounts) + len(b.keys)
	if n == 0 {
		return nil
	}
	// Sorted keys make bbolt's puts sequential. s.wmu is held, so cur and
	// its ID are stable.
	slices.SortFunc(b.accounts, func(x, y flushAccount) int { return cmpString(x.a.id, y.a.id) })
	slices.SortFunc(b.keys, func(x, y flushKey) int { return cmpString(x.e.cur.ID, y.e.cur.ID) })
	// bbolt keeps a reference to each value until the commit: one buffer
	// holds them all.
	b.values = slices.Grow(b.values[:0], 8*n)[:8*n]
	err := s.db.Update(func(tx *bolt.Tx) error {
		vals := b.values
		bal, sp := tx.Bucket(bucketBalances), tx.Bucket(bucketSpend)
		for _, f := range b.accounts {
			if err := bal.Put([]byte(f.a.id), putMicros(vals[:8:8], f.balance)); err != nil {
				return fmt.Errorf("balance of %s: %w", f.a.id, err)
			}
			vals = vals[8:]
		}
		for _, f := range b.keys {
			if err := sp.Put([]byte(f.e.cur.ID), putMicros(vals[:8:8], f.spent)); err != nil {
				return fmt.Errorf("spend of %s: %w", f.e.cur.ID, err)
			}
			vals = vals[8:]
		}
		return nil
	})
	if err != nil {
		s.remark(b)
		err = fmt.Errorf("flush %d balances and %d spends: %w", len(b.accounts), len(b.keys), err)
	}
	s.metrics.observe(err, start, n)
	clear(b.accounts) // drop pointers so the batch pins nothing
	clear(b.keys)
	return err
}

// remark marks a failed flush's accounts and keys dirty again. Their current
// values, not the snapshot, are written next time.
func (s *Store) remark(b *flushBatch) {
	for _, f := range b.keys {
		f.a.mu.Lock()
		s.markDirtyLocked(f.a, f.e)
		f.a.mu.Unlock()
	}
	for _, f := range b.accounts {
		f.a.mu.Lock()
		s.markDirtyLocked(f.a, nil)
		f.a.mu.Unlock()
	}
}

func cmpString(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
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
}

// newLedgerMetrics builds the ledger's metrics and registers them with reg
// when it is not nil. A collector already registered under the same name (a
// second store in one registry, as in tests) is shared rather than refused.
func newLedgerMetrics(reg prometheus.Registerer) (*ledgerMetrics, error) {
	flushes, err := register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: metricFlushes,
		Help: "Ledger flushes that had balances or spends to write, by result.",
	}, []string{"result"}))
	if err != nil {
		return nil, err
	}
	duration, err := register(reg, prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    metricDuration,
		Help:    "Time taken by one ledger flush, from the snapshot to the fsync.",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14), // 0.5ms .. 4s
	}))
	if err != nil {
		return nil, err
	}
	entries, err := register(reg, prometheus.NewCounter(prometheus.CounterOpts{
		Name: metricEntries,
		Help: "Balances and key spends written by successful ledger flushes.",
	}))
	if err != nil {
		return nil, err
	}
	return &ledgerMetrics{
		ok:       flushes.WithLabelValues("ok"),
		failed:   flushes.WithLabelValues("error"),
		duration: duration,
		entries:  entries,
	}, nil
}

func register[C prometheus.Collector](reg prometheus.Registerer, c C) (C, error) {
	if reg == nil {
		return c, nil
	}
	err := reg.Register(c)
	if err == nil {
		return c, nil
	}
	var are prometheus.AlreadyRegisteredError
	if errors.As(err, &are) {
		if existing, ok := are.ExistingCollector.(C); ok {
			return existing, nil
		}
	}
	return c, fmt.Errorf("register ledger metrics: %w", err)
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
