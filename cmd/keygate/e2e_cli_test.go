package main_test

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	adminv1 "github.com/keygate/keygate/proto/keygate/admin/v1"
)

// TestE2EQuickstart follows the README's quickstart, with the addresses of a
// test server added to each command.
func TestE2EQuickstart(t *testing.T) {
	t.Parallel()
	s := startServer(t, serverOpts{})

	r := s.cli(t, "accounts", "create", "acme", "--balance", "10")
	if r.code != 0 || !strings.Contains(r.stdout, "acme") {
		t.Fatalf("accounts create acme --balance 10:\n%s", r)
	}
	r = s.cli(t, "keys", "create", "--account", "acme", "--scopes", "chat:write", "--name", "quickstart")
	if r.code != 0 || !strings.Contains(r.stdout, "kg_") {
		t.Fatalf("keys create: want the secret (kg_...) in the output\n%s", r)
	}

	// SECRET=$(bin/keygate keys create ... -o json | sed -n 's/.*"secret": "\(.*\)".*/\1/p')
	var secret string
	if _, err := exec.LookPath("sed"); err == nil {
		cmd := exec.Command("sh", "-c", `"$KG" keys create --account acme --scopes chat:write -o json --server "$SRV" | sed -n 's/.*"secret": "\(.*\)".*/\1/p'`)
		cmd.Env = append(envWithToken(s.token), "KG="+keygateBinary(t), "SRV="+s.admin)
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("the README's SECRET=$(...) line: %v", err)
		}
		secret = strings.TrimSpace(string(out))
	} else {
		var k keyJSON
		s.ok(t, &k, "keys", "create", "--account", "acme", "--scopes", "chat:write")
		secret = k.Secret
	}
	if !strings.HasPrefix(secret, "kg_") || strings.ContainsAny(secret, " \n\"") {
		t.Fatalf("SECRET = %q, want one kg_ secret", secret)
	}

	r = runKeygate(t, baseEnv(), "check", "--key", secret, "POST", "/v1/chat/completions", "--authz", s.listen)
	if r.code != 0 || !strings.HasPrefix(r.stdout, "allowed (200)") || !strings.Contains(r.stdout, "x-keygate-account: acme") ||
		!strings.Contains(r.stdout, "x-keygate-key-id: key_") || !strings.Contains(r.stdout, "removed: authorization") ||
		!strings.Contains(r.stdout, "x-ratelimit-limit-requests: 20") {
		t.Errorf("check POST /v1/chat/completions: want exit 0 and the README's output\n%s", r)
	}
	r = runKeygate(t, baseEnv(), "check", "--key", secret, "POST", "/v1/embeddings", "--authz", s.listen)
	if r.code != 1 || !strings.HasPrefix(r.stdout, "denied (403)") || !strings.Contains(r.stdout, "content-type: application/json") ||
		!strings.Contains(r.stdout, `{"error":{"type":"permission_error","message":"This API key does not have the required scope: embeddings:write"}}`) {
		t.Errorf("check POST /v1/embeddings: want exit 1 and the README's output\n%s", r)
	}
	if got := s.account(t, "acme").BalanceMicros; got != 10_000_000-priceChat {
		t.Errorf("balance = %d, want 0.002 lower than 10: %d", got, 10_000_000-priceChat)
	}
	r = s.cli(t, "accounts", "get", "acme")
	if r.code != 0 || !strings.Contains(r.stdout, "9.998") {
		t.Errorf("accounts get acme: want the balance 9.998\n%s", r)
	}
	s.stop(t)

	r = runKeygate(t, baseEnv(), "check", "--key", secret, "POST", "/v1/chat/completions", "--authz", s.listen)
	if r.code != 2 || !strings.Contains(r.stderr, s.listen) {
		t.Errorf("check with the server down: want exit 2 and a message naming %s\n%s", s.listen, r)
	}
}

