package keystore

import (
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	bolt "go.etcd.io/bbolt"
	"go.uber.org/zap"

	"github.com/keygate/keygate/keystore/metric"
	"github.com/keygate/keygate/keystore/money"
)

// In store: redis mode a replica may allow spends while Redis is down (the
// outage policy local_allowance) and charge them once Redis is back. What
// it owes must survive a restart in between, so the replica's own file,
// otherwise a cache of key records, journals those spends: the
// OutageJournal. Its records are rlease's (as type aliases there); its
// protocol is rlease.Journal's: spends are appended, sealed into a
// numbered report just before the report goes to Redis, and forgotten once
// Redis applied it. A restarted replica resends the sealed reports under
// their old number, which Redis applies at most once, and reports the
// unsealed spends afresh.
//
// The journal keeps everything in memory and mirrors it to the outage
// bucket:
//
//	"u"            the unsealed spends, as a report of no replica and seq 0
//	"s" + seq[8]   a sealed report; seq is the bucket's sequence, so the
//	               keys sort in the order the reports were sealed
//
// Appends are written behind, like the ledger's debits: the Check path
// never waits on the disk, and a crash loses at most one flush interval of
// them. Seal is fsync'd before it returns, since a sealed report is sent
// next: were the seal lost in a crash after Redis applied the report, the
// spends would come back unsealed and be charged twice. Forget is written
// behind too (a sealed report resent is ignored by Redis).

// OutageSpend is one spend allowed from the local allowance while Redis was
// unavailable, or in the journal the sum of such spends of one key.
type OutageSpend struct {
	Account string
	KeyID   string
	Price   money.Micros
}

// An OutageReport is the outage spends carried by report Seq of Replica,
// or, with Seq 0 (and no Replica), spends appended and not yet sealed into
// a report. The journal keeps one spend per key and account, the sum of
// its prices, ordered by KeyID then Account.
type OutageReport struct {
	Replica string
	Seq     uint64
	Spends  []OutageSpend
}

// maxReplicaLen bounds a replica's name in a sealed report.
const maxReplicaLen = 255

var (
	unsealedKey   = []byte("u")
	sealedPrefix  = []byte("s")
	sealedKeySize = len(sealedPrefix) + 8
)

// spendOf names the spends the journal sums together.
type spendOf struct{ keyID, account string }

// sealedReport is a sealed report and where it lies in the bucket.
type sealedReport struct {
	key   []byte
	r     OutageReport
	total money.Micros
}

// OutageJournal is the store's durable journal of outage spends (see
// above). It implements rlease.Journal. It is safe for concurrent use.
type OutageJournal struct {
	s   *Store
	log *zap.Logger

	// wmu serialises the journal's disk writes (flushes, seals, Close), so
	// that a flush never writes spends a seal has moved. Taken before mu.
	wmu sync.Mutex

	// mu guards the fields below. Only Seal holds it across a disk write,
	// and rlease never appends during a seal.
	mu        sync.Mutex
	unsealed  map[spendOf]money.Micros // every unsealed spend, summed per key and account
	dirty     bool                     // unsealed or forgotten changed since the last write
	sealed    []sealedReport           // in the order sealed
	forgotten [][]byte                 // keys of sealed reports to delete at the next write
	closed    bool
	// totals are the micros by state, for the metric: written under mu,
	// read by scrapes without it.
	totals [journalStates]atomic.Int64
}

// States of the journal's spends, as the metric keygate_outage_journal_micros
// labels them: in memory only (a crash loses them), on disk unsealed, and
// sealed into a report that Redis has not acknowledged.
const (
	stateUnwritten = iota
	stateWritten
	stateSealed
	journalStates
)

var journalStateNames = [journalStates]string{"unwritten", "written", "sealed"}

