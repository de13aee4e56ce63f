package keystore_test

import (
	"errors"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/keygate/keygate/authz/ratelimit"
	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/money"
)

// reservedOf sums the exported reservations' prices per account and per
// key: what Account and Key report as Reserved.
func reservedOf(x keystore.Export) (perAccount, perKey map[string]money.Micros) {
	perAccount, perKey = map[string]money.Micros{}, map[string]money.Micros{}
	owner := map[string]string{}
	for _, k := range x.Keys {
		owner[k.Record.ID] = k.Record.Account
	}
	for _, r := range x.Reservations {
		perAccount[owner[r.KeyID]] += r.Price
		perKey[r.KeyID] += r.Price
	}
	return perAccount, perKey
}

// exportedAccounts is x's accounts as Accounts reports them.
func exportedAccounts(x keystore.Export) []keystore.Account {
	res, _ := reservedOf(x)
	out := make([]keystore.Account, 0, len(x.Accounts))
	for _, a := range x.Accounts {
		r := a.Record
		out = append(out, keystore.Account{ID: r.ID, Tier: r.Tier, Balance: a.Balance, Reserved: res[r.ID],
			AlertBelow: r.AlertBelow, CreatedAt: r.CreatedAt})
	}
	return out
}

// exportedKeys is x's keys as Keys reports them at now, in the order of
// want: a spend of a cap period that has ended shows as 0.
func exportedKeys(x keystore.Export, want []keystore.KeyInfo, now time.Time) []keystore.KeyInfo {
	_, res := reservedOf(x)
	byID := map[string]keystore.ExportedKey{}
	for _, k := range x.Keys {
		byID[k.Record.ID] = k
	}
	out := make([]keystore.KeyInfo, 0, len(x.Keys))
	for _, w := range want {
		k, ok := byID[w.ID]
		if !ok {
			continue
		}
		r := k.Record
		spent := k.Spent
		if r.CapPeriod.Index(now) > k.Period {
			spent = 0
		}
		out = append(out, keystore.KeyInfo{ID: r.ID, Account: r.Account, Name: r.Name, Scopes: r.Scopes,
			RateLimit: r.RateLimit, SpendCap: r.SpendCap, Spent: spent, Reserved: res[r.ID], CapPeriod: r.CapPeriod,
			PeriodResetsAt: r.CapPeriod.ResetsAt(now), CreatedAt: r.CreatedAt, ExpiresAt: r.ExpiresAt,
			RevokedAt: r.RevokedAt, RotatedTo: r.RotatedTo})
	}
	return out
}

func debit(t *testing.T, s *keystore.Store, k *keystore.Key, price money.Micros) {
	t.Helper()
	if err := s.Debit(k, price); err != nil {
		t.Fatalf("Debit(%s, %d): %v", k.ID, price, err)
	}
}

func mustExport(t *testing.T, s *keystore.Store) keystore.Export {
	t.Helper()
	x, err := s.Export()
	if err != nil {
		t.Fatalf("Export: %v", err)
	}
	return x
}

