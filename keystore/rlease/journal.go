package rlease

import (
	"slices"
	"sync"

	"github.com/keygate/keygate/keystore"
)

// OutageSpend is one spend allowed from the local allowance while Redis was
// unavailable (outage policy AllowLocal). It is keystore's, so that the
// store's durable journal (keystore.OutageJournal) can keep it.
type OutageSpend = keystore.OutageSpend

// A JournalReport is the outage spends carried by report Seq of Replica, or,
// with Seq 0, spends appended and not yet given to a report.
type JournalReport = keystore.OutageReport

// A Journal keeps outage spends durably until Redis has applied them, so
// that a replica restarted before Redis came back still reports them, and
// reports them once: a spend is sealed into a numbered report before the
// report is sent, and a restarted replica resends sealed reports under
// their old number, which Redis ignores when it has applied them.
//
// The Ledger calls Append from Spend (the spend is allowed only when Append
// returns nil), Seal and Forget from its report loop, Pending once from
// NewLedger. A Journal must be safe for concurrent use; Seal never overlaps
// an Append.
type Journal interface {
	// Append records an outage spend.
	Append(s OutageSpend) error
	// Seal assigns every spend appended since the last Seal to report seq of
	// replica, which is about to be sent.
	Seal(replica string, seq uint64) error
	// Keep writes report r as sealed, as it is, without touching the
	// unsealed spends: a report built but not applied while Redis is down,
	// whose charges (spends from leases) the journal never saw.
	Keep(r JournalReport) error
	// Forget drops report seq of replica: Redis has applied it.
	Forget(replica string, seq uint64) error
	// Pending returns the sealed reports not forgotten, in the order they
	// were sealed, then the unsealed spends (Seq 0), if any.
	Pending() ([]JournalReport, error)
}

// The replica's local store keeps a durable Journal.
var _ Journal = (*keystore.OutageJournal)(nil)

// MemJournal is a Journal in memory: it survives Redis outages, not
// restarts. The zero value is ready to use.
type MemJournal struct {
	mu       sync.Mutex
	unsealed []OutageSpend   // guarded by mu
	sealed   []JournalReport // guarded by mu
}

var _ Journal = (*MemJournal)(nil)

// Append implements Journal.
func (j *MemJournal) Append(s OutageSpend) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.unsealed = append(j.unsealed, s)
	return nil
}

// Seal implements Journal.
func (j *MemJournal) Seal(replica string, seq uint64) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	if len(j.unsealed) == 0 {
		return nil
	}
	j.sealed = append(j.sealed, JournalReport{Replica: replica, Seq: seq, Spends: j.unsealed})
	j.unsealed = nil
	return nil
}

// Keep implements Journal.
func (j *MemJournal) Keep(r JournalReport) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.sealed = append(j.sealed, JournalReport{Replica: r.Replica, Seq: r.Seq, Spends: slices.Clone(r.Spends)})
	return nil
}

// Forget implements Journal.
func (j *MemJournal) Forget(replica string, seq uint64) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.sealed = slices.DeleteFunc(j.sealed, func(r JournalReport) bool {
		return r.Replica == replica && r.Seq == seq
	})
	return nil
}

// Pending implements Journal.
func (j *MemJournal) Pending() ([]JournalReport, error) {
	j.mu.Lock()
	defer j.mu.Unlock()
	out := make([]JournalReport, 0, len(j.sealed)+1)
	for _, r := range j.sealed {
		out = append(out, JournalReport{Replica: r.Replica, Seq: r.Seq, Spends: slices.Clone(r.Spends)})
	}
	if len(j.unsealed) > 0 {
		out = append(out, JournalReport{Spends: slices.Clone(j.unsealed)})
	}
	return out, nil
}
