package redisstore

import (
	"errors"
	"strconv"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/money"
)

func TestParseChange(t *testing.T) {
	tests := []struct {
		name string
		vals map[string]any
		want change
		ok   bool
	}{
		{"account", map[string]any{"kind": "acct", "id": "acme", "v": "7", "by": "a"}, change{kindAccount, "acme", 7}, true},
		{"key", map[string]any{"kind": "key", "id": "key_x", "v": "1"}, change{kindKey, "key_x", 1}, true},
		{"unknown kind", map[string]any{"kind": "lease", "id": "x", "v": "1"}, change{}, false},
		{"no id", map[string]any{"kind": "key", "v": "1"}, change{}, false},
		{"no version", map[string]any{"kind": "key", "id": "x"}, change{}, false},
		{"version 0", map[string]any{"kind": "key", "id": "x", "v": "0"}, change{}, false},
		{"bad version", map[string]any{"kind": "key", "id": "x", "v": "1.5"}, change{}, false},
	}
	for _, tt := range tests {
		got, err := parseChange(tt.vals)
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("%s: parseChange = %+v, %v; want %+v, ok %v", tt.name, got, err, tt.want, tt.ok)
		}
	}
}

func TestParseAccount(t *testing.T) {
	at := time.Date(2026, 1, 2, 3, 4, 5, 6, time.UTC)
	nanos := strconv.FormatInt(at.UnixNano(), 10)
	tests := []struct {
		name  string
		vals  []any
		want  keystore.AccountRecord
		amt   acctAmounts
		found bool
		ok    bool
	}{
		{"full", []any{"pro", nanos, "20", "-5", "7"}, keystore.AccountRecord{ID: "acme", Tier: "pro", AlertBelow: 20, CreatedAt: at}, acctAmounts{bal: -5, reserved: 7}, true, true},
		{"no reserved field", []any{"pro", nanos, "20", "-5", nil}, keystore.AccountRecord{ID: "acme", Tier: "pro", AlertBelow: 20, CreatedAt: at}, acctAmounts{bal: -5}, true, true},
		{"no amounts asked", []any{"", nanos, nil}, keystore.AccountRecord{ID: "acme", CreatedAt: at}, acctAmounts{}, true, true},
		{"missing", []any{nil, nil, nil, nil, nil}, keystore.AccountRecord{}, acctAmounts{}, false, true},
		{"bad created_at", []any{"pro", "x", "0", "0", "0"}, keystore.AccountRecord{}, acctAmounts{}, true, false},
		{"created_at 0", []any{"pro", "0", "0", "0", "0"}, keystore.AccountRecord{}, acctAmounts{}, true, false},
		{"balance out of range", []any{"pro", nanos, "0", "9223372036854775807", "0"}, keystore.AccountRecord{}, acctAmounts{}, true, false},
		{"negative reserved", []any{"pro", nanos, "0", "0", "-1"}, keystore.AccountRecord{}, acctAmounts{}, true, false},
		{"bad reserved", []any{"pro", nanos, "0", "0", "1.5"}, keystore.AccountRecord{}, acctAmounts{}, true, false},
	}
	for _, tt := range tests {
		rec, amt, found, err := parseAccount("acme", tt.vals)
		if (err == nil) != tt.ok || found != tt.found {
			t.Errorf("%s: found %v, err %v; want found %v, ok %v", tt.name, found, err, tt.found, tt.ok)
			continue
		}
		if err != nil {
			if !errors.Is(err, errBadRecord) {
				t.Errorf("%s: %v does not wrap errBadRecord", tt.name, err)
			}
			continue
		}
		if diff := cmp.Diff(tt.want, rec); diff != "" || amt != tt.amt {
			t.Errorf("%s: amounts %+v (want %+v), record (-want +got):\n%s", tt.name, amt, tt.amt, diff)
		}
	}
}

func TestParseKey(t *testing.T) {
	rec, _, err := keystore.NewKeyRecord(keystore.NewKey{Account: "acme", Scopes: []string{"a"}}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	raw, err := rec.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	got, amt, found, err := parseKey(rec.ID, []any{string(raw), "12", "20000", "4"})
	if want := (keyAmounts{spent: 12, period: 20000, reserved: 4}); err != nil || !found || amt != want || !cmp.Equal(rec, got) {
		t.Errorf("parseKey = %+v, %+v, %v, %v; want amounts %+v", got, amt, found, err, want)
	}
	// A hash written before reservations existed has no reserved field.
	if _, amt, _, err := parseKey(rec.ID, []any{string(raw), "12", "3", nil}); err != nil || amt != (keyAmounts{spent: 12, period: 3}) {
		t.Errorf("parseKey(no reserved) = %+v, %v", amt, err)
	}
	if _, _, found, err := parseKey(rec.ID, []any{nil, nil, nil, nil}); found || err != nil {
		t.Errorf("parseKey(missing) = found %v, %v", found, err)
	}
	for _, vals := range [][]any{
		{"garbage", "0", "0", "0"},
		{string(raw), "-1", "0", "0"},
		{string(raw), "0", "-1", "0"},
		{string(raw), "0", "99999999999", "0"},
		{string(raw), "0", "0", "-1"},
		{string(raw), "0", "0", "x"},
	} {
		if _, _, _, err := parseKey(rec.ID, vals); !errors.Is(err, errBadRecord) {
			t.Errorf("parseKey(%q) = %v, want errBadRecord", vals[1:], err)
		}
	}
}

// FuzzParseAccount: whatever Redis holds, parseAccount returns an error or
// a record that reads back the same from its own fields.
func FuzzParseAccount(f *testing.F) {
	f.Add("pro", "1767322000000000000", "20", "-5")
	f.Add("", "1", "", "")
	f.Add("x", "-1", "0", "0")
	f.Fuzz(func(t *testing.T, tier, created, alert, bal string) {
		rec, b, found, err := parseAccount("acme", []any{tier, created, alert, bal})
		if err != nil || !found {
			return
		}
		again, b2, found, err := parseAccount("acme", []any{rec.Tier, strconv.FormatInt(rec.CreatedAt.UnixNano(), 10),
			strconv.FormatInt(int64(rec.AlertBelow), 10), strconv.FormatInt(int64(b.bal), 10)})
		if err != nil || !found || !cmp.Equal(rec, again) || b != b2 {
			t.Fatalf("round trip: %+v %+v, %v; want %+v %+v", again, b2, err, rec, b)
		}
		if b.bal < -money.Max || b.bal > money.Max || b.reserved != 0 || rec.CreatedAt.UnixNano() <= 0 {
			t.Fatalf("out of range: %+v, amounts %+v", rec, b)
		}
	})
}

// FuzzParseChange: an entry parses only with a known kind, an ID and a
// positive version, and the version is the number given.
func FuzzParseChange(f *testing.F) {
	f.Add("key", "key_x", "1")
	f.Add("acct", "acme", "9223372036854775807")
	f.Add("lease", "", "-1")
	f.Fuzz(func(t *testing.T, kind, id, v string) {
		c, err := parseChange(map[string]any{"kind": kind, "id": id, "v": v})
		if err != nil {
			return
		}
		n, _ := strconv.ParseInt(v, 10, 64)
		if c.kind != kind || c.id != id || c.id == "" || c.version <= 0 || c.version != n {
			t.Fatalf("parseChange(%q, %q, %q) = %+v", kind, id, v, c)
		}
	})
}