// TestE2EAdminToken: the admin API needs the token, reads included.
func TestE2EAdminToken(t *testing.T) {
	t.Parallel()
	s := startServer(t, serverOpts{})
	s.createAccount(t, "acme", "1")
	calls := [][]string{
		{"accounts", "list"},
		{"accounts", "get", "acme"},
		{"accounts", "create", "intruder", "--balance", "100"},
		{"accounts", "credit", "acme", "100"},
		{"keys", "create", "--account", "acme", "--scopes", "chat:write"},
	}

	t.Run("no token in the CLI's environment", func(t *testing.T) {
		for _, c := range calls {
			wantFailure(t, runKeygate(t, baseEnv(), append(c, "--server", s.admin)...), "KEYGATE_ADMIN_TOKEN")
		}
	})
	t.Run("wrong token", func(t *testing.T) {
		for _, c := range calls {
			wantFailure(t, runKeygate(t, envWithToken(s.token+"x"), append(c, "--server", s.admin)...), "token")
		}
		wantUnauthenticated(t, s.admin, "Bearer "+s.token+"x")
		wantUnauthenticated(t, s.admin, "")
		wantUnauthenticated(t, s.admin, s.token) // without the scheme
	})
	t.Run("server without a token", func(t *testing.T) {
		open := startServer(t, serverOpts{noToken: true})
		for _, c := range calls {
			wantFailure(t, runKeygate(t, envWithToken("anything"), append(c, "--server", open.admin)...), "KEYGATE_ADMIN_TOKEN")
		}
		wantUnauthenticated(t, open.admin, "Bearer ")
		wantUnauthenticated(t, open.admin, "Bearer anything")
		open.stop(t)
		var accts []accountJSON
		dbOK(t, open.db, &accts, "accounts", "list")
		if len(accts) != 0 {
			t.Errorf("a server without a token let accounts be created: %+v", accts)
		}
	})
	// Nothing above changed anything.
	var accts []accountJSON
	s.ok(t, &accts, "accounts", "list")
	if len(accts) != 1 || accts[0].BalanceMicros != 1_000_000 {
		t.Errorf("accounts after refused calls: %+v, want acme with 1000000", accts)
	}
	var keys []keyJSON
	s.ok(t, &keys, "keys", "list")
	if len(keys) != 0 {
		t.Errorf("keys after refused calls: %+v, want none", keys)
	}
}

// wantUnauthenticated calls the admin API directly with the authorization
// metadata given ("" sends none) and wants UNAUTHENTICATED with a message.
func wantUnauthenticated(t *testing.T, addr, auth string) {
	t.Helper()
	cc := dial(t, addr)
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
	defer cancel()
	if auth != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", auth)
	}
	_, err := adminv1.NewAdminClient(cc).ListAccounts(ctx, &adminv1.ListAccountsRequest{})
	if st := status.Convert(err); st.Code() != codes.Unauthenticated || !strings.Contains(strings.ToLower(st.Message()), "token") {
		t.Errorf("ListAccounts with authorization %q: %v, want UNAUTHENTICATED naming the token", auth, err)
	}
}

