package keystore_test

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/prometheus/client_golang/prometheus"
	bolt "go.etcd.io/bbolt"

	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/money"
)

// replica is an open store with its outage journal.
type replica struct {
	t    testing.TB
	path string
	s    *keystore.Store
	j    *keystore.OutageJournal
}

func openReplica(t testing.TB, path string, o keystore.Options) *replica {
	t.Helper()
	s, err := keystore.Open(path, o)
	if err != nil {
		t.Fatal(err)
	}
	j, err := s.OutageJournal(o.Metrics)
	if err != nil {
		s.Close()
		t.Fatal(err)
	}
	r := &replica{t: t, path: path, s: s, j: j}
	t.Cleanup(func() { r.close() })
	return r
}

// close stops the replica cleanly: the journal, then the store.
func (r *replica) close() {
	r.t.Helper()
	if err := errors.Join(r.j.Close(), r.s.Close()); err != nil {
		r.t.Fatal(err)
	}
}

// crashCopy copies the file as it is on disk now, as a crash would leave
// it, and opens the copy: what a replica restarted after a crash reads.
// The caller makes sure no write is under way.
func (r *replica) crashCopy() *replica {
	r.t.Helper()
	b, err := os.ReadFile(r.path)
	if err != nil {
		r.t.Fatal(err)
	}
	path := filepath.Join(r.t.TempDir(), "crashed.db")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		r.t.Fatal(err)
	}
	return openReplica(r.t, path, keystore.Options{})
}

func (r *replica) pending() []keystore.OutageReport {
	r.t.Helper()
	p, err := r.j.Pending()
	if err != nil {
		r.t.Fatal(err)
	}
	return p
}

func (r *replica) append(keyID, account string, price money.Micros) {
	r.t.Helper()
	if err := r.j.Append(keystore.OutageSpend{Account: account, KeyID: keyID, Price: price}); err != nil {
		r.t.Fatal(err)
	}
}

func (r *replica) seal(replica string, seq uint64) {
	r.t.Helper()
	if err := r.j.Seal(replica, seq); err != nil {
		r.t.Fatal(err)
	}
}

func (r *replica) forget(replica string, seq uint64) {
	r.t.Helper()
	if err := r.j.Forget(replica, seq); err != nil {
		r.t.Fatal(err)
	}
}

func (r *replica) flush() {
	r.t.Helper()
	if err := r.j.Flush(); err != nil {
		r.t.Fatal(err)
	}
}

func wantPending(t testing.TB, what string, got, want []keystore.OutageReport) {
	t.Helper()
	if diff := cmp.Diff(want, got, cmpopts.EquateEmpty()); diff != "" {
		t.Errorf("%s: pending (-want +got):\n%s", what, diff)
	}
}

func spend(keyID, account string, price money.Micros) keystore.OutageSpend {
	return keystore.OutageSpend{Account: account, KeyID: keyID, Price: price}
}

// TestOutageJournalLifecycle walks a journal through an outage: appends
// summed per key, a seal, appends after it, a forget, with clean restarts
// in between, and checks what a restarted replica would replay.
func TestOutageJournalLifecycle(t *testing.T) {
	path := tempPath(t)
	r := openReplica(t, path, keystore.Options{})
	wantPending(t, "new journal", r.pending(), nil)

	r.append("key_b", "acme", 100)
	r.append("key_a", "acme", 30)
	r.append("key_b", "acme", 100)
	r.append("key_a", "zeta", 5) // another account's key of the same ID: kept apart
	unsealed := keystore.OutageReport{Spends: []keystore.OutageSpend{
		spend("key_a", "acme", 30), spend("key_a", "zeta", 5), spend("key_b", "acme", 200)}}
	wantPending(t, "appended", r.pending(), []keystore.OutageReport{unsealed})

	r.close() // Close writes the appends
	r = openReplica(t, path, keystore.Options{})
	wantPending(t, "reopened", r.pending(), []keystore.OutageReport{unsealed})

	r.seal("old-1", 7) // seals what the previous run left too
	sealed := keystore.OutageReport{Replica: "old-1", Seq: 7, Spends: unsealed.Spends}
	r.seal("old-1", 8) // nothing unsealed: no report
	r.append("key_c", "acme", 1)
	later := keystore.OutageReport{Spends: []keystore.OutageSpend{spend("key_c", "acme", 1)}}
	wantPending(t, "sealed, then appended", r.pending(), []keystore.OutageReport{sealed, later})

	r.close()
	r = openReplica(t, path, keystore.Options{})
	wantPending(t, "sealed, reopened", r.pending(), []keystore.OutageReport{sealed, later})

	r.seal("new-2", 1)
	second := keystore.OutageReport{Replica: "new-2", Seq: 1, Spends: later.Spends}
	r.forget("old-1", 7)
	r.forget("old-1", 99) // unknown: no error
	wantPending(t, "forgot the first", r.pending(), []keystore.OutageReport{second})
	r.close()
	r = openReplica(t, path, keystore.Options{})
	wantPending(t, "forgot the first, reopened", r.pending(), []keystore.OutageReport{second})

	r.forget("new-2", 1)
	r.close()
	r = openReplica(t, path, keystore.Options{})
	wantPending(t, "all forgotten", r.pending(), nil)
}