// OutageJournal loads the store's outage journal. Call it once per Store:
// two journals on one file would overwrite each other's unsealed spends.
// reg, if not nil, receives the metric keygate_outage_journal_micros.
// A journal record that does not decode fails with ErrNotKeygate: it is
// money owed, and is not dropped silently.
func (s *Store) OutageJournal(reg prometheus.Registerer) (*OutageJournal, error) {
	j := &OutageJournal{s: s, log: s.log, unsealed: make(map[spendOf]money.Micros)}
	s.lock()
	defer s.wmu.Unlock()
	if s.closed {
		return nil, ErrClosed
	}
	err := s.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketOutage)
		if b == nil {
			return nil // nothing journaled yet: made at the first write
		}
		return b.ForEach(j.loadRecord)
	})
	if err != nil {
		return nil, fmt.Errorf("%s: %w: outage journal: %w", s.path, ErrNotKeygate, err)
	}
	for state, name := range journalStateNames {
		_, err := metric.Register(reg, prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name:        "keygate_outage_journal_micros",
			Help:        "Outage spends this replica owes Redis, by where its journal holds them: unwritten (memory only), written (on disk), sealed (in a report Redis has not acknowledged).",
			ConstLabels: prometheus.Labels{"state": name},
		}, func() float64 { return float64(j.totals[state].Load()) }))
		if err != nil {
			return nil, err
		}
	}
	if n := len(j.sealed); n > 0 || len(j.unsealed) > 0 {
		s.log.Info("outage journal holds spends not yet charged in Redis", zap.Int("sealed_reports", n),
			zap.Int("unsealed_keys", len(j.unsealed)),
			zap.Int64("micros", j.totals[stateWritten].Load()+j.totals[stateSealed].Load()))
	}
	return j, nil
}

// loadRecord takes one record of the outage bucket into memory.
func (j *OutageJournal) loadRecord(k, v []byte) error {
	r, err := decodeOutageReport(v)
	if err != nil {
		return fmt.Errorf("record %q: %w", k, err)
	}
	total := r.total()
	switch {
	case bytes.Equal(k, unsealedKey) && r.Seq == 0:
		for _, sp := range r.Spends {
			j.unsealed[spendOf{sp.KeyID, sp.Account}] = sp.Price
		}
		j.totals[stateWritten].Store(int64(total))
	case len(k) == sealedKeySize && bytes.HasPrefix(k, sealedPrefix) && r.Seq != 0:
		j.sealed = append(j.sealed, sealedReport{key: bytes.Clone(k), r: r, total: total})
		j.totals[stateSealed].Add(int64(total))
	default:
		return fmt.Errorf("%w: record %q of seq %d is out of place", errRecord, k, r.Seq)
	}
	return nil
}

