package rlease

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/money"
)

// A batch is one report: one reportScript call with one sequence number.
// Once built it is sent as is until Redis answers, so that a retry after a
// lost reply carries the same seq and is applied once.
type batch struct {
	replica  string
	seq      uint64
	mode     string // reportScript's: "hb", "final", or "" for another replica's journal
	sealed   bool   // in the journal (sealed or kept): Forget it once applied
	returned money.Micros
	entries  []entry
}

// entry is one key's line of a report: what build took from the key's
// state, which is also what a dropped batch puts back.
type entry struct {
	st              *keyState // nil in a journal replay
	keyID, account  string
	acctKey, keyKey string
	used            money.Micros // spent from the lease: charged, and released
	extra           money.Micros // spent beyond leases (outage spends, a journal replay): charged only
	lease           money.Micros // the unspent lease given back: released only
	epoch           uint64       // st.epoch when built
	period          int64        // the key's cap period number when built; 0: none (or unknown)
	cap             money.Micros // the key's cap when built, for alerts; 0: none
}

// charge is what the entry takes from the balance and adds to the spend.
func (e *entry) charge() money.Micros { return e.used + e.extra }

// release is what the entry takes off the leased amounts.
func (e *entry) release() money.Micros { return e.used + e.lease }

// report sends what was spent since the last report and the idle leases
// (every lease when final), in as many calls as the keys need. Batches
// Redis did not answer stay queued and go first, unchanged, next time.
// The alerts that the applied batches crossed go to Options.Alerts, once
// the round is over and rmu released.
func (l *Ledger) report(final bool) error {
	alerts, err := l.reportRound(final)
	if len(alerts) > 0 && l.o.Alerts != nil {
		l.o.Alerts(alerts)
	}
	return err
}

// reportRound is report under rmu; it returns the alerts of the batches
// Redis applied, whether or not a later one failed.
//
// While Redis does not answer, with a journal, the spends still go into
// reports (those with charges only, so that the queue does not grow by a
// report a second through a long outage), and every queued report that
// carries charges is kept in the journal: a replica stopped or crashed
// during the outage loses none of what it spent from its leases.
func (l *Ledger) reportRound(final bool) ([]keystore.Alert, error) {
	l.rmu.Lock()
	defer l.rmu.Unlock()
	var alerts []keystore.Alert
	err := l.drain(&alerts)
	if err == nil {
		l.build(l.now(), final, false)
		err = l.drain(&alerts)
	} else if l.o.Journal != nil {
		l.build(l.now(), final, true)
	}
	if err != nil && l.o.Journal != nil {
		l.keep()
	}
	return alerts, err
}

// keep writes each queued report that carries charges and is not yet in
// the journal into it, as it is. The caller holds rmu.
func (l *Ledger) keep() {
	for _, b := range l.queue {
		if b.sealed {
			continue
		}
		r := JournalReport{Replica: b.replica, Seq: b.seq}
		for _, e := range b.entries {
			if c := e.charge(); c > 0 {
				r.Spends = append(r.Spends, OutageSpend{Account: e.account, KeyID: e.keyID, Price: c})
			}
		}
		if len(r.Spends) == 0 {
			continue
		}
		if err := l.o.Journal.Keep(r); err != nil {
			l.log.Error("outage journal: a report Redis has not applied could not be kept; a crash now loses its charges",
				zap.Uint64("seq", b.seq), zap.Error(err))
			continue
		}
		b.sealed = true
	}
}

// unkept returns the charges of the queued reports that are not in the
// journal: what this replica would lose if it stopped now.
func (l *Ledger) unkept() money.Micros {
	l.rmu.Lock()
	defer l.rmu.Unlock()
	var t money.Micros
	for _, b := range l.queue {
		if !b.sealed {
			for _, e := range b.entries {
				t += e.charge()
			}
		}
	}
	return t
}

// drain sends the queued batches in order, stopping at the first failure,
// and appends the alerts they crossed to alerts. The caller holds rmu.
func (l *Ledger) drain(alerts *[]keystore.Alert) error {
	for len(l.queue) > 0 {
		if err := l.send(l.queue[0], alerts); err != nil {
			return err
		}
		l.queue[0] = nil
		l.queue = l.queue[1:]
	}
	return nil
}

