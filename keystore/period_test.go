package keystore

import (
	"bytes"
	"encoding/binary"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	bolt "go.etcd.io/bbolt"

	"github.com/keygate/keygate/keystore/money"
)

// These are the internal tests of what schema 2 added: cap periods, the
// 12-byte spend that carries one, the records' new fields, the reservation
// record, and a failed flush's retry of reservations and alerts.

func TestParsePeriod(t *testing.T) {
	tests := []struct {
		in   string
		want Period
		err  bool
	}{
		{"", PeriodNone, false},
		{"none", PeriodNone, false},
		{"day", PeriodDay, false},
		{"month", PeriodMonth, false},
		{"Day", PeriodNone, true},
		{"week", PeriodNone, true},
		{"monthly", PeriodNone, true},
	}
	for _, tt := range tests {
		got, err := ParsePeriod(tt.in)
		if got != tt.want || (err != nil) != tt.err || (err != nil && !errors.Is(err, ErrInvalid)) {
			t.Errorf("ParsePeriod(%q) = %v, %v; want %v, error %v", tt.in, got, err, tt.want, tt.err)
		}
		if err == nil && tt.in != "" {
			if back, _ := ParsePeriod(got.String()); back != got {
				t.Errorf("%v.String() = %q does not parse back", got, got.String())
			}
		}
	}
}

// TestPeriodBounds: calendar periods in UTC, whatever the location of the
// time given; each starts exactly at its boundary.
func TestPeriodBounds(t *testing.T) {
	utc := func(y int, m time.Month, d, h, min, s, ns int) time.Time {
		return time.Date(y, m, d, h, min, s, ns, time.UTC)
	}
	sydney := time.FixedZone("+10", 10*3600)
	tests := []struct {
		name     string
		p        Period
		at       time.Time
		start    time.Time
		resetsAt time.Time
	}{
		{"none", PeriodNone, t0(), time.Time{}, time.Time{}},
		{"day", PeriodDay, utc(2026, 3, 10, 12, 0, 0, 0), utc(2026, 3, 10, 0, 0, 0, 0), utc(2026, 3, 11, 0, 0, 0, 0)},
		{"day, at its first instant", PeriodDay, utc(2026, 3, 10, 0, 0, 0, 0), utc(2026, 3, 10, 0, 0, 0, 0), utc(2026, 3, 11, 0, 0, 0, 0)},
		{"day, at its last instant", PeriodDay, utc(2026, 3, 10, 23, 59, 59, 999_999_999), utc(2026, 3, 10, 0, 0, 0, 0), utc(2026, 3, 11, 0, 0, 0, 0)},
		{"day, Dec 31", PeriodDay, utc(2026, 12, 31, 23, 0, 0, 0), utc(2026, 12, 31, 0, 0, 0, 0), utc(2027, 1, 1, 0, 0, 0, 0)},
		{"day, Feb 28 of a leap year", PeriodDay, utc(2028, 2, 28, 8, 0, 0, 0), utc(2028, 2, 28, 0, 0, 0, 0), utc(2028, 2, 29, 0, 0, 0, 0)},
		{"day, Feb 29", PeriodDay, utc(2028, 2, 29, 8, 0, 0, 0), utc(2028, 2, 29, 0, 0, 0, 0), utc(2028, 3, 1, 0, 0, 0, 0)},
		{"day, in another zone", PeriodDay, time.Date(2026, 3, 11, 9, 0, 0, 0, sydney), utc(2026, 3, 10, 0, 0, 0, 0), utc(2026, 3, 11, 0, 0, 0, 0)},
		{"month", PeriodMonth, utc(2026, 3, 10, 12, 0, 0, 0), utc(2026, 3, 1, 0, 0, 0, 0), utc(2026, 4, 1, 0, 0, 0, 0)},
		{"month, December", PeriodMonth, utc(2026, 12, 31, 23, 59, 59, 999_999_999), utc(2026, 12, 1, 0, 0, 0, 0), utc(2027, 1, 1, 0, 0, 0, 0)},
		{"month, January", PeriodMonth, utc(2027, 1, 1, 0, 0, 0, 0), utc(2027, 1, 1, 0, 0, 0, 0), utc(2027, 2, 1, 0, 0, 0, 0)},
		{"month, February of a leap year", PeriodMonth, utc(2028, 2, 29, 23, 0, 0, 0), utc(2028, 2, 1, 0, 0, 0, 0), utc(2028, 3, 1, 0, 0, 0, 0)},
		{"month, February", PeriodMonth, utc(2027, 2, 28, 23, 0, 0, 0), utc(2027, 2, 1, 0, 0, 0, 0), utc(2027, 3, 1, 0, 0, 0, 0)},
		{"month, in another zone", PeriodMonth, time.Date(2026, 2, 1, 9, 0, 0, 0, sydney), utc(2026, 1, 1, 0, 0, 0, 0), utc(2026, 2, 1, 0, 0, 0, 0)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			i := tt.p.index(tt.at)
			if got := tt.p.start(i); !got.Equal(tt.start) {
				t.Errorf("start = %v, want %v", got, tt.start)
			}
			if got := tt.p.resetsAt(tt.at); !got.Equal(tt.resetsAt) {
				t.Errorf("resetsAt = %v, want %v", got, tt.resetsAt)
			}
			if tt.p != PeriodNone {
				if i <= 0 {
					t.Errorf("index %d: 0 is kept for \"no period\" on disk", i)
				}
				if tt.p.index(tt.resetsAt) != i+1 || tt.p.index(tt.resetsAt.Add(-1)) != i {
					t.Errorf("the period does not end at resetsAt")
				}
			}
		})
	}
	// Every month of a few years: start and index agree.
	for i := PeriodMonth.index(time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)); i < PeriodMonth.index(time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)); i++ {
		s := PeriodMonth.start(i)
		if s.Day() != 1 || PeriodMonth.index(s) != i || PeriodMonth.index(s.Add(-1)) != i-1 {
			t.Fatalf("month %d starts at %v", i, s)
		}
	}
}