// TestE2ECLIErrors: each bad argument is refused with a message that names
// the problem, a non-zero exit, nothing on stdout, and nothing created.
func TestE2ECLIErrors(t *testing.T) {
	t.Parallel()
	s := startServer(t, serverOpts{})
	s.createAccount(t, "acme", "1")
	k := s.createKey(t, "acme", "chat:write", "--name", "existing")
	snapshot := func() string {
		var accts []accountJSON
		var keys []keyJSON
		s.ok(t, &accts, "accounts", "list")
		s.ok(t, &keys, "keys", "list")
		b, _ := json.Marshal(struct {
			A []accountJSON
			K []keyJSON
		}{accts, keys})
		return string(b)
	}
	before := snapshot()

	tests := []struct {
		name string
		args []string // --server is appended
		want []string // each must be in stderr
	}{
		{"duplicate account", []string{"accounts", "create", "acme"}, []string{"acme", "exists"}},
		{"negative balance", []string{"accounts", "create", "neg", "--balance", "-5"}, []string{"-5", "negative"}},
		{"over-precise balance", []string{"accounts", "create", "prec", "--balance", "0.0000001"}, []string{"0.0000001", "6 decimal"}},
		{"not a number", []string{"accounts", "create", "nan", "--balance", "ten"}, []string{"ten"}},
		{"float syntax", []string{"accounts", "create", "exp", "--balance", "1e3"}, []string{"1e3"}},
		{"bad tier", []string{"accounts", "create", "gold", "--tier", "gold"}, []string{"gold", "tier"}},
		{"bad account id", []string{"accounts", "create", "a/b"}, []string{"a/b"}},
		{"missing account id", []string{"accounts", "create"}, []string{"ACCOUNT"}},
		{"extra argument", []string{"accounts", "create", "x1", "x2"}, []string{"x2"}},
		{"unknown account (get)", []string{"accounts", "get", "nobody"}, []string{"nobody", "not found"}},
		{"unknown account (credit)", []string{"accounts", "credit", "nobody", "1"}, []string{"nobody", "not found"}},
		{"over-precise credit", []string{"accounts", "credit", "acme", "0.0000001"}, []string{"0.0000001", "6 decimal"}},
		{"zero credit", []string{"accounts", "credit", "acme", "0"}, []string{"amount"}},
		{"credit not a number", []string{"accounts", "credit", "acme", "lots"}, []string{"lots"}},
		{"missing credit amount", []string{"accounts", "credit", "acme"}, []string{"USD"}},
		{"-o yaml", []string{"accounts", "list", "-o", "yaml"}, []string{"yaml"}},
		{"-o yaml on create", []string{"accounts", "create", "yaml", "-o", "yaml"}, []string{"yaml"}},
		{"unknown flag", []string{"accounts", "create", "flag", "--balanse", "1"}, []string{"--balanse"}},
		{"unknown scope (typo)", []string{"keys", "create", "--account", "acme", "--scopes", "chat:wirte", "--name", "typo"}, []string{"chat:wirte"}},
		{"one unknown scope", []string{"keys", "create", "--account", "acme", "--scopes", "chat:write,admin", "--name", "typo2"}, []string{"admin"}},
		{"no scopes", []string{"keys", "create", "--account", "acme", "--name", "noscope"}, []string{"scope"}},
		{"empty scopes", []string{"keys", "create", "--account", "acme", "--scopes", "", "--name", "emptyscope"}, []string{"scope"}},
		{"rate limit 5/x", []string{"keys", "create", "--account", "acme", "--scopes", "chat:write", "--rate-limit", "5/x", "--name", "r1"}, []string{"5/x"}},
		{"rate limit abc", []string{"keys", "create", "--account", "acme", "--scopes", "chat:write", "--rate-limit", "abc", "--name", "r2"}, []string{"abc"}},
		{"rate limit 0/m", []string{"keys", "create", "--account", "acme", "--scopes", "chat:write", "--rate-limit", "0/m", "--name", "r3"}, []string{"0/m"}},
		{"malformed duration", []string{"keys", "create", "--account", "acme", "--scopes", "chat:write", "--expires-in", "2x", "--name", "d1"}, []string{"2x"}},
		{"negative duration", []string{"keys", "create", "--account", "acme", "--scopes", "chat:write", "--expires-in", "-1h", "--name", "d2"}, []string{"-1h"}},
		{"over-precise cap", []string{"keys", "create", "--account", "acme", "--scopes", "chat:write", "--spend-cap", "0.0000001", "--name", "c1"}, []string{"0.0000001"}},
		{"negative cap", []string{"keys", "create", "--account", "acme", "--scopes", "chat:write", "--spend-cap", "-1", "--name", "c2"}, []string{"-1", "negative"}},
		{"unknown account (keys create)", []string{"keys", "create", "--account", "nobody", "--scopes", "chat:write", "--name", "u1"}, []string{"nobody"}},
		{"no account", []string{"keys", "create", "--scopes", "chat:write", "--name", "u2"}, []string{"account"}},
		{"keys create -o yaml", []string{"keys", "create", "--account", "acme", "--scopes", "chat:write", "--name", "y", "-o", "yaml"}, []string{"yaml"}},
		{"keys create positional", []string{"keys", "create", "acme", "--scopes", "chat:write", "--name", "p"}, []string{"acme"}},
		{"unknown key (get)", []string{"keys", "get", "key_doesnotexist"}, []string{"key_doesnotexist", "not found"}},
		{"unknown key (revoke)", []string{"keys", "revoke", "key_doesnotexist"}, []string{"key_doesnotexist", "not found"}},
		{"unknown key (rotate)", []string{"keys", "rotate", "key_doesnotexist"}, []string{"key_doesnotexist", "not found"}},
		{"bad grace", []string{"keys", "rotate", k.ID, "--grace", "soon"}, []string{"soon"}},
		{"negative grace", []string{"keys", "rotate", k.ID, "--grace", "-1s"}, []string{"-1s"}},
		{"missing key id (get)", []string{"keys", "get"}, []string{"KEY_ID"}},
		{"missing key id (revoke)", []string{"keys", "revoke"}, []string{"KEY_ID"}},
		{"missing key id (rotate)", []string{"keys", "rotate"}, []string{"KEY_ID"}},
		{"unknown account (keys list)", []string{"keys", "list", "--account", "nobody"}, []string{"nobody"}},
		{"--config without --db", []string{"keys", "create", "--account", "acme", "--scopes", "chat:write", "--config", "x.yaml"}, []string{"--config"}},
		{"--db and --server", []string{"accounts", "list", "--db", filepath.Join(t.TempDir(), "x.db")}, []string{"--db", "--server"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			wantFailure(t, s.cli(t, tt.args...), tt.want...)
		})
	}
	t.Run("negative credit", func(t *testing.T) {
		// After --, -5 is the amount rather than a flag.
		r := runKeygate(t, envWithToken(s.token), "accounts", "credit", "--server", s.admin, "acme", "--", "-5")
		wantFailure(t, r, "-5", "negative")
	})
	t.Run("check", func(t *testing.T) {
		r := runKeygate(t, baseEnv(), "check", "--authz", s.listen, "--key", k.Secret, "POST")
		if r.code != 2 || !strings.Contains(r.stderr, "PATH") {
			t.Errorf("check without PATH: want exit 2 naming PATH\n%s", r)
		}
		r = runKeygate(t, baseEnv(), "check", "--authz", s.listen, "--key", k.Secret, "-o", "yaml", "POST", "/v1/chat/completions")
		if r.code != 2 || !strings.Contains(r.stderr, "yaml") {
			t.Errorf("check -o yaml: want exit 2 naming yaml\n%s", r)
		}
	})
	t.Run("--db mode validates alike", func(t *testing.T) {
		db := filepath.Join(t.TempDir(), "cli.db")
		dbOK(t, db, nil, "accounts", "create", "acme")
		for _, args := range [][]string{
			{"keys", "create", "--account", "acme", "--scopes", "chat:wirte"},
			{"keys", "create", "--account", "acme", "--scopes", "models:read"}, // not a route of the built-in config
			{"accounts", "create", "neg", "--balance", "-1"},
			{"accounts", "create", "acme"},
		} {
			wantFailure(t, runKeygate(t, baseEnv(), append(args, "--db", db)...), args[len(args)-1])
		}
		var keys []keyJSON
		dbOK(t, db, &keys, "keys", "list")
		var accts []accountJSON
		dbOK(t, db, &accts, "accounts", "list")
		if len(keys) != 0 || len(accts) != 1 {
			t.Errorf("--db: after refused commands %d keys and %d accounts, want 0 and 1", len(keys), len(accts))
		}
		// With --config, the routes of that file guard the scopes.
		cfg := filepath.Join(t.TempDir(), "routes.yaml")
		if err := os.WriteFile(cfg, []byte(exampleConfig+"  - {method: GET, path: /v1/models, scope: models:read}\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		var mk keyJSON
		dbOK(t, db, &mk, "keys", "create", "--account", "acme", "--scopes", "models:read", "--config", cfg)
		if !slices.Equal(mk.Scopes, []string{"models:read"}) {
			t.Errorf("keys create --db --config: scopes %v", mk.Scopes)
		}
	})

	if after := snapshot(); after != before {
		t.Errorf("refused commands changed the store:\nbefore %s\nafter  %s", before, after)
	}
}

// TestE2EJSONOutput: the -o json shapes scripts rely on, flags on either side
// of positionals, and reads that include unflushed debits.
func TestE2EJSONOutput(t *testing.T) {
	t.Parallel()
	s := startServer(t, serverOpts{})

	var raw map[string]json.RawMessage
	s.ok(t, &raw, "accounts", "create", "acme", "--balance", "1.5")
	wantFields(t, "accounts create", raw, "id", "balance_micros")
	s.ok(t, &raw, "accounts", "get", "acme")
	wantFields(t, "accounts get", raw, "id", "balance_micros")
	if string(raw["balance_micros"]) != "1500000" {
		t.Errorf("accounts get: balance_micros %s, want the integer 1500000", raw["balance_micros"])
	}
	s.ok(t, &raw, "accounts", "credit", "acme", "0.000001")
	if string(raw["balance_micros"]) != "1500001" {
		t.Errorf("accounts credit: balance_micros %s, want 1500001", raw["balance_micros"])
	}
	var list []map[string]json.RawMessage
	s.ok(t, &list, "accounts", "list")
	if len(list) != 1 {
		t.Fatalf("accounts list: %d elements, want 1", len(list))
	}
	wantFields(t, "accounts list[0]", list[0], "id", "balance_micros")

	s.ok(t, &raw, "keys", "create", "--account", "acme", "--scopes", "chat:write,chat:read", "--spend-cap", "1")
	wantFields(t, "keys create", raw, "id", "secret", "account", "scopes", "state", "spent_micros")
	var created keyJSON
	if err := remarshal(raw, &created); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"keys", "get", "-o", "json", created.ID},
		{"keys", "get", created.ID, "-o", "json"},
		{"keys", "-o", "json", "get", created.ID},
		{"keys", "get", "--output=json", created.ID},
	} {
		r := s.cli(t, args...)
		var k map[string]json.RawMessage
		mustJSON(t, r, &k, args)
		wantFields(t, strings.Join(args, " "), k, "id", "account", "scopes", "state", "spent_micros")
		if strings.Contains(r.stdout, created.Secret) || strings.Contains(r.stdout, `"secret"`) {
			t.Errorf("keygate %v shows the secret again:\n%s", args, r.stdout)
		}
	}
	got := s.key(t, created.ID)
	if got.ID != created.ID || got.Account != "acme" || !slices.Equal(got.Scopes, []string{"chat:read", "chat:write"}) &&
		!slices.Equal(got.Scopes, []string{"chat:write", "chat:read"}) || got.State != "active" || got.SpentMicros != 0 {
		t.Errorf("keys get = %+v", got)
	}
	r := s.cli(t, "keys", "list", "-o", "json", "--account", "acme")
	var keys []keyJSON
	mustJSON(t, r, &keys, nil)
	if len(keys) != 1 || keys[0].ID != created.ID || strings.Contains(r.stdout, created.Secret) {
		t.Errorf("keys list --account acme -o json: %s", r.stdout)
	}
	// keys list: oldest first.
	second := s.createKey(t, "acme", "chat:read")
	third := s.createKey(t, "acme", "chat:write")
	s.ok(t, &keys, "keys", "list")
	var ids []string
	for _, k := range keys {
		ids = append(ids, k.ID)
	}
	if want := []string{created.ID, second.ID, third.ID}; !slices.Equal(ids, want) {
		t.Errorf("keys list: %v, want oldest first %v", ids, want)
	}
	s.createAccount(t, "empty", "0")
	r = s.cli(t, "keys", "list", "--account", "empty", "-o", "json")
	if r.code != 0 || strings.TrimSpace(r.stdout) != "[]" {
		t.Errorf("keys list of an account without keys: want [] \n%s", r)
	}

	// Reads through the server include debits the ledger has not flushed.
	for range 3 {
		wantAllowed(t, s.checkKey(t, created.Secret, "POST", "/v1/chat/completions"), created.ID, "acme")
	}
	if got := s.account(t, "acme").BalanceMicros; got != 1_500_001-3*priceChat {
		t.Errorf("balance right after 3 Checks = %d, want %d", got, 1_500_001-3*priceChat)
	}
	if got := s.key(t, created.ID).SpentMicros; got != 3*priceChat {
		t.Errorf("spent right after 3 Checks = %d, want %d", got, 3*priceChat)
	}

	// Amounts with up to 6 places, and durations in days.
	s.ok(t, &raw, "accounts", "create", "micro", "--balance", "0.000150")
	if string(raw["balance_micros"]) != "150" {
		t.Errorf("--balance 0.000150: balance_micros %s, want 150", raw["balance_micros"])
	}
	before := time.Now()
	days := s.createKey(t, "acme", "chat:write", "--expires-in", "90d", "--spend-cap", "0.5")
	if days.ExpiresAt == nil || days.ExpiresAt.Before(before.Add(90*24*time.Hour-time.Minute)) || days.ExpiresAt.After(time.Now().Add(90*24*time.Hour+time.Minute)) {
		t.Errorf("--expires-in 90d: expires_at %v, want 90 days from now", days.ExpiresAt)
	}
	if days.SpendCapMicros == nil || *days.SpendCapMicros != 500_000 {
		t.Errorf("--spend-cap 0.5: spend_cap_micros %v, want 500000", days.SpendCapMicros)
	}
	var graced keyJSON
	s.ok(t, &graced, "keys", "rotate", days.ID, "--grace", "1d12h")
	if graced.OldKey == nil || graced.OldKey.RevokedAt == nil || graced.OldKey.RevokedAt.Before(before.Add(36*time.Hour-time.Minute)) {
		t.Errorf("--grace 1d12h: old key %+v, want revoked 36h from now", graced.OldKey)
	}

	var rot map[string]json.RawMessage
	s.ok(t, &rot, "keys", "rotate", created.ID, "--grace", "1h")
	wantFields(t, "keys rotate", rot, "id", "secret", "old_key")
	var revoked map[string]json.RawMessage
	s.ok(t, &revoked, "keys", "revoke", created.ID)
	if string(revoked["state"]) != `"revoked"` {
		t.Errorf("keys revoke: state %s", revoked["state"])
	}
}

