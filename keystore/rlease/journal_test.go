package rlease

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/money"
	"github.com/keygate/keygate/keystore/rconn/rconntest"
)

// durable is a replica's local store and its outage journal.
type durable struct {
	t    testing.TB
	path string
	s    *keystore.Store
	j    *keystore.OutageJournal
}

func openDurable(t testing.TB, path string) *durable {
	t.Helper()
	s, err := keystore.Open(path, keystore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	j, err := s.OutageJournal(nil)
	if err != nil {
		s.Close()
		t.Fatal(err)
	}
	d := &durable{t: t, path: path, s: s, j: j}
	t.Cleanup(d.close)
	return d
}

func (d *durable) close() {
	if err := errors.Join(d.j.Close(), d.s.Close()); err != nil {
		d.t.Error(err)
	}
}

// crashed opens a copy of the file as it is on disk now: what the replica
// finds when it restarts after a crash.
func (d *durable) crashed() *durable {
	d.t.Helper()
	b, err := os.ReadFile(d.path)
	if err != nil {
		d.t.Fatal(err)
	}
	path := filepath.Join(d.t.TempDir(), "crashed.db")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		d.t.Fatal(err)
	}
	return openDurable(d.t, path)
}

// TestDurableJournalReplay is TestJournalReplay on the local store's
// journal, across a restart of the process: outage spends sealed into a
// report that Redis applied but whose reply was lost, and more spends not
// yet in a report; then the replica stops, cleanly or in a crash, and a
// new one on its file reports what it owes, each spend charged once. A
// crash before the write-behind loses the spends not yet written (the
// README's window), never the sealed ones.
func TestDurableJournalReplay(t *testing.T) {
	tests := []struct {
		name    string
		stop    func(d *durable) *durable // stops the old replica; returns the file the new one opens
		charged money.Micros
	}{
		{name: "clean stop", charged: 150, stop: func(d *durable) *durable {
			d.close()
			return openDurable(d.t, d.path)
		}},
		{name: "crash after the write-behind", charged: 150, stop: func(d *durable) *durable {
			if err := d.j.Flush(); err != nil {
				d.t.Fatal(err)
			}
			return d.crashed()
		}},
		{name: "crash before the write-behind", charged: 100, stop: func(d *durable) *durable {
			return d.crashed()
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := rconntest.Start(t)
			c := dial(t, srv)
			a := newAdmin(t, c)
			a.account("a", 1_000_000)
			k := a.key("k", "a", 0)
			d := openDurable(t, filepath.Join(t.TempDir(), "replica.db"))
			f := newFaultConn(c)
			old := ledger(t, f, LedgerOptions{ReplicaID: "old", Outage: AllowLocal, OutageAllowance: 1000, Journal: d.j})

			f.loseNext("lease", 1) // the lease call "fails": an outage spend
			if err := old.Spend(k, 100); err != nil {
				t.Fatal(err)
			}
			f.loseNext("report", 1) // applied by Redis, the reply lost
			if err := old.report(false); !errors.Is(err, errLostReply) {
				t.Fatalf("report: %v, want the lost reply", err)
			}
			f.loseNext("lease", 1)
			if err := old.Spend(k, 50); err != nil { // not yet in a report
				t.Fatal(err)
			}
			old.closed.Store(true) // stopped without its final report

			d = tt.stop(d)
			fresh := ledger(t, c, LedgerOptions{ReplicaID: "new", Outage: AllowLocal, OutageAllowance: 1000, Journal: d.j})
			for range 2 { // the second round charges nothing again
				if err := fresh.report(false); err != nil {
					t.Fatal(err)
				}
			}
			if bal, _ := a.acct("a"); bal != 1_000_000-tt.charged {
				t.Errorf("bal after the replay: %d, want %d", bal, 1_000_000-tt.charged)
			}
			if spent, _ := a.keyMoney("k"); spent != tt.charged {
				t.Errorf("key spent after the replay: %d, want %d", spent, tt.charged)
			}
			closeAll(t, fresh)
			// What Redis applied is forgotten on disk too: a third start
			// replays nothing.
			d.close()
			d = openDurable(t, d.path)
			if p, err := d.j.Pending(); err != nil || len(p) != 0 {
				t.Errorf("journal after the replay and a restart: %+v, %v; want empty", p, err)
			}
		})
	}
}