// TestOutageJournalCrash copies the file as a crash would leave it: a seal
// is on disk when Seal returns, appends and forgets once written behind.
func TestOutageJournalCrash(t *testing.T) {
	r := openReplica(t, tempPath(t), keystore.Options{})
	r.append("key_a", "acme", 100)
	r.append("key_a", "acme", 100)

	wantPending(t, "crash before any write", r.crashCopy().pending(), nil)

	r.seal("r1", 41)
	sealed := keystore.OutageReport{Replica: "r1", Seq: 41, Spends: []keystore.OutageSpend{spend("key_a", "acme", 200)}}
	r.append("key_b", "acme", 50) // after the seal, not yet written
	wantPending(t, "crash right after the seal", r.crashCopy().pending(), []keystore.OutageReport{sealed})

	r.flush()
	unsealed := keystore.OutageReport{Spends: []keystore.OutageSpend{spend("key_b", "acme", 50)}}
	wantPending(t, "crash after a write", r.crashCopy().pending(), []keystore.OutageReport{sealed, unsealed})

	r.forget("r1", 41)
	// Not yet written: a restarted replica resends the report, which Redis
	// ignores.
	wantPending(t, "crash before the forget is written", r.crashCopy().pending(), []keystore.OutageReport{sealed, unsealed})
	r.flush()
	wantPending(t, "crash after the forget is written", r.crashCopy().pending(), []keystore.OutageReport{unsealed})

	// A crash after a seal, then more spends and a clean stop on the
	// crashed copy: both the old seal and the new spends are kept.
	r.seal("r1", 42)
	c := r.crashCopy()
	c.append("key_b", "acme", 1)
	c.close()
	c = openReplica(t, c.path, keystore.Options{})
	wantPending(t, "the crashed copy restarted", c.pending(), []keystore.OutageReport{
		{Replica: "r1", Seq: 42, Spends: unsealed.Spends},
		{Spends: []keystore.OutageSpend{spend("key_b", "acme", 1)}},
	})
}

// journalModel is what a journal should hold in memory, and on disk.
type journalModel struct {
	mem, disk modelState
}

type modelState struct {
	sealed   []keystore.OutageReport
	unsealed map[[2]string]money.Micros
}

func (s modelState) clone() modelState {
	return modelState{sealed: slices.Clone(s.sealed), unsealed: maps.Clone(s.unsealed)}
}

func (s modelState) pending() []keystore.OutageReport {
	out := slices.Clone(s.sealed)
	if len(s.unsealed) > 0 {
		out = append(out, keystore.OutageReport{Spends: spends(s.unsealed)})
	}
	return out
}

func spends(m map[[2]string]money.Micros) []keystore.OutageSpend {
	var out []keystore.OutageSpend
	for _, k := range slices.SortedFunc(maps.Keys(m), func(a, b [2]string) int {
		return strings.Compare(a[0]+"\x00"+a[1], b[0]+"\x00"+b[1])
	}) {
		out = append(out, spend(k[0], k[1], m[k]))
	}
	return out
}