// Append records an outage spend, in memory: the journal's next write (at
// most a flush interval later) puts it on disk. It fails with ErrInvalid
// for a spend the journal could not write back (a bad ID, a price out of
// range, a key's unsealed sum beyond money.Max) and ErrClosed after Close.
func (j *OutageJournal) Append(sp OutageSpend) error {
	if sp.Price <= 0 || sp.Price > money.Max {
		return fmt.Errorf("%w: outage spend of %d", ErrInvalid, sp.Price)
	}
	if err := validateName(sp.KeyID); err != nil {
		return fmt.Errorf("%w: outage spend key id %v", ErrInvalid, err)
	}
	if err := validateAccountID(sp.Account); err != nil {
		return err
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.closed {
		return ErrClosed
	}
	at := spendOf{sp.KeyID, sp.Account}
	cur := j.unsealed[at]
	if cur > money.Max-sp.Price {
		return fmt.Errorf("%w: key %s owes more than %s unsealed", ErrInvalid, sp.KeyID, money.Max)
	}
	j.unsealed[at] = cur + sp.Price
	j.dirty = true
	j.totals[stateUnwritten].Add(int64(sp.Price))
	return nil
}

// Seal moves every unsealed spend into report seq of replica, on disk
// (fsync'd) when it returns nil. With nothing unsealed it writes nothing.
// Appends wait while it writes (rlease never appends during a seal).
func (j *OutageJournal) Seal(replica string, seq uint64) error {
	if replica == "" || len(replica) > maxReplicaLen || seq == 0 {
		return fmt.Errorf("%w: seal of report %d of replica %q", ErrInvalid, seq, replica)
	}
	j.wmu.Lock()
	defer j.wmu.Unlock()
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.closed {
		return ErrClosed
	}
	if len(j.unsealed) == 0 {
		return nil
	}
	r := OutageReport{Replica: replica, Seq: seq, Spends: j.unsealedLocked()}
	v := r.appendTo(nil)
	key, err := j.putSealed(v, true)
	if err != nil {
		return fmt.Errorf("outage journal seal of report %d: %w", seq, err)
	}
	total := r.total()
	j.sealed = append(j.sealed, sealedReport{key: key, r: r, total: total})
	clear(j.unsealed)
	j.totals[stateUnwritten].Store(0)
	j.totals[stateWritten].Store(0)
	j.totals[stateSealed].Add(int64(total))
	return nil
}

// Keep writes report r as a sealed report, as it is, on disk (fsync'd)
// when it returns nil; the unsealed spends are not touched. It is for a
// report built and not yet applied while Redis is down, which carries
// spends the journal never saw (those made from leases): kept, a restart
// resends it under its own number, and Redis applies it at most once.
// Spends of one key and account are summed; a report with no spend is
// not written.
func (j *OutageJournal) Keep(r OutageReport) error {
	if r.Replica == "" || len(r.Replica) > maxReplicaLen || r.Seq == 0 {
		return fmt.Errorf("%w: kept report %d of replica %q", ErrInvalid, r.Seq, r.Replica)
	}
	sums := make(map[spendOf]money.Micros, len(r.Spends))
	for _, sp := range r.Spends {
		if sp.Price <= 0 {
			continue
		}
		if err := validateName(sp.KeyID); err != nil {
			return fmt.Errorf("%w: kept spend key id %v", ErrInvalid, err)
		}
		if err := validateAccountID(sp.Account); err != nil {
			return err
		}
		at := spendOf{sp.KeyID, sp.Account}
		if sp.Price > money.Max-sums[at] {
			return fmt.Errorf("%w: key %s owes more than %s in one report", ErrInvalid, sp.KeyID, money.Max)
		}
		sums[at] += sp.Price
	}
	if len(sums) == 0 {
		return nil
	}
	kept := OutageReport{Replica: r.Replica, Seq: r.Seq, Spends: make([]OutageSpend, 0, len(sums))}
	for at, p := range sums {
		kept.Spends = append(kept.Spends, OutageSpend{Account: at.account, KeyID: at.keyID, Price: p})
	}
	slices.SortFunc(kept.Spends, compareSpends)
	v := kept.appendTo(nil)
	j.wmu.Lock()
	defer j.wmu.Unlock()
	j.mu.Lock()
	closed := j.closed
	j.mu.Unlock()
	if closed {
		return ErrClosed
	}
	key, err := j.putSealed(v, false)
	if err != nil {
		return fmt.Errorf("outage journal: keep report %d: %w", r.Seq, err)
	}
	total := kept.total()
	j.mu.Lock()
	defer j.mu.Unlock()
	j.sealed = append(j.sealed, sealedReport{key: key, r: kept, total: total})
	j.totals[stateSealed].Add(int64(total))
	return nil
}

// Forget drops report seq of replica, which Redis has applied. The journal's
// next write deletes it from disk; should a crash come first, the report is
// resent after the restart, and Redis ignores it. An unknown report is no
// error.
func (j *OutageJournal) Forget(replica string, seq uint64) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.closed {
		return ErrClosed
	}
	i := slices.IndexFunc(j.sealed, func(r sealedReport) bool { return r.r.Replica == replica && r.r.Seq == seq })
	if i < 0 {
		return nil
	}
	j.forgotten = append(j.forgotten, j.sealed[i].key)
	j.totals[stateSealed].Add(-int64(j.sealed[i].total))
	j.sealed = slices.Delete(j.sealed, i, i+1)
	j.dirty = true
	return nil
}