func t0() time.Time { return time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC) }

// testClock is an injectable Options.Now, safe for concurrent use.
type testClock struct{ ns atomic.Int64 }

func (c *testClock) Now() time.Time  { return time.Unix(0, c.ns.Load()).UTC() }
func (c *testClock) set(t time.Time) { c.ns.Store(t.UnixNano()) }

// periodStore opens a store at path on clk with account "acme" (if new) and
// returns it.
func periodStore(t *testing.T, path string, clk *testClock) *Store {
	t.Helper()
	s, err := Open(path, Options{Now: clk.Now})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Account("acme"); err != nil {
		if _, err := s.CreateAccount("acme", "", 100*money.PerUSD, t0()); err != nil {
			t.Fatal(err)
		}
	}
	return s
}

func newPeriodKey(t *testing.T, s *Store, cap money.Micros, p Period) (KeyInfo, *Key) {
	t.Helper()
	info, secret, err := s.CreateKey(NewKey{Account: "acme", Scopes: []string{"a"}, SpendCap: cap, CapPeriod: p}, t0())
	if err != nil {
		t.Fatal(err)
	}
	k, ok := s.Lookup(secret, t0())
	if !ok {
		t.Fatal("Lookup failed")
	}
	return info, k
}

// TestCapPeriodRollover: the cap holds within a period, the spend starts
// over at the next one, and KeyInfo shows the period's spend and when it
// resets; across a year's end and a leap day.
func TestCapPeriodRollover(t *testing.T) {
	utc := func(y int, m time.Month, d, h int) time.Time { return time.Date(y, m, d, h, 0, 0, 0, time.UTC) }
	tests := []struct {
		name           string
		p              Period
		first, samePer time.Time // in one period
		next           time.Time // the next period's first instant
		resetsFirst    time.Time
		resetsNext     time.Time
	}{
		{"day across the year's end", PeriodDay, utc(2026, 12, 31, 1), utc(2026, 12, 31, 23).Add(time.Hour - 1),
			utc(2027, 1, 1, 0), utc(2027, 1, 1, 0), utc(2027, 1, 2, 0)},
		{"day onto a leap day", PeriodDay, utc(2028, 2, 28, 5), utc(2028, 2, 28, 23),
			utc(2028, 2, 29, 0), utc(2028, 2, 29, 0), utc(2028, 3, 1, 0)},
		{"month across the year's end", PeriodMonth, utc(2026, 12, 1, 0), utc(2026, 12, 31, 23),
			utc(2027, 1, 1, 0), utc(2027, 1, 1, 0), utc(2027, 2, 1, 0)},
		{"month of a leap February", PeriodMonth, utc(2028, 2, 1, 3), utc(2028, 2, 29, 23),
			utc(2028, 3, 1, 0), utc(2028, 3, 1, 0), utc(2028, 4, 1, 0)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clk := new(testClock)
			clk.set(tt.first)
			s := periodStore(t, t.TempDir()+"/keygate.db", clk)
			defer s.Close()
			info, k := newPeriodKey(t, s, 100, tt.p)
			check := func(when string, spent money.Micros, resets time.Time) {
				t.Helper()
				got, _ := s.Key(info.ID)
				if got.Spent != spent || !got.PeriodResetsAt.Equal(resets) || got.CapPeriod != tt.p {
					t.Errorf("%s: spent %d, resets at %v, period %v; want %d, %v, %v",
						when, got.Spent, got.PeriodResetsAt, got.CapPeriod, spent, resets, tt.p)
				}
			}
			if err := s.Debit(k, 100); err != nil {
				t.Fatal(err)
			}
			clk.set(tt.samePer)
			if err := s.Debit(k, 1); !errors.Is(err, ErrSpendCap) {
				t.Errorf("Debit past the cap later in the period = %v, want ErrSpendCap", err)
			}
			check("later in the period", 100, tt.resetsFirst)
			clk.set(tt.next)
			check("the next period, before a charge", 0, tt.resetsNext)
			if err := s.Debit(k, 100); err != nil {
				t.Errorf("Debit of the whole cap in the next period: %v", err)
			}
			if err := s.Debit(k, 1); !errors.Is(err, ErrSpendCap) {
				t.Errorf("Debit past the cap in the next period = %v, want ErrSpendCap", err)
			}
			check("the next period", 100, tt.resetsNext)
			if a, _ := s.Account("acme"); a.Balance != 100*money.PerUSD-200 {
				t.Errorf("balance %d: a new period resets the spend, not the balance", a.Balance)
			}
		})
	}
}

