package keystore

import (
	"cmp"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/keygate/keygate/keystore/money"
)

// TestFlushFailureRetries makes a flush fail (the file is read-only
// underneath the store) and checks that the values stay dirty: the next
// flush writes them, with no debit in between to mark them again.
func TestFlushFailureRetries(t *testing.T) {
	path := t.TempDir() + "/keygate.db"
	s, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	if _, err := s.CreateAccount("acme", "", 100, now); err != nil {
		t.Fatal(err)
	}
	info, secret, err := s.CreateKey(NewKey{Account: "acme", Scopes: []string{"a"}}, now)
	if err != nil {
		t.Fatal(err)
	}
	k, _ := s.Lookup(secret, now)
	if err := s.Debit(k, 10); err != nil {
		t.Fatal(err)
	}

	// Swap in a read-only handle: writes fail.
	s.wmu.Lock()
	if err := s.db.Close(); err != nil {
		t.Fatal(err)
	}
	ro, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	s.db = ro
	s.wmu.Unlock()
	if err := s.Flush(); err == nil {
		t.Fatal("Flush on a read-only file succeeded")
	}

	s.wmu.Lock()
	ro.Close()
	if s.db, err = bolt.Open(path, 0o600, nil); err != nil {
		t.Fatal(err)
	}
	s.wmu.Unlock()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	r, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	a, _ := r.Account("acme")
	got, _ := r.Key(info.ID)
	if a.Balance != 90 || got.Spent != 10 {
		t.Errorf("after a failed flush and a good one: balance %d, spent %d; want 90 and 10", a.Balance, got.Spent)
	}
}

// TestSortBySlot checks the flush's radix sort against a plain sort, on
// slots that are dense, sparse, equal in some bytes, or at the ends of the
// range.
func TestSortBySlot(t *testing.T) {
	rnd := rand.New(rand.NewPCG(1, 2))
	gens := map[string]func(i int) uint32{
		"dense":          func(i int) uint32 { return uint32(rnd.IntN(20_000)) },
		"sparse":         func(int) uint32 { return rnd.Uint32() },
		"one block":      func(int) uint32 { return 7*slotsPerBlock + uint32(rnd.IntN(slotsPerBlock)) },
		"high bytes":     func(int) uint32 { return uint32(rnd.IntN(4)) << 24 },
		"ends of range":  func(i int) uint32 { return []uint32{0, 1, noSlot - 1, noSlot - 2}[i%4] },
		"already sorted": func(i int) uint32 { return uint32(i) * 3 },
	}
	for name, gen := range gens {
		t.Run(name, func(t *testing.T) {
			for _, n := range []int{0, 1, 2, 100, 10_000} {
				es := make([]batchEntry, n)
				for i := range es {
					es[i] = batchEntry{slot: gen(i), val: money.Micros(i), period: int32(i), last: i%3 == 0}
				}
				want := slices.Clone(es)
				slices.SortStableFunc(want, func(x, y batchEntry) int { return cmp.Compare(x.slot, y.slot) })
				got, other := sortBySlot(es, make([]batchEntry, 3), nil)
				// A radix sort is stable: the same entries, whole, in the
				// same order as a stable sort's.
				if !slices.Equal(got, want) {
					t.Fatalf("n=%d: the sort differs from a stable sort by slot", n)
				}
				if len(other) != 0 || cap(other) < n {
					t.Errorf("n=%d: the other buffer has len %d, cap %d; want 0 and at least %d", n, len(other), cap(other), n)
				}
			}
		})
	}
}