// build moves what every key spent since the last report, and its lease
// when idle (or final), into batches on the queue: idle means unused for
// idleAfter when the key or its account is contended, else for keepIdle.
// Keys with outage spends go into the first batch, so that the journal
// can seal them under one seq; if the seal fails, that batch is not
// queued and its keys get back what it took. With chargesOnly, keys
// without charges are left as they are. The caller holds rmu.
func (l *Ledger) build(at time.Time, final, chargesOnly bool) {
	now := at.UnixNano()
	j := l.o.Journal
	if j != nil {
		l.jmu.Lock() // no Append between moving the spends and sealing them
		defer l.jmu.Unlock()
	}
	var outage, rest []entry
	var returned money.Micros
	for _, s := range l.keys.all() {
		s.mu.Lock()
		if chargesOnly && s.used+s.extra == 0 {
			s.mu.Unlock()
			continue
		}
		e := entry{st: s, keyID: s.id, account: s.account, acctKey: s.acctKey, keyKey: s.keyKey,
			used: s.used, extra: s.extra, epoch: s.epoch, period: periodIndex(s.period, at), cap: s.cap}
		idle := now - s.lastUse
		if s.lease > 0 && (final || idle >= int64(keepIdle) || idle >= int64(idleAfter) && l.isContended(s, now)) {
			e.lease = s.lease
			returned += s.lease
			s.lease = 0
		}
		hasExtra, unsure := s.extra > 0, s.unsure > 0
		s.used, s.extra = 0, 0
		forget := s.lease == 0 && s.unsure == 0 && e.charge() == 0 && e.release() == 0 &&
			now-s.lastUse >= int64(forgetAfter)
		s.mu.Unlock()
		switch {
		case hasExtra:
			outage = append(outage, e)
		case e.charge() > 0 || e.release() > 0 || unsure:
			rest = append(rest, e)
		case forget:
			l.keys.removeIf(s.id, s, dropIfIdle(now))
		}
	}
	mode := "hb"
	var batches []*batch
	if len(outage) > 0 && j != nil {
		// Sealed before the batch is queued: a batch carrying spends that
		// the journal still holds unsealed would be charged twice after a
		// restart.
		if err := j.Seal(l.o.ReplicaID, l.seq+1); err != nil {
			l.log.Error("outage journal seal; its spends wait for the next report", zap.Error(err))
			for _, e := range outage {
				returned -= e.lease
				e.st.mu.Lock()
				e.st.used += e.used
				e.st.extra += e.extra
				e.st.lease += e.lease
				e.st.mu.Unlock()
			}
			outage = nil
		}
	}
	if len(outage) > 0 {
		batches = append(batches, &batch{entries: outage, sealed: j != nil})
	}
	for len(rest) > 0 {
		n := min(len(rest), maxBatch)
		batches = append(batches, &batch{entries: rest[:n:n]})
		rest = rest[n:]
	}
	if final && len(batches) == 0 {
		batches = append(batches, &batch{})
	}
	for _, b := range batches {
		l.seq++
		b.replica, b.seq, b.mode = l.o.ReplicaID, l.seq, mode
	}
	if final {
		batches[len(batches)-1].mode = "final"
	}
	if len(batches) > 0 {
		batches[0].returned = returned // counted once the first batch is applied; close enough for a counter
	}
	l.queue = append(l.queue, batches...)
}

// dropIfIdle returns the test for removing a key's state: still empty and
// idle. It marks the state removed, so that a Spend holding it looks again.
func dropIfIdle(now int64) func(*keyState) bool {
	return func(s *keyState) bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.lease != 0 || s.used != 0 || s.extra != 0 || s.unsure != 0 || now-s.lastUse < int64(forgetAfter) {
			return false
		}
		s.removed = true
		return true
	}
}

// reportStride is how many values reportScript returns per entry.
const reportStride = 4

// Values of reportScript's first result.
const (
	reportIgnored  = 0 // seq already applied: nothing changed
	reportApplied  = 1 // applied by this call
	reportReplayed = 2 // applied before, its reply lost: the values are the saved ones
)