// TestCapPeriodWithReservations: what is reserved counts against the cap of
// the period it is reserved in; a reservation that outlives its period is
// still held, and its charge counts in the period it settles in.
func TestCapPeriodWithReservations(t *testing.T) {
	clk := new(testClock)
	day := time.Date(2026, 6, 1, 23, 0, 0, 0, time.UTC)
	clk.set(day)
	s := periodStore(t, t.TempDir()+"/keygate.db", clk)
	defer s.Close()
	info, k := newPeriodKey(t, s, 100, PeriodDay)
	if err := s.Reserve(k, "r1", 60, 60, day.Add(24*time.Hour)); err != nil {
		t.Fatal(err)
	}
	if err := s.Debit(k, 41); !errors.Is(err, ErrSpendCap) {
		t.Errorf("Debit past the cap with a reservation = %v, want ErrSpendCap", err)
	}
	clk.set(day.Add(time.Hour)) // the next day
	if err := s.Debit(k, 41); !errors.Is(err, ErrSpendCap) {
		t.Errorf("Debit past the cap with yesterday's reservation still open = %v, want ErrSpendCap", err)
	}
	if err := s.Debit(k, 40); err != nil {
		t.Fatal(err)
	}
	if st, charged := s.Settle("r1", true, 0, false); st != SettleCommitted || charged != 60 {
		t.Fatalf("Settle = %v, %d", st, charged)
	}
	if got, _ := s.Key(info.ID); got.Spent != 100 || got.Reserved != 0 {
		t.Errorf("spent %d, reserved %d; want 100 (today's debit and the settled charge), 0", got.Spent, got.Reserved)
	}
}