// TestPacerDelay: the pause after a slice of work keeps the flush on a
// schedule that spreads its work evenly over flushAim of the time to the
// deadline, but to no less than flushShare of a CPU; it is zero when the
// flush is behind or told to hurry.
func TestPacerDelay(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	const (
		w       = 100 * time.Microsecond
		longest = w * 19 // at flushShare
	)
	// A flush whose deadline is span after its start is due to have done
	// a tenth of its work 10ms after it.
	aim := flushAim
	span := time.Duration(float64(100*time.Millisecond) / aim)
	tests := []struct {
		name        string
		hurry       bool
		started     time.Duration // before now
		deadline    time.Duration // after the start
		done, total float64
		want        time.Duration
	}{
		{"on schedule", false, 10 * time.Millisecond, span, 10, 100, 0},
		{"ahead", false, 9 * time.Millisecond, span, 10, 100, time.Millisecond},
		{"further ahead", false, 9500 * time.Microsecond, span, 11, 100, 1500 * time.Microsecond},
		{"ahead by more than flushShare allows", false, 9 * time.Millisecond, span, 11, 100, longest},
		{"far ahead: flushShare", false, time.Millisecond, span, 50, 100, longest},
		{"behind", false, 20 * time.Millisecond, span, 10, 100, 0},
		{"past the deadline", false, 2 * span, span, 50, 100, 0},
		{"no estimate", false, 0, time.Hour, 0, 0, longest},
		{"more done than estimated", false, time.Millisecond, time.Hour, 120, 100, longest},
		{"more done than estimated, late", false, 2 * span, span, 120, 100, 0},
		{"hurry", true, time.Millisecond, time.Hour, 10, 100, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			start := now.Add(-tt.started)
			p := &pacer{
				deadline: start.Add(tt.deadline),
				hurry:    func() bool { return tt.hurry },
				start:    start,
				total:    tt.total, done: tt.done,
			}
			got := p.delay(now, w)
			if diff := got - tt.want; diff < -time.Microsecond || diff > time.Microsecond {
				t.Errorf("delay = %v, want %v", got, tt.want)
			}
		})
	}
}