// TestLeaseSpendsKeptDuringOutage: spends made from a lease while Redis is
// down go into a report that cannot be sent; the journal keeps it, so a
// replica that crashes before Redis returns loses none of it: a new
// replica on the file charges it once, and the dead replica's lease comes
// back whole.
func TestLeaseSpendsKeptDuringOutage(t *testing.T) {
	srv, c, a, k := oneKey(t, 1_000_000)
	d := openDurable(t, filepath.Join(t.TempDir(), "replica.db"))
	old := ledger(t, c, LedgerOptions{ReplicaID: "old", Journal: d.j})
	if err := old.Spend(k, 100); err != nil { // leases 64 prices
		t.Fatal(err)
	}
	srv.Kill()
	for range 3 {
		if err := old.Spend(k, 100); err != nil {
			t.Fatalf("Spend from the lease during the outage: %v", err)
		}
	}
	if err := old.report(false); err == nil {
		t.Fatal("a report reached a dead Redis")
	}
	if got := old.unkept(); got != 0 {
		t.Errorf("%d micros of queued reports not kept in the journal", got)
	}
	old.closed.Store(true) // crashed: no final report

	d = d.crashed()
	srv.Restart()
	waitUp(t, c)
	fresh := ledger(t, c, LedgerOptions{ReplicaID: "new", Journal: d.j})
	for range 2 {
		if err := fresh.report(false); err != nil {
			t.Fatal(err)
		}
	}
	if bal, _ := a.acct("a"); bal != 1_000_000-400 {
		t.Errorf("bal after the replay: %d, want %d: four spends of 100", bal, 1_000_000-400)
	}
	// The old replica's lease returns once Redis counts it dead.
	a.markDead("old")
	if err := fresh.heartbeat(); err != nil {
		t.Fatal(err)
	}
	if bal, leased := a.acct("a"); bal != 1_000_000-400 || leased != 0 {
		t.Errorf("after the reclaim: bal %d leased %d, want %d 0", bal, leased, 1_000_000-400)
	}
	closeAll(t, fresh)
}

// failingSeal is a journal whose Seal fails while fail is set.
type failingSeal struct {
	*MemJournal
	fail bool
}

func (j *failingSeal) Seal(replica string, seq uint64) error {
	if j.fail {
		return errors.New("test: disk full")
	}
	return j.MemJournal.Seal(replica, seq)
}

// TestSealFailureHoldsTheReport: when the journal cannot seal outage
// spends, the report carrying them is not sent (were it applied, a
// restart would charge the still unsealed spends again); the next report,
// once the seal works, charges them once.
func TestSealFailureHoldsTheReport(t *testing.T) {
	_, c, a, k := oneKey(t, 1_000_000)
	f := newFaultConn(c)
	j := &failingSeal{MemJournal: &MemJournal{}, fail: true}
	l := ledger(t, f, LedgerOptions{ReplicaID: "r", Outage: AllowLocal, OutageAllowance: 1000, Journal: j})
	f.loseNext("lease", 1)
	if err := l.Spend(k, 100); err != nil {
		t.Fatal(err)
	}
	if err := l.report(false); err != nil {
		t.Fatal(err)
	}
	if bal, _ := a.acct("a"); bal != 1_000_000 {
		t.Fatalf("bal %d after a report whose seal failed, want it untouched", bal)
	}
	if _, _, extra := l.local("k"); extra != 100 {
		t.Fatalf("the key holds %d outage micros after the failed seal, want them back: 100", extra)
	}
	j.fail = false
	for range 2 {
		if err := l.report(false); err != nil {
			t.Fatal(err)
		}
	}
	if bal, _ := a.acct("a"); bal != 1_000_000-100 {
		t.Errorf("bal %d once the seal works, want %d", bal, 1_000_000-100)
	}
	if p, _ := j.Pending(); len(p) != 0 {
		t.Errorf("journal after the report: %+v, want empty", p)
	}
}

// TestRestartKeepsOutageAllowance: what the journal still owes counts
// against the allowance of a replica restarted during the same outage.
func TestRestartKeepsOutageAllowance(t *testing.T) {
	srv, c, _, k := oneKey(t, 1_000_000)
	d := openDurable(t, filepath.Join(t.TempDir(), "replica.db"))
	srv.Kill()
	old := ledger(t, c, LedgerOptions{ReplicaID: "old", Outage: AllowLocal, OutageAllowance: 300, Journal: d.j})
	allowed := 0
	for range 5 {
		if old.Spend(k, 100) == nil {
			allowed++
		}
	}
	old.closed.Store(true)
	d.close()
	d = openDurable(t, d.path)
	fresh := ledger(t, c, LedgerOptions{ReplicaID: "new", Outage: AllowLocal, OutageAllowance: 300, Journal: d.j})
	for range 5 {
		if fresh.Spend(k, 100) == nil {
			allowed++
		}
	}
	if allowed != 3 {
		t.Errorf("%d spends of 100 allowed through a restart during one outage, want the allowance of 300: 3", allowed)
	}
}

// TestCloseDuringOutageKeepsSpends: Close while Redis is down succeeds
// once the journal holds every charge; the next start charges them.
func TestCloseDuringOutageKeepsSpends(t *testing.T) {
	srv, c, a, k := oneKey(t, 1_000_000)
	d := openDurable(t, filepath.Join(t.TempDir(), "replica.db"))
	old := ledger(t, c, LedgerOptions{ReplicaID: "old", Journal: d.j})
	for range 2 {
		if err := old.Spend(k, 100); err != nil {
			t.Fatal(err)
		}
	}
	srv.Kill()
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	if err := old.Close(ctx); err != nil {
		t.Fatalf("Close during an outage with a journal: %v", err)
	}
	d.close()
	d = openDurable(t, d.path)
	srv.Restart()
	waitUp(t, c)
	fresh := ledger(t, c, LedgerOptions{ReplicaID: "new", Journal: d.j})
	if err := fresh.report(false); err != nil {
		t.Fatal(err)
	}
	if bal, _ := a.acct("a"); bal != 1_000_000-200 {
		t.Errorf("bal %d after the next start, want %d", bal, 1_000_000-200)
	}
	closeAll(t, fresh)
}
