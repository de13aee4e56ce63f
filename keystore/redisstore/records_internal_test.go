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
		bal   money.Micros
		found bool
		ok    bool
	}{
		{"full", []any{"pro", nanos, "20", "-5"}, keystore.AccountRecord{ID: "acme", Tier: "pro", AlertBelow: 20, CreatedAt: at}, -5, true, true},
		{"no balance asked", []any{"", nanos, nil}, keystore.AccountRecord{ID: "acme", CreatedAt: at}, 0, true, true},
		{"missing", []any{nil, nil, nil, nil}, keystore.AccountRecord{}, 0, false, true},
		{"bad created_at", []any{"pro", "x", "0", "0"}, keystore.AccountRecord{}, 0, true, false},
		{"created_at 0", []any{"pro", "0", "0", "0"}, keystore.AccountRecord{}, 0, true, false},
		{"balance out of range", []any{"pro", nanos, "0", "9223372036854775807"}, keystore.AccountRecord{}, 0, true, false},
	}
	for _, tt := range tests {
		rec, bal, found, err := parseAccount("acme", tt.vals)
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
		if diff := cmp.Diff(tt.want, rec); diff != "" || bal != tt.bal {
			t.Errorf("%s: balance %v (want %v), record (-want +got):\n%s", tt.name, bal, tt.bal, diff)
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
	got, spent, period, found, err := parseKey(rec.ID, []any{string(raw), "12", "20000"})
	if err != nil || !found || spent != 12 || period != 20000 || !cmp.Equal(rec, got) {
		t.Errorf("parseKey = %+v, %v, %v, %v, %v", got, spent, period, found, err)
	}
	if _, _, _, found, err := parseKey(rec.ID, []any{nil, nil, nil}); found || err != nil {
		t.Errorf("parseKey(missing) = found %v, %v", found, err)
	}
	for _, vals := range [][]any{
		{"garbage", "0", "0"},
		{string(raw), "-1", "0"},
		{string(raw), "0", "-1"},
		{string(raw), "0", "99999999999"},
	} {
		if _, _, _, _, err := parseKey(rec.ID, vals); !errors.Is(err, errBadRecord) {
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
			strconv.FormatInt(int64(rec.AlertBelow), 10), strconv.FormatInt(int64(b), 10)})
		if err != nil || !found || !cmp.Equal(rec, again) || b != b2 {
			t.Fatalf("round trip: %+v %v, %v; want %+v %v", again, b2, err, rec, b)
		}
		if b < -money.Max || b > money.Max || rec.CreatedAt.UnixNano() <= 0 {
			t.Fatalf("out of range: %+v, balance %v", rec, b)
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