func wantFields(t *testing.T, what string, m map[string]json.RawMessage, fields ...string) {
	t.Helper()
	for _, f := range fields {
		v, ok := m[f]
		if !ok {
			t.Errorf("%s -o json has no %q: %v", what, f, keysOf(m))
			continue
		}
		switch {
		case strings.HasSuffix(f, "_micros"):
			if !regexpInt.Match(v) {
				t.Errorf("%s: %s = %s, want an integer", what, f, v)
			}
		case f == "scopes":
			if !bytes.HasPrefix(v, []byte("[")) {
				t.Errorf("%s: scopes = %s, want an array", what, v)
			}
		}
	}
	if s, ok := m["secret"]; ok && !bytes.HasPrefix(s, []byte(`"kg_`)) {
		t.Errorf("%s: secret = %s, want kg_...", what, s)
	}
	if id, ok := m["id"]; ok && what[:4] == "keys" && !bytes.HasPrefix(id, []byte(`"key_`)) {
		t.Errorf("%s: id = %s, want key_...", what, id)
	}
}

var regexpInt = regexp.MustCompile(`^-?[0-9]+$`)

func keysOf(m map[string]json.RawMessage) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}

func remarshal(from, to any) error {
	b, err := json.Marshal(from)
	if err != nil {
		return err
	}
	return json.Unmarshal(b, to)
}