// TestPacedFlush runs a paced flush while debits land on accounts it has
// already copied and on accounts it has not (the pacer's hurry hook debits
// at every pause, from inside the flush): each account's balance and its
// key's spend reach the file together, and the debits made after an
// account was copied are written by the next flush.
func TestPacedFlush(t *testing.T) {
	path := t.TempDir() + "/keygate.db"
	s, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	const n, opening = 3000, 1_000_000
	accounts := make([]ImportAccount, n)
	nks := make([]NewKey, n)
	for i := range n {
		accounts[i] = ImportAccount{ID: fmt.Sprintf("acct-%05d", i), Balance: opening}
		nks[i] = NewKey{Account: accounts[i].ID, Scopes: []string{"a"}}
	}
	imported, err := s.Import(accounts, nks, now)
	if err != nil {
		t.Fatal(err)
	}
	var keys []*Key
	for _, ik := range imported {
		k, _ := s.Lookup(ik.Secret, now)
		keys = append(keys, k)
	}
	for _, k := range keys {
		if err := s.Debit(k, 1); err != nil {
			t.Fatal(err)
		}
	}
	rnd := rand.New(rand.NewPCG(3, 4))
	pauses := 0
	err = s.flush(&pacer{
		deadline: time.Now().Add(100 * time.Millisecond),
		hurry: func() bool {
			pauses++
			for range 20 {
				if err := s.Debit(keys[rnd.IntN(n)], 3); err != nil {
					t.Error(err)
				}
			}
			return false
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	if pauses == 0 {
		t.Fatal("the paced flush never paused")
	}
	if s.dirty.Load() == nil {
		t.Error("debits made during the flush left nothing to flush")
	}
	check := func(what string, st *Store) {
		t.Helper()
		for i, k := range keys {
			a, _ := st.Account(k.Account())
			info, _ := st.Key(k.ID)
			if a.Balance+info.Spent != opening || info.Spent == 0 {
				t.Fatalf("%s: account %d: balance %d + spend %d, want %d with a spend", what, i, a.Balance, info.Spent, opening)
			}
		}
	}
	c, err := Open(copyFile(t, path), Options{})
	if err != nil {
		t.Fatal(err)
	}
	check("a crash after the paced flush", c)
	c.Close()
	if err := s.Flush(); err != nil {
		t.Fatal(err)
	}
	c, err = Open(copyFile(t, path), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	check("a crash after the next flush", c)
	for _, k := range keys {
		want, _ := s.Key(k.ID)
		if got, _ := c.Key(k.ID); got.Spent != want.Spent {
			t.Fatalf("key %s: spend %d on disk after the next flush, %d in memory", k.ID, got.Spent, want.Spent)
		}
	}
}

// copyFile copies the file of an open store, as a crash would leave it.
func copyFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	p := t.TempDir() + "/copy.db"
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestCreditDuringPacedFlush: an admin write that arrives while a paced
// flush holds the store waits for it (the flush stops pausing), then runs;
// the file ends up with both, consistent.
func TestCreditDuringPacedFlush(t *testing.T) {
	path := t.TempDir() + "/keygate.db"
	s, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	const n = 2000
	accounts := make([]ImportAccount, n)
	nks := make([]NewKey, n)
	for i := range n {
		accounts[i] = ImportAccount{ID: fmt.Sprintf("acct-%05d", i), Balance: 1000}
		nks[i] = NewKey{Account: accounts[i].ID, Scopes: []string{"a"}}
	}
	imported, err := s.Import(accounts, nks, now)
	if err != nil {
		t.Fatal(err)
	}
	for _, ik := range imported {
		k, _ := s.Lookup(ik.Secret, now)
		if err := s.Debit(k, 10); err != nil {
			t.Fatal(err)
		}
	}
	paused := make(chan struct{})
	var once sync.Once
	hurried := false
	flushed := make(chan error, 1)
	go func() {
		flushed <- s.flush(&pacer{
			deadline: time.Now().Add(time.Hour), // left alone, it would pause for a long while
			hurry: func() bool {
				once.Do(func() { // let the Credit start, and wait until it waits
					close(paused)
					for s.waiting.Load() == 0 {
						time.Sleep(time.Millisecond)
					}
				})
				hurried = s.waiting.Load() > 0
				return hurried
			},
		})
	}()
	<-paused
	if _, err := s.Credit("acct-00000", 5); err != nil {
		t.Fatal(err)
	}
	if err := <-flushed; err != nil {
		t.Fatal(err)
	}
	if !hurried {
		t.Error("the paced flush did not see the waiting Credit")
	}
	c, err := Open(copyFile(t, path), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for i, ik := range imported {
		a, _ := c.Account(accounts[i].ID)
		k, _ := c.Key(ik.ID)
		want := money.Micros(990)
		if i == 0 {
			want += 5
		}
		if a.Balance != want || k.Spent != 10 {
			t.Fatalf("account %d on disk: balance %d, spent %d; want %d and 10", i, a.Balance, k.Spent, want)
		}
	}
}

// TestFlushCrashBetweenParts flushes a block per part and copies
// the file after each part's commit, as a crash there would leave it. Each
// copy must be safe to restart from: every balance and spend is either
// before or after the flush; a key whose account's balance is written has
// its spend written (a cap never counts fewer debits than the balance);
// a settled reservation is gone once its charge is in the balance (no
// double charge at expiry); an account that raised an alert has it in the
// outbox exactly when its values are written. The last copy is the whole
// flush.
func TestFlushCrashBetweenParts(t *testing.T) {
	path := t.TempDir() + "/keygate.db"
	s, err := Open(path, Options{Outbox: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	// Enough accounts and keys for several ledger blocks of each.
	const accounts, keysPer = 600, 2
	var (
		ids  [accounts]string
		keys [accounts][keysPer]*Key
	)
	ias := make([]ImportAccount, accounts)
	nks := make([]NewKey, 0, accounts*keysPer)
	for i := range accounts {
		ids[i] = fmt.Sprintf("acct-%d", i)
		ias[i] = ImportAccount{ID: ids[i], Balance: 1000}
		for range keysPer {
			nks = append(nks, NewKey{Account: ids[i], Scopes: []string{"a"}, SpendCap: 100})
		}
	}
	imported, err := s.Import(ias, nks, now)
	if err != nil {
		t.Fatal(err)
	}
	for i := range accounts {
		for j := range keysPer {
			keys[i][j], _ = s.Lookup(imported[i*keysPer+j].Secret, now)
		}
	}
	// The account that raises an alert, and the one that settles a
	// reservation, in blocks apart: the settled charge's blocks are
	// written before the last transaction.
	alerted, settled, open := 3, -1, 6
	blocksOf := func(i int) (a uint32, k [keysPer]uint32) {
		for j := range keysPer {
			k[j] = keys[i][j].entry.slot / slotsPerBlock
		}
		return keys[i][0].acct.slot / slotsPerBlock, k
	}
	aa, ak := blocksOf(alerted)
	for i := range accounts {
		ba, bk := blocksOf(i)
		if i != open && ba != aa && !slices.Contains(ak[:], bk[0]) && !slices.Contains(ak[:], bk[1]) {
			settled = i
			break
		}
	}
	if settled < 0 {
		t.Fatal("no account has its blocks apart from the alerted one's")
	}
	// Before: a first flush, so that every spend has a value on disk.
	for i := range accounts {
		for j := range keysPer {
			if err := s.Debit(keys[i][j], 1); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := s.Flush(); err != nil {
		t.Fatal(err)
	}
	// Then a flush with a reservation of 7 on the settled account and one
	// of 4 on the open one. The flush under test: every key spends 2 more,
	// twice; the alerted account's first key crosses half its cap (an
	// alert); the settled account settles its reservation (its record is
	// deleted, its charge debited); the open one keeps its own.
	for i := range accounts {
		for j := range keysPer {
			if err := s.Debit(keys[i][j], 2); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := s.Reserve(keys[settled][0], "req-settled", 7, 7, now.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if err := s.Reserve(keys[open][0], "req-open", 4, 4, now.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if err := s.Flush(); err != nil { // both reservations on disk, open
		t.Fatal(err)
	}
	if got, _ := s.Settle("req-settled", true, 0, false); got != SettleCommitted {
		t.Fatalf("Settle: %v", got)
	}
	for i := range accounts {
		for j := range keysPer {
			if err := s.Debit(keys[i][j], 2); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := s.Debit(keys[alerted][0], 50); err != nil {
		t.Fatal(err)
	}
	type state struct {
		balance  money.Micros
		reserved money.Micros
		spent    [keysPer]money.Micros
	}
	read := func(st *Store) (out [accounts]state) {
		for i := range accounts {
			a, err := st.Account(ids[i])
			if err != nil {
				t.Fatal(err)
			}
			out[i].balance, out[i].reserved = a.Balance, a.Reserved
			for j := range keysPer {
				k, err := st.Key(keys[i][j].ID)
				if err != nil {
					t.Fatal(err)
				}
				out[i].spent[j] = k.Spent
			}
		}
		return out
	}
	old := func() (out [accounts]state) {
		r, err := Open(copyFile(t, path), Options{Outbox: true})
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		return read(r)
	}()
	want := read(s)

	var copies []string
	s.flushPart = blockUnits
	s.afterPart = func() { copies = append(copies, copyFile(t, path)) }
	if err := s.Flush(); err != nil {
		t.Fatal(err)
	}
	// The reservation; 5 blocks of spends and 3 of balances, less those
	// of the alerted account, which the last transaction holds.
	if len(copies) < 6 {
		t.Fatalf("the flush committed %d parts; want at least 6", len(copies))
	}
	for c, p := range copies {
		r, err := Open(p, Options{Outbox: true})
		if err != nil {
			t.Fatal(err)
		}
		got := read(r)
		alerts, err := r.PendingAlerts()
		if err != nil {
			t.Fatal(err)
		}
		r.Close()
		for i := range accounts {
			g, o, w := got[i], old[i], want[i]
			if g.balance != o.balance && g.balance != w.balance {
				t.Errorf("copy %d: %s's balance is %d; want %d or %d", c, ids[i], g.balance, o.balance, w.balance)
			}
			for j := range keysPer {
				if g.spent[j] != o.spent[j] && g.spent[j] != w.spent[j] {
					t.Errorf("copy %d: %s key %d spent %d; want %d or %d", c, ids[i], j, g.spent[j], o.spent[j], w.spent[j])
				}
				if g.balance == w.balance && g.spent[j] != w.spent[j] {
					t.Errorf("copy %d: %s's balance is written but key %d's spend is not", c, ids[i], j)
				}
			}
		}
		if got[settled].balance == want[settled].balance && got[settled].reserved != 0 {
			t.Errorf("copy %d: the settled reservation's charge is on disk and so is the reservation (%d reserved): a restart charges it twice", c, got[settled].reserved)
		}
		var inOutbox bool
		for _, a := range alerts {
			inOutbox = inOutbox || a.Account == ids[alerted]
		}
		if bal, spent := got[alerted].balance == want[alerted].balance, got[alerted].spent[0] == want[alerted].spent[0]; inOutbox != bal || inOutbox != spent {
			t.Errorf("copy %d: %s's alert in the outbox: %v; its balance written: %v, the spend that raised it: %v", c, ids[alerted], inOutbox, bal, spent)
		}
	}
	last := copies[len(copies)-1]
	r, err := Open(last, Options{Outbox: true})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if got := read(r); got != want {
		t.Errorf("after the whole flush:\n got %+v\nwant %+v", got, want)
	}
}