// send applies b in Redis, then makes each key agree with what Redis says
// this replica holds for it, and appends the alerts that b's charges
// crossed to alerts. The caller holds rmu.
func (l *Ledger) send(b *batch, alerts *[]keystore.Alert) error {
	keys := make([]string, 0, 4+2*len(b.entries))
	keys = append(keys, l.c.Key("reports", b.replica), l.c.Key("lease", b.replica), l.kReplicas,
		l.c.Key("reported", b.replica))
	args := make([]any, 0, 3+4*len(b.entries))
	args = append(args, b.seq, b.replica, b.mode)
	for _, e := range b.entries {
		keys = append(keys, e.acctKey, e.keyKey)
		args = append(args, e.keyID, int64(e.charge()), int64(e.release()), e.period)
	}
	sent := l.now().UnixNano()
	var res []int64
	err := l.c.Call(context.Background(), "report", func(ctx context.Context, r *redis.Client) error {
		var err error
		res, err = reportScript.Run(ctx, r, keys, args...).Int64Slice()
		return err
	})
	if want := 1 + reportStride*len(b.entries); err == nil && len(res) != want {
		err = fmt.Errorf("report script: %d values, want %d", len(res), want)
	}
	if err != nil {
		l.markDown(err)
		return fmt.Errorf("report %d: %w", b.seq, err)
	}
	if b.mode == "hb" {
		l.markUp(sent, l.live.Load())
	}
	how := res[0]
	var at time.Time
	for i, e := range b.entries {
		v := res[1+reportStride*i : 1+reportStride*(i+1)]
		if e.st != nil {
			l.settle(e.st, e.epoch, money.Micros(v[0]))
		}
		if how == reportIgnored || e.charge() <= 0 || l.o.Alerts == nil {
			continue
		}
		if at.IsZero() {
			at = l.now()
		}
		spent, bal := money.Micros(v[1]), money.Micros(v[2])
		*alerts = append(*alerts, keystore.Crossings(keystore.Crossing{
			KeyID: e.keyID, Account: e.account, Cap: e.cap,
			SpentBefore: spent - e.charge(), SpentAfter: spent,
			AlertBelow:    money.Micros(v[3]),
			BalanceBefore: bal + e.charge(), BalanceAfter: bal,
		}, l.o.Thresholds, at)...)
	}
	if how == reportReplayed {
		l.log.Info("a report whose reply was lost had been applied; its alerts are raised now", zap.Uint64("seq", b.seq))
	}
	if b.returned > 0 {
		l.m.returned.Add(float64(b.returned))
	}
	if b.sealed {
		if err := l.o.Journal.Forget(b.replica, b.seq); err != nil {
			// Redis ignores the report if it is ever resent: no harm.
			l.log.Warn("outage journal forget", zap.Uint64("seq", b.seq), zap.Error(err))
		}
	}
	return nil
}

// settle makes s agree with held, what Redis holds for this replica and
// key after a report, when no lease call started since the report was
// built (one that did may be counted by Redis and not yet here, or the
// reverse). Redis holding more is a lease whose reply was lost: adopted.
// Redis holding less is a reclaim: dropped.
func (l *Ledger) settle(s *keyState, epoch uint64, held money.Micros) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.epoch != epoch {
		return
	}
	if s.unsure > 0 {
		s.unsure--
	}
	if more := held - (s.lease + s.used); more > 0 {
		s.lease += more
		l.log.Info("adopted a lease whose reply was lost", zap.String("key_id", s.id), zap.Int64("micros", int64(more)))
		return
	}
	l.shrink(s, held)
}

// replay queues the journal's pending outage spends: sealed reports to be
// resent under their own replica and seq (applied once whatever happened
// before the restart), unsealed spends onto their keys, to go with the
// next report. Everything the journal still owes counts against the
// current outage's allowance: a replica restarted during an outage does
// not get a fresh one.
func (l *Ledger) replay() error {
	pending, err := l.o.Journal.Pending()
	if err != nil {
		return fmt.Errorf("outage journal: %w", err)
	}
	for _, r := range pending {
		for _, sp := range r.Spends {
			s := l.keys.get(sp.KeyID)
			if s == nil {
				s = l.keys.add(sp.KeyID, l.newState(sp.KeyID, sp.Account))
			}
			s.outageUsed = min(s.outageUsed+sp.Price, money.Max)
			if r.Seq == 0 {
				s.extra += sp.Price
			}
		}
		if r.Seq == 0 {
			continue
		}
		b := &batch{replica: r.Replica, seq: r.Seq, sealed: true}
		for _, sp := range r.Spends {
			i := slices.IndexFunc(b.entries, func(e entry) bool { return e.keyID == sp.KeyID })
			if i < 0 {
				b.entries = append(b.entries, entry{keyID: sp.KeyID, account: sp.Account,
					acctKey: l.c.Key("acct", sp.Account), keyKey: l.c.Key("key", sp.KeyID)})
				i = len(b.entries) - 1
			}
			b.entries[i].extra += sp.Price
		}
		l.queue = append(l.queue, b)
		if r.Replica == l.o.ReplicaID {
			l.seq = max(l.seq, r.Seq)
		}
	}
	if n := len(l.queue); n > 0 {
		l.log.Info("outage spends from the journal will be reported", zap.Int("reports", n))
	}
	return nil
}