// TestE2EAdminFlagsEverywhere: --server, --db and -o are accepted by every
// admin command, before or after the positionals.
func TestE2EAdminFlagsEverywhere(t *testing.T) {
	t.Parallel()
	s := startServer(t, serverOpts{})
	// Every admin command, each with -o json and the target (--server ADDR
	// or --db FILE) placed after its positionals, before them, or both.
	const after, before, both = 1, 2, 3
	run := func(t *testing.T, env []string, target []string, prefix string) {
		var k keyJSON
		acct := prefix + "acme"
		steps := []struct {
			args  func() []string
			place int
			into  any
		}{
			{func() []string { return []string{"accounts", "create", acct, "--balance", "1"} }, after, nil},
			{func() []string { return []string{"accounts", "get", acct} }, both, nil},
			{func() []string { return []string{"accounts", "credit", acct, "1"} }, before, nil},
			{func() []string { return []string{"accounts", "list"} }, both, nil},
			{func() []string { return []string{"keys", "create", "--account", acct, "--scopes", "chat:write"} }, after, &k},
			{func() []string { return []string{"keys", "get", k.ID} }, both, nil},
			{func() []string { return []string{"keys", "list", "--account", acct} }, both, nil},
			{func() []string { return []string{"keys", "rotate", k.ID} }, before, &k},
			{func() []string { return []string{"keys", "revoke", k.ID} }, after, nil},
		}
		for _, st := range steps {
			args := st.args()
			var forms [][]string
			if st.place&after != 0 {
				forms = append(forms, append(append(slices.Clone(args), target...), "-o", "json"))
			}
			if st.place&before != 0 {
				forms = append(forms, append(append([]string{args[0], args[1], "-o", "json"}, target...), args[2:]...))
			}
			for _, form := range forms {
				into := st.into
				if into == nil {
					into = new(json.RawMessage)
				}
				mustJSON(t, runKeygate(t, env, form...), into, form)
			}
		}
		if k.State != "active" || k.Secret == "" {
			t.Errorf("rotated key %+v: want an active key with its secret", k)
		}
	}
	t.Run("--server", func(t *testing.T) {
		run(t, envWithToken(s.token), []string{"--server", s.admin}, "srv-")
	})
	s.stop(t)
	t.Run("--db", func(t *testing.T) {
		run(t, baseEnv(), []string{"--db", s.db}, "db-")
		var accts []accountJSON
		dbOK(t, s.db, &accts, "accounts", "list")
		if len(accts) != 2 {
			t.Errorf("accounts after both runs: %+v, want srv-acme and db-acme", accts)
		}
	})
}