// TestExport: a store with every kind of record and ledger state exports
// what Accounts and Keys report, what Open loads from its file, and
// records from which another store accepts the same secrets.
func TestExport(t *testing.T) {
	path := tempPath(t)
	clk := newClock(t0)
	s := openWith(t, path, keystore.Options{Now: clk.Now})
	defer s.Close()
	if _, err := s.CreateAccount("acme", "free", 10*money.PerUSD, t0, keystore.WithAlertBelow(money.PerUSD)); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateAccount("beta", "tier1", 1_000, t0); err != nil {
		t.Fatal(err)
	}
	mustAccount(t, s, "idle", 0)
	plain, plainSecret := mustKey(t, s, keystore.NewKey{Account: "acme", Name: "plain", Scopes: []string{"chat:write", "chat:read"},
		RateLimit: ratelimit.Rate{N: 600, Per: time.Minute}, ExpiresAt: t0.Add(90 * 24 * time.Hour)})
	daily, dailySecret := mustKey(t, s, keystore.NewKey{Account: "acme", Name: "daily", Scopes: []string{"chat:write"},
		SpendCap: 5 * money.PerUSD, CapPeriod: keystore.PeriodDay})
	monthly, monthlySecret := mustKey(t, s, keystore.NewKey{Account: "beta", Name: "monthly", Scopes: []string{"x"},
		SpendCap: 5_000, CapPeriod: keystore.PeriodMonth})
	revoked, revokedSecret := mustKey(t, s, keystore.NewKey{Account: "beta", Scopes: []string{"x"}})
	unused, unusedSecret := mustKey(t, s, keystore.NewKey{Account: "beta", Scopes: []string{"x"}, SpendCap: 100})
	if _, err := s.Revoke(revoked.ID, t0.Add(time.Minute)); err != nil {
		t.Fatal(err)
	}

	// Spend flushed, in a day that then ends.
	debit(t, s, mustLookup(t, s, plainSecret), 1_250)
	debit(t, s, mustLookup(t, s, dailySecret), 700)
	mustReserve(t, s, mustLookup(t, s, dailySecret), "r-settled", 100, 200)
	s.Settle("r-settled", true, 150, true)
	mustReserve(t, s, mustLookup(t, s, dailySecret), "r-flushed", 100, 100) // open, on disk
	mustReserve(t, s, mustLookup(t, s, monthlySecret), "r-above", 900, 2_000)
	s.Settle("r-above", true, 1_500, true) // beta goes below zero
	mustFlush(t, s)
	clk.set(t0.Add(25 * time.Hour))

	// Not flushed yet: Export flushes them.
	debit(t, s, mustLookup(t, s, plainSecret), 250)
	mustReserve(t, s, mustLookup(t, s, plainSecret), "r-released", 10, 10)
	s.Settle("r-released", false, 0, false)
	mustReserve(t, s, mustLookup(t, s, plainSecret), "r-unflushed", 40, 60)
	old, rotated, rotatedSecret, err := s.Rotate(plain.ID, time.Hour, t0.Add(2*time.Hour))
	if err != nil {
		t.Fatal(err)
	}

	x := mustExport(t, s)
	now := clk.Now()
	if diff := cmp.Diff(s.Accounts(), exportedAccounts(x)); diff != "" {
		t.Errorf("exported accounts differ from Accounts (-Accounts +export):\n%s", diff)
	}
	keys := s.Keys("")
	if len(x.Keys) != len(keys) {
		t.Errorf("exported %d keys, Keys has %d", len(x.Keys), len(keys))
	}
	if diff := cmp.Diff(keys, exportedKeys(x, keys, now)); diff != "" {
		t.Errorf("exported keys differ from Keys (-Keys +export):\n%s", diff)
	}

	// What the comparison above cannot tell: balances and spend as stored,
	// with their cap periods, and the reservations themselves.
	bal := map[string]money.Micros{}
	for _, a := range x.Accounts {
		bal[a.Record.ID] = a.Balance
	}
	if want := map[string]money.Micros{"acme": 10*money.PerUSD - 1_250 - 700 - 150 - 250, "beta": 1_000 - 1_500, "idle": 0}; !cmp.Equal(bal, want) {
		t.Errorf("exported balances %v, want %v", bal, want)
	}
	type spend struct {
		Spent  money.Micros
		Period int32
	}
	spends := map[string]spend{}
	for _, k := range x.Keys {
		spends[k.Record.ID] = spend{k.Spent, k.Period}
	}
	wantSpends := map[string]spend{
		plain.ID:   {1_500, 0},
		daily.ID:   {850, keystore.PeriodDay.Index(t0)}, // a day that has ended: Key shows 0
		monthly.ID: {1_500, keystore.PeriodMonth.Index(t0)},
		revoked.ID: {}, unused.ID: {}, rotated.ID: {},
	}
	if diff := cmp.Diff(wantSpends, spends); diff != "" {
		t.Errorf("exported spend (-want +got):\n%s", diff)
	}
	if got := key(t, s, daily.ID).Spent; got != 0 {
		t.Errorf("daily key's Spent = %d a day later, want 0", got)
	}
	wantRes := []keystore.ExportedReservation{
		{ID: "r-flushed", KeyID: daily.ID, Price: 100, MaxPrice: 100, Deadline: deadline},
		{ID: "r-unflushed", KeyID: plain.ID, Price: 40, MaxPrice: 60, Deadline: deadline},
	}
	if diff := cmp.Diff(wantRes, x.Reservations); diff != "" {
		t.Errorf("exported reservations (-want +got):\n%s", diff)
	}
	for _, k := range x.Keys {
		if k.Record.ID == old.ID && (!k.Record.RevokedAt.Equal(t0.Add(3*time.Hour)) || k.Record.RotatedTo != rotated.ID) {
			t.Errorf("rotated key exported revoked at %v, rotated to %q; want %v, %q",
				k.Record.RevokedAt, k.Record.RotatedTo, t0.Add(3*time.Hour), rotated.ID)
		}
	}

	// The flush reached the file: Open loads exactly what was exported.
	c := openWith(t, crashCopy(t, path), keystore.Options{Now: clk.Now})
	defer c.Close()
	if diff := cmp.Diff(x, mustExport(t, c)); diff != "" {
		t.Errorf("export of the file as Open loads it differs (-first +reopened):\n%s", diff)
	}

	// The records hold the secrets' hashes: a store that takes them
	// accepts the same secrets, and still refuses the revoked one.
	m := mustOpen(t, tempPath(t))
	defer m.Close()
	accts := make([]keystore.AccountRecord, 0, len(x.Accounts))
	for _, a := range x.Accounts {
		accts = append(accts, a.Record)
	}
	recs := make([]keystore.KeyRecord, 0, len(x.Keys))
	for _, k := range x.Keys {
		recs = append(recs, k.Record)
	}
	if err := m.Mirror(accts, recs); err != nil {
		t.Fatalf("Mirror of the exported records: %v", err)
	}
	at := t0.Add(2 * time.Hour)
	for _, tt := range []struct {
		name, secret, id string
	}{
		{"plain, in its grace", plainSecret, plain.ID},
		{"rotated", rotatedSecret, rotated.ID},
		{"daily", dailySecret, daily.ID},
		{"monthly", monthlySecret, monthly.ID},
		{"unused", unusedSecret, unused.ID},
		{"revoked", revokedSecret, ""},
	} {
		k, ok := m.Lookup(tt.secret, at)
		if got := ""; ok {
			got = k.ID
			if got != tt.id {
				t.Errorf("%s: Lookup in the store of the export = %s, want %s", tt.name, got, tt.id)
			}
		} else if tt.id != "" {
			t.Errorf("%s: Lookup in the store of the export failed, want %s", tt.name, tt.id)
		}
	}

	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Export(); !errors.Is(err, keystore.ErrClosed) {
		t.Errorf("Export after Close = %v, want ErrClosed", err)
	}
}