// TestOutageJournalModel runs random sequences of appends, seals, forgets,
// writes, clean restarts and crashes against a model: after each step the
// journal holds what the model does, and a crash leaves what the model
// says is on disk.
func TestOutageJournalModel(t *testing.T) {
	for seed := range uint64(4) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 1))
			r := openReplica(t, tempPath(t), keystore.Options{})
			m := journalModel{mem: modelState{unsealed: map[[2]string]money.Micros{}}, disk: modelState{unsealed: map[[2]string]money.Micros{}}}
			var seq uint64
			for step := range 150 {
				var what string
				switch n := rng.IntN(20); {
				case n < 10:
					k := [2]string{fmt.Sprintf("key_%d", rng.IntN(4)), fmt.Sprintf("acct%d", rng.IntN(2))}
					p := money.Micros(1 + rng.IntN(1000))
					what = fmt.Sprintf("append %v %d", k, p)
					r.append(k[0], k[1], p)
					m.mem.unsealed[k] += p
				case n < 13:
					seq++
					what = fmt.Sprintf("seal %d", seq)
					r.seal("r", seq)
					if len(m.mem.unsealed) > 0 {
						rep := keystore.OutageReport{Replica: "r", Seq: seq, Spends: spends(m.mem.unsealed)}
						m.mem.sealed = append(m.mem.sealed, rep)
						m.disk.sealed = append(m.disk.sealed, rep)
						clear(m.mem.unsealed)
						clear(m.disk.unsealed)
					}
				case n < 15 && len(m.mem.sealed) > 0:
					i := rng.IntN(len(m.mem.sealed))
					rep := m.mem.sealed[i]
					what = fmt.Sprintf("forget %d", rep.Seq)
					r.forget(rep.Replica, rep.Seq)
					m.mem.sealed = slices.Delete(m.mem.sealed, i, i+1)
				case n < 17:
					what = "write"
					r.flush()
					m.disk = m.mem.clone()
				case n < 18:
					what = "clean restart"
					r.close()
					r = openReplica(t, r.path, keystore.Options{})
					m.disk = m.mem.clone()
				case n < 19:
					what = "crash"
					c := r.crashCopy()
					r.close()
					r = c
					m.mem = m.disk.clone()
				default:
					continue
				}
				wantPending(t, fmt.Sprintf("step %d (%s)", step, what), r.pending(), m.mem.pending())
				if t.Failed() {
					return
				}
			}
		})
	}
}