// Pending returns the sealed reports not forgotten, in the order they were
// sealed, then the unsealed spends as a report of seq 0, if any. The
// caller may keep and change what it returns.
func (j *OutageJournal) Pending() ([]OutageReport, error) {
	j.mu.Lock()
	defer j.mu.Unlock()
	out := make([]OutageReport, 0, len(j.sealed)+1)
	for _, r := range j.sealed {
		out = append(out, OutageReport{Replica: r.r.Replica, Seq: r.r.Seq, Spends: slices.Clone(r.r.Spends)})
	}
	if len(j.unsealed) > 0 {
		out = append(out, OutageReport{Spends: j.unsealedLocked()})
	}
	return out, nil
}

// Flush writes what changed since the last write: the unsealed spends and
// the forgotten reports. Run calls it every flush interval of the store.
func (j *OutageJournal) Flush() error {
	j.wmu.Lock()
	defer j.wmu.Unlock()
	return j.flushLocked()
}

// flushLocked is Flush; the caller holds wmu. The unsealed spends only
// grow until a seal, which wmu keeps out, so writing a copy taken under mu
// never puts back spends a seal has moved.
func (j *OutageJournal) flushLocked() error {
	j.mu.Lock()
	if !j.dirty || j.closed {
		j.mu.Unlock()
		return nil
	}
	r := OutageReport{Spends: j.unsealedLocked()}
	forgotten := j.forgotten
	j.forgotten, j.dirty = nil, false
	j.mu.Unlock()

	var v []byte
	if len(r.Spends) > 0 {
		v = r.appendTo(nil)
	}
	err := j.update(func(b *bolt.Bucket) error {
		for _, k := range forgotten {
			if err := b.Delete(k); err != nil {
				return err
			}
		}
		if v == nil {
			return b.Delete(unsealedKey)
		}
		return b.Put(unsealedKey, v)
	})
	j.mu.Lock()
	defer j.mu.Unlock()
	if err != nil {
		j.forgotten = append(forgotten, j.forgotten...)
		j.dirty = true
		return fmt.Errorf("outage journal write: %w", err)
	}
	written := r.total()
	j.totals[stateWritten].Store(int64(written))
	j.totals[stateUnwritten].Store(int64(j.unsealedTotalLocked() - written))
	return nil
}

// Run writes the journal every flush interval of the store until ctx is
// done, then returns nil. A failed write is logged and retried with the
// next one. It does not write on the way out: Close does.
func (j *OutageJournal) Run(ctx context.Context) error {
	t := time.NewTicker(j.s.flushEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			switch err := j.Flush(); {
			case errors.Is(err, ErrClosed):
				return nil
			case err != nil:
				j.log.Error("outage journal write; retrying with the next one", zap.Error(err))
			}
		}
	}
}

// Close writes what is still in memory; later Appends, Seals and Forgets
// fail with ErrClosed. Close it before its Store. It is safe to call more
// than once.
func (j *OutageJournal) Close() error {
	j.wmu.Lock()
	defer j.wmu.Unlock()
	err := j.flushLocked()
	j.mu.Lock()
	j.closed = true
	j.mu.Unlock()
	return err
}

// putSealed writes the sealed report record v under the bucket's next
// sequence, deleting the unsealed spends in the same transaction when
// dropUnsealed (a seal moved them into v), and returns its key.
func (j *OutageJournal) putSealed(v []byte, dropUnsealed bool) (key []byte, err error) {
	err = j.update(func(b *bolt.Bucket) error {
		n, err := b.NextSequence()
		if err != nil {
			return err
		}
		key = binary.BigEndian.AppendUint64(bytes.Clone(sealedPrefix), n)
		if err := b.Put(key, v); err != nil {
			return err
		}
		if dropUnsealed {
			return b.Delete(unsealedKey)
		}
		return nil
	})
	return key, err
}

