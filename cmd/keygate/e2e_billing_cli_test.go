package main_test

import (
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestE2EBillingCLI drives the billing flags of the admin commands
// (--alert-below on accounts create and credit, --cap-period on keys create)
// and the fields they add to the JSON views, through a running server and
// on a store file alike.
func TestE2EBillingCLI(t *testing.T) {
	t.Parallel()
	s := startServer(t, serverOpts{})
	db := filepath.Join(t.TempDir(), "billing.db")
	modes := []struct {
		name string
		run  func(t *testing.T, args ...string) result
	}{
		{"--server", func(t *testing.T, args ...string) result { return s.cli(t, args...) }},
		{"--db", func(t *testing.T, args ...string) result {
			return runKeygate(t, baseEnv(), append(args, "--db", db)...)
		}},
	}
	for _, m := range modes {
		t.Run(m.name, func(t *testing.T) {
			t.Parallel()
			testBillingCLI(t, m.run)
		})
	}
}

func testBillingCLI(t *testing.T, run func(t *testing.T, args ...string) result) {
	// ok runs args with -o json, requires exit 0 and returns the object.
	ok := func(t *testing.T, args ...string) map[string]json.RawMessage {
		t.Helper()
		var v map[string]json.RawMessage
		mustJSON(t, run(t, append(args, "-o", "json")...), &v, args)
		return v
	}
	// want checks that each field of the JSON object m is there with the
	// given JSON text, or absent where want is "".
	want := func(t *testing.T, what string, m map[string]json.RawMessage, fields ...string) {
		t.Helper()
		for i := 0; i < len(fields); i += 2 {
			name, wantText := fields[i], fields[i+1]
			got, present := m[name]
			switch {
			case wantText == "" && present:
				t.Errorf("%s: %s = %s, want it left out", what, name, got)
			case wantText != "" && !present:
				t.Errorf("%s: no %s (want %s): %v", what, name, wantText, keysOf(m))
			case wantText != "" && string(got) != wantText:
				t.Errorf("%s: %s = %s, want %s", what, name, got, wantText)
			}
		}
	}

	t.Run("alert below", func(t *testing.T) {
		a := ok(t, "accounts", "create", "acme", "--balance", "10", "--alert-below", "2.5")
		want(t, "accounts create --alert-below 2.5", a,
			"balance_micros", "10000000", "reserved_micros", "0", "reserved_usd", `"0.00"`,
			"alert_below_micros", "2500000", "alert_below_usd", `"2.50"`)
		want(t, "accounts get", ok(t, "accounts", "get", "acme"), "alert_below_micros", "2500000", "alert_below_usd", `"2.50"`)

		plain := ok(t, "accounts", "create", "plain", "--balance", "1")
		want(t, "accounts create without --alert-below", plain,
			"reserved_micros", "0", "reserved_usd", `"0.00"`, "alert_below_micros", "", "alert_below_usd", "")

		want(t, "accounts credit without --alert-below", ok(t, "accounts", "credit", "acme", "1"),
			"balance_micros", "11000000", "alert_below_micros", "2500000")
		want(t, "accounts credit --alert-below 3", ok(t, "accounts", "credit", "acme", "1", "--alert-below", "3"),
			"balance_micros", "12000000", "alert_below_micros", "3000000", "alert_below_usd", `"3.00"`)
		want(t, "accounts credit --alert-below 0", ok(t, "accounts", "credit", "acme", "1", "--alert-below", "0"),
			"balance_micros", "13000000", "alert_below_micros", "", "alert_below_usd", "")
		want(t, "accounts get after --alert-below 0", ok(t, "accounts", "get", "acme"),
			"balance_micros", "13000000", "alert_below_micros", "", "alert_below_usd", "")

		// The flag stands before the positionals as well.
		want(t, "accounts credit --alert-below before", ok(t, "accounts", "credit", "--alert-below", "0.000001", "plain", "1"),
			"balance_micros", "2000000", "alert_below_micros", "1", "alert_below_usd", `"0.000001"`)

		var list []map[string]json.RawMessage
		mustJSON(t, run(t, "accounts", "list", "-o", "json"), &list, nil)
		if len(list) != 2 {
			t.Fatalf("accounts list: %d accounts, want acme and plain", len(list))
		}
		for _, a := range list {
			if _, ok := a["reserved_usd"]; !ok {
				t.Errorf("accounts list: %s has no reserved_usd", a["id"])
			}
		}

		r := run(t, "accounts", "get", "plain")
		if r.code != 0 || !strings.Contains(r.stdout, "ALERT BELOW") || !strings.Contains(r.stdout, "0.000001") {
			t.Errorf("accounts get (table): want the alert level shown\n%s", r)
		}
	})

	t.Run("cap period", func(t *testing.T) {
		if r := run(t, "accounts", "create", "keys-acct", "--balance", "1"); r.code != 0 {
			t.Fatalf("accounts create: %s", r)
		}
		create := func(t *testing.T, extra ...string) map[string]json.RawMessage {
			t.Helper()
			k := ok(t, append([]string{"keys", "create", "--account", "keys-acct", "--scopes", "chat:write"}, extra...)...)
			want(t, "keys create", k, "spent_micros", "0", "reserved_micros", "0", "reserved_usd", `"0.00"`)
			return k
		}
		// The server reads its own clock: a reset time is right if it
		// follows the time before the command or the time after it.
		resets := func(t *testing.T, what string, k map[string]json.RawMessage, before, after time.Time, next func(time.Time) time.Time) {
			t.Helper()
			var got string
			if err := json.Unmarshal(k["period_resets_at"], &got); err != nil {
				t.Errorf("%s: period_resets_at = %s: want an RFC 3339 string (%v)", what, k["period_resets_at"], err)
				return
			}
			if got != next(before).Format(time.RFC3339) && got != next(after).Format(time.RFC3339) {
				t.Errorf("%s: period_resets_at = %s, want %s", what, got, next(after).Format(time.RFC3339))
			}
		}

		none := create(t, "--spend-cap", "5")
		want(t, "keys create without --cap-period", none, "cap_period", `"none"`, "period_resets_at", "")
		explicit := create(t, "--spend-cap", "5", "--cap-period", "none")
		want(t, "keys create --cap-period none", explicit, "cap_period", `"none"`, "period_resets_at", "")

		before := time.Now()
		monthly := create(t, "--spend-cap", "5", "--cap-period", "month")
		after := time.Now()
		want(t, "keys create --cap-period month", monthly, "cap_period", `"month"`, "spend_cap_micros", "5000000")
		resets(t, "keys create --cap-period month", monthly, before, after, firstOfNextMonth)

		before = time.Now()
		daily := create(t, "--cap-period", "day", "--spend-cap", "0.5")
		after = time.Now()
		want(t, "keys create --cap-period day", daily, "cap_period", `"day"`)
		resets(t, "keys create --cap-period day", daily, before, after, nextMidnight)

		var id string
		if err := json.Unmarshal(monthly["id"], &id); err != nil {
			t.Fatal(err)
		}
		got := ok(t, "keys", "get", id)
		want(t, "keys get", got, "cap_period", `"month"`, "period_resets_at", string(monthly["period_resets_at"]),
			"spent_micros", "0", "reserved_micros", "0", "reserved_usd", `"0.00"`)

		var list []map[string]json.RawMessage
		mustJSON(t, run(t, "keys", "list", "--account", "keys-acct", "-o", "json"), &list, nil)
		periods := map[string]int{}
		for _, k := range list {
			var p string
			json.Unmarshal(k["cap_period"], &p) //nolint:errcheck // an absent field counts as ""
			periods[p]++
		}
		if periods["none"] != 2 || periods["month"] != 1 || periods["day"] != 1 || len(list) != 4 {
			t.Errorf("keys list: cap periods %v, want 2 none, 1 month, 1 day", periods)
		}

		r := run(t, "keys", "get", id)
		var resetAt string
		json.Unmarshal(monthly["period_resets_at"], &resetAt) //nolint:errcheck // checked above
		if r.code != 0 || !strings.Contains(r.stdout, "5.00/month") || resetAt == "" || !strings.Contains(r.stdout, resetAt) {
			t.Errorf("keys get (table): want the cap as 5.00/month and the reset time %s\n%s", resetAt, r)
		}

		// A rotation carries the cap period to the new key.
		rot := ok(t, "keys", "rotate", id)
		want(t, "keys rotate", rot, "cap_period", `"month"`, "spend_cap_micros", "5000000")
		if _, ok := rot["period_resets_at"]; !ok {
			t.Errorf("keys rotate of a monthly key: no period_resets_at: %v", keysOf(rot))
		}
	})

	t.Run("bad values", func(t *testing.T) {
		if r := run(t, "accounts", "create", "guard", "--balance", "1", "--alert-below", "0.5"); r.code != 0 {
			t.Fatalf("accounts create: %s", r)
		}
		tests := []struct {
			name string
			args []string
			want []string
		}{
			{"week", []string{"keys", "create", "--account", "guard", "--scopes", "chat:write", "--cap-period", "week"}, []string{"--cap-period", "week"}},
			{"capitals", []string{"keys", "create", "--account", "guard", "--scopes", "chat:write", "--cap-period", "Month"}, []string{"--cap-period", "Month"}},
			{"negative alert on create", []string{"accounts", "create", "neg", "--alert-below", "-1"}, []string{"--alert-below", "-1", "negative"}},
			{"over-precise alert on create", []string{"accounts", "create", "prec", "--alert-below", "0.0000001"}, []string{"--alert-below", "0.0000001"}},
			{"empty alert on create", []string{"accounts", "create", "empty", "--alert-below", ""}, []string{"--alert-below"}},
			{"negative alert on credit", []string{"accounts", "credit", "guard", "1", "--alert-below", "-1"}, []string{"--alert-below", "-1"}},
			{"over-precise alert on credit", []string{"accounts", "credit", "guard", "1", "--alert-below", "0.0000001"}, []string{"--alert-below", "0.0000001"}},
			{"alert not a number", []string{"accounts", "credit", "guard", "1", "--alert-below", "ten"}, []string{"--alert-below", "ten"}},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				wantFailure(t, run(t, tt.args...), tt.want...)
			})
		}
		var keys []json.RawMessage
		mustJSON(t, run(t, "keys", "list", "--account", "guard", "-o", "json"), &keys, nil)
		if len(keys) != 0 {
			t.Errorf("refused commands created %d keys", len(keys))
		}
		for _, id := range []string{"neg", "prec", "empty"} {
			if r := run(t, "accounts", "get", id); r.code == 0 {
				t.Errorf("refused accounts create made %s:\n%s", id, r)
			}
		}
		want(t, "accounts get after refused credits", ok(t, "accounts", "get", "guard"),
			"balance_micros", "1000000", "alert_below_micros", "500000")
	})
}