// TestOutageJournalConcurrent appends from many goroutines while the
// journal is written behind and sealed, as the Run loop and the report
// loop do: every micro appended is held once, sealed or not, in memory,
// and on disk once written; a write never puts back spends a seal moved.
// Run it with -race.
func TestOutageJournalConcurrent(t *testing.T) {
	const (
		workers = 4
		seals   = 30
	)
	r := openReplica(t, tempPath(t), keystore.Options{})
	var wg sync.WaitGroup
	stop := make(chan struct{})
	stopped := func() bool {
		select {
		case <-stop:
			return true
		default:
			return false
		}
	}
	wg.Add(1)
	go func() { // the write-behind
		defer wg.Done()
		for !stopped() {
			if err := r.j.Flush(); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	wg.Add(1)
	go func() { // the report loop
		defer wg.Done()
		defer close(stop)
		for seq := uint64(1); seq <= seals; seq++ {
			if err := r.j.Seal("r", seq); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	appended := make([]money.Micros, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; !stopped(); i++ {
				sp := spend(fmt.Sprintf("key_%d", i%5), fmt.Sprintf("acct%d", w%3), money.Micros(1+w))
				if err := r.j.Append(sp); err != nil {
					t.Error(err)
					return
				}
				appended[w] += sp.Price
			}
		}()
	}
	wg.Wait()
	var want money.Micros
	for _, a := range appended {
		want += a
	}
	total := func(p []keystore.OutageReport) money.Micros {
		var sum money.Micros
		for _, rep := range p {
			for _, sp := range rep.Spends {
				sum += sp.Price
			}
		}
		return sum
	}
	if got := total(r.pending()); got != want {
		t.Errorf("journal holds %d micros, want %d", got, want)
	}
	if got := total(r.crashCopy().pending()); got > want {
		t.Errorf("the file holds %d micros, more than the %d appended", got, want)
	}
	r.flush()
	if got := total(r.crashCopy().pending()); got != want {
		t.Errorf("the file holds %d micros after a write, want %d", got, want)
	}
}

// TestOutageJournalWriteDuringSeal races a write-behind with a seal, round
// after round: the write must never put back, after the seal, the spends
// the seal moved (a restart would charge them twice). The race detector's
// scheduling makes a wrong interleaving likely; the check is exact.
func TestOutageJournalWriteDuringSeal(t *testing.T) {
	r := openReplica(t, tempPath(t), keystore.Options{})
	var want money.Micros
	for round := range 200 {
		r.append("key_a", "acme", 1)
		want++
		var wg sync.WaitGroup
		errs := make([]error, 2)
		wg.Add(2)
		go func() { defer wg.Done(); errs[0] = r.j.Flush() }()
		go func() { defer wg.Done(); errs[1] = r.j.Seal("r", uint64(round+1)) }()
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			t.Fatal(err)
		}
		c := r.crashCopy()
		var got money.Micros
		for _, rep := range c.pending() {
			for _, sp := range rep.Spends {
				got += sp.Price
			}
		}
		c.close()
		if got != want {
			t.Fatalf("round %d: the file holds %d micros, want the %d appended (all sealed)", round, got, want)
		}
	}
}

// TestOutageJournalRun: Run writes the appends within the store's flush
// interval; the metric says where the journal holds the spends.
func TestOutageJournalRun(t *testing.T) {
	reg := prometheus.NewRegistry()
	r := openReplica(t, tempPath(t), keystore.Options{FlushInterval: 10 * time.Millisecond, Metrics: reg})
	gauge := func(state string) float64 {
		return metric(t, reg, "keygate_outage_journal_micros", "state", state).GetGauge().GetValue()
	}
	r.append("key_a", "acme", 300)
	if got := gauge("unwritten"); got != 300 {
		t.Errorf("unwritten %v after an append, want 300", got)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- r.j.Run(ctx) }()
	deadline := time.Now().Add(10 * time.Second)
	for gauge("unwritten") != 0 { // the wait ends when Run has written it
		if time.Now().After(deadline) {
			t.Fatal("Run wrote nothing in 10s with a flush interval of 10ms")
		}
		time.Sleep(time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run: %v", err)
	}
	if got := gauge("written"); got != 300 {
		t.Errorf("written %v after Run wrote, want 300", got)
	}
	wantPending(t, "crash after Run wrote", r.crashCopy().pending(),
		[]keystore.OutageReport{{Spends: []keystore.OutageSpend{spend("key_a", "acme", 300)}}})

	r.seal("r", 1)
	if w, s := gauge("written"), gauge("sealed"); w != 0 || s != 300 {
		t.Errorf("after a seal: written %v sealed %v, want 0 300", w, s)
	}
	r.forget("r", 1)
	if s := gauge("sealed"); s != 0 {
		t.Errorf("after a forget: sealed %v, want 0", s)
	}
}

func TestOutageJournalArguments(t *testing.T) {
	r := openReplica(t, tempPath(t), keystore.Options{})
	appends := []struct {
		name string
		sp   keystore.OutageSpend
	}{
		{"zero price", spend("key_a", "acme", 0)},
		{"negative price", spend("key_a", "acme", -1)},
		{"price too large", spend("key_a", "acme", money.Max+1)},
		{"no key id", spend("", "acme", 1)},
		{"bad account", spend("key_a", "a b", 1)},
	}
	for _, tt := range appends {
		t.Run(tt.name, func(t *testing.T) {
			if err := r.j.Append(tt.sp); !errors.Is(err, keystore.ErrInvalid) {
				t.Errorf("Append(%+v) = %v, want ErrInvalid", tt.sp, err)
			}
		})
	}
	r.append("key_a", "acme", money.Max)
	if err := r.j.Append(spend("key_a", "acme", 1)); !errors.Is(err, keystore.ErrInvalid) {
		t.Errorf("Append beyond money.Max unsealed for a key = %v, want ErrInvalid", err)
	}
	seals := []struct {
		name    string
		replica string
		seq     uint64
	}{
		{"no replica", "", 1},
		{"seq 0", "r", 0},
		{"replica too long", strings.Repeat("r", 256), 1},
	}
	for _, tt := range seals {
		t.Run(tt.name, func(t *testing.T) {
			if err := r.j.Seal(tt.replica, tt.seq); !errors.Is(err, keystore.ErrInvalid) {
				t.Errorf("Seal(%q, %d) = %v, want ErrInvalid", tt.replica, tt.seq, err)
			}
		})
	}
	wantPending(t, "after refused calls", r.pending(),
		[]keystore.OutageReport{{Spends: []keystore.OutageSpend{spend("key_a", "acme", money.Max)}}})

	r.close()
	if err := r.j.Append(spend("key_a", "acme", 1)); !errors.Is(err, keystore.ErrClosed) {
		t.Errorf("Append after Close = %v, want ErrClosed", err)
	}
	if err := r.j.Seal("r", 1); !errors.Is(err, keystore.ErrClosed) {
		t.Errorf("Seal after Close = %v, want ErrClosed", err)
	}
	if err := r.j.Close(); err != nil {
		t.Errorf("second Close = %v", err)
	}
	if _, err := r.s.OutageJournal(nil); !errors.Is(err, keystore.ErrClosed) {
		t.Errorf("OutageJournal of a closed store = %v, want ErrClosed", err)
	}
}

// TestOutageJournalCorrupt: a journal record that does not decode fails
// the journal's load rather than dropping what is owed.
func TestOutageJournalCorrupt(t *testing.T) {
	path := tempPath(t)
	r := openReplica(t, path, keystore.Options{})
	r.append("key_a", "acme", 1)
	r.close()
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket([]byte("outage")).Put([]byte("u"), []byte{1, 0, 0, 1, 5, 'k', 'e', 'y', '_', 'a'})
	})
	if cerr := db.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	s := mustOpen(t, path) // the store itself still opens
	defer s.Close()
	if _, err := s.OutageJournal(nil); !errors.Is(err, keystore.ErrNotKeygate) {
		t.Errorf("OutageJournal of a corrupt record = %v, want ErrNotKeygate", err)
	}
}

// TestOutageJournalNoBucket: a store that never journaled has no outage
// bucket, and gets none from a journal that writes nothing.
func TestOutageJournalNoBucket(t *testing.T) {
	path := tempPath(t)
	r := openReplica(t, path, keystore.Options{})
	r.flush()
	r.close()
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	db.View(func(tx *bolt.Tx) error { //nolint:errcheck // returns nil
		if tx.Bucket([]byte("outage")) != nil {
			t.Error("the outage bucket exists in a store that journaled nothing")
		}
		return nil
	})
}

// BenchmarkOutageJournalAppend is the Check path's cost of an outage spend.
func BenchmarkOutageJournalAppend(b *testing.B) {
	r := openReplica(b, tempPath(b), keystore.Options{})
	sp := spend("key_a", "acme", 1)
	b.ReportAllocs()
	for b.Loop() {
		if err := r.j.Append(sp); err != nil {
			b.Fatal(err)
		}
	}
}

// TestOutageJournalKeep: a kept report is on disk when Keep returns (a
// crash copy has it), summed per key and account, beside the unsealed
// spends it does not touch, and goes once forgotten.
func TestOutageJournalKeep(t *testing.T) {
	r := openReplica(t, filepath.Join(t.TempDir(), "replica.db"), keystore.Options{})
	r.append("k1", "a", 7)
	err := r.j.Keep(keystore.OutageReport{Replica: "old", Seq: 4, Spends: []keystore.OutageSpend{
		spend("k2", "a", 100), spend("k1", "a", 30), spend("k2", "a", 50), spend("k3", "b", 0),
	}})
	if err != nil {
		t.Fatal(err)
	}
	kept := keystore.OutageReport{Replica: "old", Seq: 4, Spends: []keystore.OutageSpend{spend("k1", "a", 30), spend("k2", "a", 150)}}
	wantPending(t, "after Keep", r.pending(), []keystore.OutageReport{kept, {Spends: []keystore.OutageSpend{spend("k1", "a", 7)}}})
	c := r.crashCopy()
	wantPending(t, "crash copy after Keep", c.pending(), []keystore.OutageReport{kept})
	if err := r.j.Keep(keystore.OutageReport{Replica: "old", Seq: 5}); err != nil {
		t.Errorf("Keep of a report without spends: %v", err)
	}
	for _, bad := range []keystore.OutageReport{
		{Seq: 6, Spends: []keystore.OutageSpend{spend("k1", "a", 1)}},
		{Replica: "old", Spends: []keystore.OutageSpend{spend("k1", "a", 1)}},
		{Replica: "old", Seq: 6, Spends: []keystore.OutageSpend{spend("", "a", 1)}},
	} {
		if err := r.j.Keep(bad); !errors.Is(err, keystore.ErrInvalid) {
			t.Errorf("Keep(%+v) = %v, want ErrInvalid", bad, err)
		}
	}
	r.forget("old", 4)
	r.flush()
	wantPending(t, "crash copy after Forget", r.crashCopy().pending(), []keystore.OutageReport{{Spends: []keystore.OutageSpend{spend("k1", "a", 7)}}})
}