// TestExportEmpty: a new store exports nothing, without failing.
func TestExportEmpty(t *testing.T) {
	s := mustOpen(t, tempPath(t))
	defer s.Close()
	x := mustExport(t, s)
	if len(x.Accounts)+len(x.Keys)+len(x.Reservations) != 0 {
		t.Errorf("Export of a new store = %+v, want nothing", x)
	}
}

// TestExportReusedID: the two open reservations of one request ID that a
// crash can leave (see TestCrashWithAReusedID) are both exported; the one
// that the store itself settles for that request ID keeps it, the other
// gets an ID that no request has.
func TestExportReusedID(t *testing.T) {
	crashed, first, second := crashWithAReusedID(t)
	c := mustOpen(t, crashed)
	defer c.Close()

	x := mustExport(t, c)
	if len(x.Reservations) != 2 {
		t.Fatalf("exported reservations %+v, want 2", x.Reservations)
	}
	older, newer := x.Reservations[0], x.Reservations[1]
	if older.ID == "req" {
		older, newer = newer, older
	}
	seq, ok := strings.CutPrefix(older.ID, "req\x00")
	if _, err := strconv.ParseUint(seq, 10, 64); !ok || err != nil {
		t.Errorf("the older reservation's ID = %q, want req, a NUL byte and a sequence number", older.ID)
	}
	got := []keystore.ExportedReservation{older, newer}
	want := []keystore.ExportedReservation{
		{ID: older.ID, KeyID: first.ID, Price: 10, MaxPrice: 10, Deadline: deadline},
		{ID: "req", KeyID: second.ID, Price: 30, MaxPrice: 30, Deadline: deadline},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("exported reservations (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(c.Accounts(), exportedAccounts(x)); diff != "" {
		t.Errorf("exported accounts differ from Accounts (-Accounts +export):\n%s", diff)
	}
	// The store agrees on which one the request ID settles; what is left
	// is exported as Open would load it.
	if st, charged := c.Settle("req", true, 0, false); st != keystore.SettleCommitted || charged != 30 {
		t.Errorf("Settle(req) = %v, %d; want the newer reservation, at 30", st, charged)
	}
	left := mustExport(t, c)
	if len(left.Reservations) != 1 || left.Reservations[0].KeyID != first.ID {
		t.Errorf("after Settle(req), exported reservations %+v, want only the older one, of key %s", left.Reservations, first.ID)
	}
	reopened := mustOpen(t, crashCopy(t, crashed))
	defer reopened.Close()
	if diff := cmp.Diff(left, mustExport(t, reopened)); diff != "" {
		t.Errorf("export of the file as Open loads it differs (-first +reopened):\n%s", diff)
	}
}