// TestE2EVersion: `keygate version` prints the stamped version and commit.
func TestE2EVersion(t *testing.T) {
	t.Parallel()
	r := runKeygate(t, baseEnv(), "version")
	if r.code != 0 || !strings.Contains(r.stdout, e2eVersion) || !strings.Contains(r.stdout, e2eCommit) {
		t.Errorf("keygate version: want exit 0 with %s and %s\n%s", e2eVersion, e2eCommit, r)
	}
}

// TestE2EBadConfig: serve refuses a bad config with the field named, and
// never starts.
func TestE2EBadConfig(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name, config string
		want         []string
	}{
		{"unknown tier field", "tiers:\n  free: {rate_limt: 20/m}\ndefault_tier: free\n", []string{"rate_limt"}},
		{"unknown top-level field", exampleConfig + "listen_addr: 127.0.0.1:1\n", []string{"listen_addr"}},
		{"bad price", "routes:\n  - {method: POST, path: /v1/a, scope: a:write, price_usd: \"0.002\"}\n  - {method: POST, path: /v1/b, scope: b:write, price_usd: \"1e-3\"}\n", []string{"routes[1].price_usd"}},
		{"float price", "routes:\n  - {method: POST, path: /v1/a, scope: a:write, price_usd: 0.0000001}\n", []string{"routes[0].price_usd"}},
		{"bad rate", "tiers:\n  free: {rate_limit: 20/x}\ndefault_tier: free\n", []string{"tiers.free.rate_limit"}},
		{"bad log level", exampleConfig + "log_level: loud\n", []string{"log_level"}},
		{"not YAML", "routes: [\n", []string{"yaml"}},
		{"tiers without default_tier", "tiers:\n  free: {rate_limit: 20/m}\n", []string{"default_tier"}},
		{"unknown route field", "routes:\n  - {method: GET, path: /v1/a, scope: a:read, prise_usd: \"1\"}\n", []string{"routes[0].prise_usd"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			cfg := filepath.Join(dir, "bad.yaml")
			if err := os.WriteFile(cfg, []byte(tt.config), 0o600); err != nil {
				t.Fatal(err)
			}
			p := startProc(t, envWithToken("x"), "serve", "--config", cfg, "--db", filepath.Join(dir, "k.db"),
				"--listen", freeAddr(t), "--admin-listen", freeAddr(t), "--http-listen", freeAddr(t))
			code, ok := p.wait(15 * time.Second)
			if !ok {
				t.Fatalf("keygate serve with a bad config still running after 15s\n%s", p.out.String())
			}
			out := p.out.String()
			if code == 0 {
				t.Errorf("exit 0 with a bad config\n%s", out)
			}
			for _, w := range append(tt.want, cfg) {
				if !strings.Contains(strings.ToLower(out), strings.ToLower(w)) {
					t.Errorf("output does not name %q\n%s", w, out)
				}
			}
			if _, err := os.Stat(filepath.Join(dir, "k.db")); err == nil {
				t.Errorf("a bad config still created the store file")
			}
		})
	}
	t.Run("missing file", func(t *testing.T) {
		t.Parallel()
		dir := t.TempDir()
		missing := filepath.Join(dir, "nope.yaml")
		p := startProc(t, envWithToken("x"), "serve", "--config", missing, "--db", filepath.Join(dir, "k.db"),
			"--listen", freeAddr(t), "--admin-listen", freeAddr(t), "--http-listen", freeAddr(t))
		code, ok := p.wait(15 * time.Second)
		if !ok || code == 0 || !strings.Contains(p.out.String(), missing) {
			t.Errorf("serve --config %s: exit %d (exited %v), want non-zero naming the file\n%s", missing, code, ok, p.out.String())
		}
	})
}

// TestE2EPortInUse: an address that cannot be bound fails the start with the
// address named, and leaves the store free for the next process.
func TestE2EPortInUse(t *testing.T) {
	t.Parallel()
	held, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	db := filepath.Join(t.TempDir(), "k.db")
	for _, flag := range []string{"--listen", "--admin-listen", "--http-listen"} {
		args := map[string]string{"--listen": freeAddr(t), "--admin-listen": freeAddr(t), "--http-listen": freeAddr(t)}
		args[flag] = held.Addr().String()
		p := startProc(t, envWithToken("x"), "serve", "--db", db,
			"--listen", args["--listen"], "--admin-listen", args["--admin-listen"], "--http-listen", args["--http-listen"])
		code, ok := p.wait(15 * time.Second)
		if !ok {
			t.Fatalf("serve %s %s (in use) still running after 15s\n%s", flag, held.Addr(), p.out.String())
		}
		if code == 0 || !strings.Contains(p.out.String(), held.Addr().String()) {
			t.Errorf("serve %s %s (in use): exit %d, want non-zero naming the address\n%s", flag, held.Addr(), code, p.out.String())
		}
	}
	dbOK(t, db, nil, "accounts", "list")
}