// TestE2EBillingFlagsCheckedFirst: a bad --cap-period or --alert-below is
// refused before the CLI dials a server or opens a store file, so the error
// is about the flag, and no file is left behind.
func TestE2EBillingFlagsCheckedFirst(t *testing.T) {
	t.Parallel()
	nowhere := freeAddr(t) // nothing listens there
	missing := filepath.Join(t.TempDir(), "never.db")
	bad := [][]string{
		{"keys", "create", "--account", "acme", "--scopes", "chat:write", "--cap-period", "week"},
		{"accounts", "create", "acme", "--alert-below", "-1"},
		{"accounts", "credit", "acme", "1", "--alert-below", "0.0000001"},
	}
	for _, args := range bad {
		flag := args[len(args)-2]
		r := runKeygate(t, envWithToken("t"), append(args, "--server", nowhere)...)
		wantFailure(t, r, flag)
		if strings.Contains(r.stderr, "cannot reach") {
			t.Errorf("keygate %v: dialled the server before checking %s\n%s", args, flag, r)
		}
		wantFailure(t, runKeygate(t, baseEnv(), append(args, "--db", missing)...), flag)
		if _, err := os.Stat(missing); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("keygate %v --db %s: the refused command left a file behind (%v)", args, missing, err)
		}
	}
}

// firstOfNextMonth is when a monthly cap period that holds t ends (UTC).
func firstOfNextMonth(t time.Time) time.Time {
	y, m, _ := t.UTC().Date()
	return time.Date(y, m+1, 1, 0, 0, 0, 0, time.UTC)
}

// nextMidnight is when a daily cap period that holds t ends (UTC).
func nextMidnight(t time.Time) time.Time {
	y, m, d := t.UTC().Date()
	return time.Date(y, m, d+1, 0, 0, 0, 0, time.UTC)
}