// TestCapPeriodPersisted: the spend is stored with its period's number, so
// a reopen in the same period keeps it and a reopen in a later period does
// not carry it over.
func TestCapPeriodPersisted(t *testing.T) {
	path := t.TempDir() + "/keygate.db"
	clk := new(testClock)
	day := time.Date(2026, 7, 14, 10, 0, 0, 0, time.UTC)
	clk.set(day)
	s := periodStore(t, path, clk)
	info, k := newPeriodKey(t, s, 100, PeriodDay)
	lifetime, lk := newPeriodKey(t, s, 100, PeriodNone)
	for _, key := range []*Key{k, lk} {
		if err := s.Debit(key, 60); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	// On disk, in the key's ledger slot: the spend, and the day's number
	// for the daily key, 0 for the lifetime one.
	spends := readSpends(t, path, info.ID, lifetime.ID)
	want := make([]byte, slotSize)
	if setSlot(want, 0, 60, PeriodDay.index(day)); !bytes.Equal(spends[0], want) {
		t.Errorf("daily spend on disk %x, want %x", spends[0], want)
	}
	if setSlot(want, 0, 60, 0); !bytes.Equal(spends[1], want) {
		t.Errorf("lifetime spend on disk %x, want %x", spends[1], want)
	}

	clk.set(day.Add(13*time.Hour + 59*time.Minute)) // 23:59, the same day
	s = periodStore(t, path, clk)
	if got, _ := s.Key(info.ID); got.Spent != 60 {
		t.Errorf("reopened the same day: spent %d, want 60", got.Spent)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	clk.set(day.Add(14 * time.Hour)) // midnight: the next day
	s = periodStore(t, path, clk)
	if got, _ := s.Key(info.ID); got.Spent != 0 || !got.PeriodResetsAt.Equal(time.Date(2026, 7, 16, 0, 0, 0, 0, time.UTC)) {
		t.Errorf("reopened the next day: spent %d, resets at %v; want 0 and July 16", got.Spent, got.PeriodResetsAt)
	}
	if got, _ := s.Key(lifetime.ID); got.Spent != 60 || !got.PeriodResetsAt.IsZero() {
		t.Errorf("lifetime key reopened the next day: spent %d, resets at %v; want 60 and never", got.Spent, got.PeriodResetsAt)
	}
	// A reopened store has no secrets to look keys up by: take them from the
	// admin index.
	if err := s.Debit(s.keyByIDLocked(info.ID).cur, 100); err != nil {
		t.Errorf("the whole cap the next day after a reopen: %v", err)
	}
	if err := s.Debit(s.keyByIDLocked(lifetime.ID).cur, 41); !errors.Is(err, ErrSpendCap) {
		t.Errorf("lifetime key past its cap after a reopen: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = periodStore(t, path, clk)
	defer s.Close()
	if got, _ := s.Key(info.ID); got.Spent != 100 {
		t.Errorf("reopened again: spent %d, want 100", got.Spent)
	}
}

// readSpends reads the raw ledger slots of keys from a closed store.
func readSpends(t *testing.T, path string, keys ...string) [][]byte {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var out [][]byte
	err = db.View(func(tx *bolt.Tx) error {
		blocks, err := readBlocks(tx, blockKeys)
		if err != nil {
			return err
		}
		for _, k := range keys {
			slot, err := getSlot(tx.Bucket(bucketKeySlots).Get([]byte(k)))
			if err != nil {
				return err
			}
			raw, err := blocks.take(slot)
			if err != nil {
				return err
			}
			out = append(out, bytes.Clone(raw))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestCapPeriodKeys: a cap period needs a cap; rotation keeps the period;
// a key without one shows no reset time.
func TestCapPeriodKeys(t *testing.T) {
	path := t.TempDir() + "/keygate.db"
	clk := new(testClock)
	clk.set(time.Date(2026, 1, 31, 12, 0, 0, 0, time.UTC))
	s := periodStore(t, path, clk)
	for _, nk := range []NewKey{
		{Account: "acme", Scopes: []string{"a"}, CapPeriod: PeriodDay},
		{Account: "acme", Scopes: []string{"a"}, CapPeriod: PeriodMonth},
		{Account: "acme", Scopes: []string{"a"}, SpendCap: 5, CapPeriod: PeriodMonth + 1},
	} {
		if _, _, err := s.CreateKey(nk, t0()); !errors.Is(err, ErrInvalid) {
			t.Errorf("CreateKey(cap %d, period %v) = %v, want ErrInvalid", nk.SpendCap, nk.CapPeriod, err)
		}
	}
	info, k := newPeriodKey(t, s, 100, PeriodMonth)
	if err := s.Debit(k, 30); err != nil {
		t.Fatal(err)
	}
	feb := time.Date(2026, 2, 1, 0, 0, 0, 0, time.UTC)
	if info.CapPeriod != PeriodMonth || !info.PeriodResetsAt.Equal(feb) {
		t.Errorf("new key: period %v, resets at %v; want month, %v", info.CapPeriod, info.PeriodResetsAt, feb)
	}
	old, rotated, _, err := s.Rotate(info.ID, 0, t0())
	if err != nil {
		t.Fatal(err)
	}
	if rotated.CapPeriod != PeriodMonth || rotated.SpendCap != 100 || !rotated.PeriodResetsAt.Equal(feb) {
		t.Errorf("rotated key: period %v, cap %d, resets at %v; want month, 100, %v",
			rotated.CapPeriod, rotated.SpendCap, rotated.PeriodResetsAt, feb)
	}
	if old.CapPeriod != PeriodMonth || old.Spent != 30 {
		t.Errorf("old key after rotation: period %v, spent %d", old.CapPeriod, old.Spent)
	}
	none, _ := newPeriodKey(t, s, 100, PeriodNone)
	if !none.PeriodResetsAt.IsZero() || none.CapPeriod != PeriodNone {
		t.Errorf("lifetime cap: period %v, resets at %v; want none, never", none.CapPeriod, none.PeriodResetsAt)
	}
	before := s.Keys("")
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = periodStore(t, path, clk)
	defer s.Close()
	if diff := cmp.Diff(before, s.Keys("")); diff != "" {
		t.Errorf("keys after a reopen (-before +after):\n%s", diff)
	}
}

func TestSpendCodec(t *testing.T) {
	for _, tt := range []struct {
		m      money.Micros
		period int32
		n      int
	}{{0, 0, 8}, {5, 0, 8}, {money.Max, 0, 8}, {7, 1, 12}, {money.Max, 1<<31 - 1, 12}} {
		b := putSpend(make([]byte, 12), tt.m, tt.period)
		if len(b) != tt.n {
			t.Errorf("putSpend(%d, %d) is %d bytes, want %d", tt.m, tt.period, len(b), tt.n)
		}
		m, period, err := getSpend(b)
		if err != nil || m != tt.m || period != tt.period {
			t.Errorf("getSpend(putSpend(%d, %d)) = %d, %d, %v", tt.m, tt.period, m, period, err)
		}
	}
	for _, b := range [][]byte{
		nil,
		{1},
		make([]byte, 9),
		make([]byte, 12),                       // period 0 must be written as 8 bytes
		append(make([]byte, 8), 0x80, 0, 0, 0), // negative period
		binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint64(nil, 1<<63), 5), // negative amount
		make([]byte, 16),
	} {
		if _, _, err := getSpend(b); !errors.Is(err, errRecord) {
			t.Errorf("getSpend(%x) = %v, want errRecord", b, err)
		}
	}
}

// FuzzGetSpend: any bytes read or fail without a panic, and what reads
// writes back the same.
func FuzzGetSpend(f *testing.F) {
	f.Add(putSpend(make([]byte, 12), 42, 0))
	f.Add(putSpend(make([]byte, 12), 42, 20_000))
	f.Add(make([]byte, 12))
	f.Fuzz(func(t *testing.T, b []byte) {
		m, period, err := getSpend(b)
		if err != nil {
			return
		}
		if m < 0 || m > money.Max || period < 0 || !bytes.Equal(putSpend(make([]byte, 12), m, period), b) {
			t.Fatalf("getSpend(%x) = %d, %d", b, m, period)
		}
	})
}

func TestReservationRecord(t *testing.T) {
	good := reservationRecord{KeyID: "key_0123456789abcdef", Price: 1_000, MaxPrice: 5_000, Deadline: t0().UnixNano()}
	got, err := decodeReservation(good.appendTo(nil))
	if err != nil || got != good {
		t.Errorf("round trip: %+v, %v; want %+v", got, err, good)
	}
	enc := good.appendTo(nil)
	for _, tt := range []struct {
		name string
		b    []byte
	}{
		{"empty", nil},
		{"version 2", append([]byte{2}, enc[1:]...)},
		{"truncated", enc[:len(enc)-1]},
		{"trailing byte", append(bytes.Clone(enc), 0)},
		{"price 0", (&reservationRecord{KeyID: "k", MaxPrice: 1}).appendTo(nil)},
		{"negative price", (&reservationRecord{KeyID: "k", Price: -1, MaxPrice: 1}).appendTo(nil)},
		{"maxPrice below the price", (&reservationRecord{KeyID: "k", Price: 2, MaxPrice: 1}).appendTo(nil)},
		{"maxPrice past money.Max", (&reservationRecord{KeyID: "k", Price: 1, MaxPrice: money.Max + 1}).appendTo(nil)},
		{"key id too long", (&reservationRecord{KeyID: string(make([]byte, maxIDLen+1)), Price: 1, MaxPrice: 1}).appendTo(nil)},
	} {
		if _, err := decodeReservation(tt.b); !errors.Is(err, errRecord) {
			t.Errorf("%s: decodeReservation = %v, want errRecord", tt.name, err)
		}
	}
}

// FuzzDecodeReservation: any bytes decode or fail without a panic; what
// decodes is in range and encodes back to the same bytes.
func FuzzDecodeReservation(f *testing.F) {
	f.Add((&reservationRecord{KeyID: "key_0123456789abcdef", Price: 1_000, MaxPrice: 5_000, Deadline: 1767322800000000000}).appendTo(nil))
	f.Add([]byte{})
	f.Add([]byte{1, 0, 2, 2, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := decodeReservation(b)
		if err != nil {
			return
		}
		if r.Price <= 0 || r.MaxPrice < r.Price || r.MaxPrice > money.Max || len(r.KeyID) > maxIDLen {
			t.Fatalf("decoded out of range: %+v", r)
		}
		again, err := decodeReservation(r.appendTo(nil))
		if err != nil || again != r {
			t.Fatalf("round trip: %+v, %v; want %+v", again, err, r)
		}
	})
}

// TestKeyRecordCapPeriod: the cap period is an optional trailing field,
// left out for none, so a record without it reads the same in schema 1.
func TestKeyRecordCapPeriod(t *testing.T) {
	base := keyRecord{Account: "a", Scopes: []string{"x"}, SpendCap: 5}
	for _, p := range []Period{PeriodNone, PeriodDay, PeriodMonth} {
		rec := base
		rec.CapPeriod = p
		enc := rec.appendTo(nil)
		if wantLen := len(base.appendTo(nil)) + min(int(p), 1); len(enc) != wantLen {
			t.Errorf("%v: record of %d bytes, want %d", p, len(enc), wantLen)
		}
		v, err := decodeKey(enc)
		if err != nil || v.capPeriod != p {
			t.Errorf("%v: decoded %v, %v", p, v.capPeriod, err)
		}
	}
	for _, bad := range []uint64{0, 3, 300} {
		b := binary.AppendUvarint(base.appendTo(nil), bad)
		if _, err := decodeKey(b); !errors.Is(err, errRecord) {
			t.Errorf("cap period %d: decodeKey = %v, want errRecord", bad, err)
		}
	}
}

// TestAccountRecordAlertBelow: the alert level is an optional trailing
// field, left out when 0.
func TestAccountRecordAlertBelow(t *testing.T) {
	for _, m := range []money.Micros{0, 1, money.Max} {
		rec := accountRecord{Tier: "free", CreatedAt: 5, AlertBelow: m}
		v, err := decodeAccount(rec.appendTo(nil))
		if err != nil || v.alertBelow != m || string(v.tier) != "free" || v.createdAt != 5 {
			t.Errorf("alert level %d: decoded %+v, %v", m, v, err)
		}
	}
	if n, m := len((&accountRecord{Tier: "free"}).appendTo(nil)), len((&accountRecord{Tier: "free", AlertBelow: 1}).appendTo(nil)); n+1 != m {
		t.Errorf("records of %d and %d bytes: a level of 0 must not be written", n, m)
	}
	for _, bad := range []int64{0, -1, int64(money.Max) + 1} {
		b := binary.AppendVarint((&accountRecord{Tier: "free"}).appendTo(nil), bad)
		if _, err := decodeAccount(b); !errors.Is(err, errRecord) {
			t.Errorf("alert level %d: decodeAccount = %v, want errRecord", bad, err)
		}
	}
}

// TestFlushFailureKeepsReservationsAndAlerts: when a flush fails (the file
// is read-only underneath the store), the reservations it was writing and
// the alerts it raised stay pending: the next flush writes them, and hands
// the alerts to OnAlert then, once.
func TestFlushFailureKeepsReservationsAndAlerts(t *testing.T) {
	path := t.TempDir() + "/keygate.db"
	var handed []Alert
	s, err := Open(path, Options{Outbox: true, OnAlert: func(a []Alert) { handed = append(handed, a...) }})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateAccount("acme", "", 100, t0()); err != nil {
		t.Fatal(err)
	}
	info, secret, err := s.CreateKey(NewKey{Account: "acme", Scopes: []string{"a"}, SpendCap: 100}, t0())
	if err != nil {
		t.Fatal(err)
	}
	k, _ := s.Lookup(secret, t0())
	if err := s.Reserve(k, "settled", 10, 10, t0().Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	if err := s.Flush(); err != nil {
		t.Fatal(err)
	}
	// Pending: a new reservation, a settled one, and the 50% alert.
	if err := s.Reserve(k, "open", 20, 20, t0().Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	s.Settle("settled", true, 0, false)
	if err := s.Debit(k, 40); err != nil {
		t.Fatal(err)
	}

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
	if len(handed) != 0 {
		t.Errorf("OnAlert was given %+v by a failed flush", handed)
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
	if len(handed) != 1 || handed[0].Threshold != 0.5 || handed[0].Spent != 50 {
		t.Errorf("OnAlert after the retry: %+v, want the 50%% alert once", handed)
	}

	r, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	got, _ := r.Key(info.ID)
	a, _ := r.Account("acme")
	if a.Balance != 50 || got.Spent != 50 || got.Reserved != 20 || a.Reserved != 20 {
		t.Errorf("after a failed flush and a good one: balance %d, spent %d, reserved %d and %d; want 50, 50, 20, 20",
			a.Balance, got.Spent, got.Reserved, a.Reserved)
	}
	if st, _ := r.Settle("settled", true, 0, false); st != SettleUnknown {
		t.Errorf("the settled reservation came back: %v", st)
	}
	if pending, err := r.PendingAlerts(); err != nil || len(pending) != 1 || pending[0].ID != handed[0].ID {
		t.Errorf("outbox %+v, %v; want the alert handed to OnAlert", pending, err)
	}
}