// update runs fn on the outage bucket, made if missing, in one fsync'd
// write transaction of the store.
func (j *OutageJournal) update(fn func(*bolt.Bucket) error) error {
	s := j.s
	s.lock()
	defer s.wmu.Unlock()
	if s.closed {
		return ErrClosed
	}
	return s.db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(bucketOutage)
		if err != nil {
			return err
		}
		return fn(b)
	})
}

// unsealedLocked returns the unsealed spends in the journal's order. The
// caller holds mu.
func (j *OutageJournal) unsealedLocked() []OutageSpend {
	out := make([]OutageSpend, 0, len(j.unsealed))
	for at, p := range j.unsealed {
		out = append(out, OutageSpend{Account: at.account, KeyID: at.keyID, Price: p})
	}
	slices.SortFunc(out, compareSpends)
	return out
}

// unsealedTotalLocked is the sum of the unsealed spends. The caller holds mu.
func (j *OutageJournal) unsealedTotalLocked() money.Micros {
	var t money.Micros
	for _, p := range j.unsealed {
		t += p
	}
	return t
}

func compareSpends(a, b OutageSpend) int {
	return cmp.Or(cmp.Compare(a.KeyID, b.KeyID), cmp.Compare(a.Account, b.Account))
}

// total is the sum of r's prices; the metric's value, so it saturates
// rather than wraps.
func (r *OutageReport) total() money.Micros {
	var t money.Micros
	for _, sp := range r.Spends {
		t = min(t+sp.Price, money.Max) // each term is at most money.Max: no overflow
	}
	return t
}

// An outage report record:
//
//	v1 | replica | seq (uvarint) | n (uvarint) | n × {key_id | account | price}
//
// Strings are a uvarint length then the bytes, the price a varint. The
// spends are sorted by key id then account, one per pair, each priced from
// 1 to money.Max. The unsealed spends are a report of no replica and seq 0.
func (r *OutageReport) appendTo(dst []byte) []byte {
	dst = append(dst, recordV1)
	dst = appendString(dst, r.Replica)
	dst = binary.AppendUvarint(dst, r.Seq)
	dst = binary.AppendUvarint(dst, uint64(len(r.Spends)))
	for _, sp := range r.Spends {
		dst = appendString(dst, sp.KeyID)
		dst = appendString(dst, sp.Account)
		dst = binary.AppendVarint(dst, int64(sp.Price))
	}
	return dst
}

// minSpendLen is the fewest bytes a spend takes in a record: two one-byte
// IDs with their lengths, and a one-byte price.
const minSpendLen = 5

func decodeOutageReport(b []byte) (OutageReport, error) {
	d := decoder{b: b}
	var r OutageReport
	d.version()
	r.Replica = string(d.bytes(maxReplicaLen))
	r.Seq = d.uvarint()
	if d.err == nil && (r.Seq == 0) != (r.Replica == "") {
		d.fail("report %d of replica %q", r.Seq, r.Replica)
	}
	n := d.uvarint()
	if d.err == nil && n > uint64(len(b)-d.off)/minSpendLen {
		d.fail("%d spends in %d bytes", n, len(b)-d.off)
	}
	if d.err == nil && n > 0 {
		r.Spends = make([]OutageSpend, 0, n)
	}
	for i := uint64(0); i < n && d.err == nil; i++ {
		sp := OutageSpend{KeyID: string(d.bytes(maxIDLen)), Account: string(d.bytes(maxIDLen)), Price: money.Micros(d.varint())}
		if d.err != nil {
			break
		}
		switch {
		case validateName(sp.KeyID) != nil || validateName(sp.Account) != nil:
			d.fail("spend %d: bad key id %q or account %q", i, sp.KeyID, sp.Account)
		case sp.Price <= 0 || sp.Price > money.Max:
			d.fail("spend %d: price %d out of range", i, sp.Price)
		case len(r.Spends) > 0 && compareSpends(r.Spends[len(r.Spends)-1], sp) >= 0:
			d.fail("spend %d: out of order", i)
		}
		r.Spends = append(r.Spends, sp)
	}
	if err := d.finish(); err != nil {
		return OutageReport{}, err
	}
	return r, nil
}
