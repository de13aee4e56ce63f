package main_test

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	accesslogdatav3 "github.com/envoyproxy/go-control-plane/envoy/data/accesslog/v3"
	"github.com/google/go-cmp/cmp"
	"github.com/redis/go-redis/v9"

	"github.com/keygate/keygate/keystore/rconn/rconntest"
)

// migrateSettleConfig is exampleConfig in on_response mode, with a
// settle_timeout long enough that no reservation expires during the test,
// and a max price on chat completions.
var migrateSettleConfig = "settle: on_response\nsettle_timeout: 1h\n" + strings.Replace(exampleConfig,
	`scope: chat:write, price_usd: "0.002"}`, `scope: chat:write, price_usd: "0.002", max_price_usd: "0.005"}`, 1)

// migrateSummaryJSON is keygate migrate -o json.
type migrateSummaryJSON struct {
	Accounts      int    `json:"accounts"`
	Keys          int    `json:"keys"`
	Reservations  int    `json:"reservations"`
	BalanceMicros string `json:"balance_micros"`
	BalanceUSD    string `json:"balance_usd"`
	Epoch         string `json:"redis_epoch"`
}

// rawJSON runs an admin command through s with -o json and returns its
// output decoded as is, every field kept.
func rawJSON(t *testing.T, s *server, args ...string) map[string]any {
	t.Helper()
	var v map[string]any
	s.ok(t, &v, args...)
	return v
}

// writeFile writes content to dir/name and returns the path.
func writeFile(t *testing.T, dir, name, content string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestE2EMigrate moves a bbolt deployment to Redis as an operator would:
// accounts, keys, credits, spend and an open reservation made through a
// store: bbolt server; the server stopped; keygate migrate; a store: redis
// replica on a new --db file. The old secrets keep working (the revoked
// one stays refused), and accounts get / keys get answer exactly as the
// bbolt server did, field for field.
func TestE2EMigrate(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	db := filepath.Join(dir, "bbolt.db")
	rs := rconntest.Start(t)
	redisCfg := writeFile(t, dir, "redis.yaml", migrateSettleConfig+"store: redis\nredis:\n  addr: "+rs.Addr()+"\n  "+steadyTimeout+"\n")
	migrate := func(args ...string) result {
		return runKeygate(t, baseEnv(), append([]string{"migrate", "--db", db, "--config", redisCfg}, args...)...)
	}

	// On settle: on_check, as most deployments run: spend at the Check.
	s := startServer(t, serverOpts{db: db, config: exampleConfig})
	s.createAccount(t, "acme", "10", "--tier", "tier1", "--alert-below", "1")
	s.createAccount(t, "beta", "0.5")
	s.ok(t, nil, "accounts", "credit", "acme", "2.5")
	s.ok(t, nil, "accounts", "credit", "beta", "1", "--alert-below", "0.2")
	daily := s.createKey(t, "acme", "chat:write,chat:read", "--name", "daily", "--spend-cap", "5", "--cap-period", "day")
	emb := s.createKey(t, "acme", "embeddings:write", "--rate-limit", "600/m", "--expires-in", "90d")
	revoked := s.createKey(t, "beta", "chat:write")
	old := s.createKey(t, "beta", "chat:write,embeddings:write", "--spend-cap", "1")
	for range 3 {
		wantAllowed(t, s.checkKey(t, daily.Secret, "POST", "/v1/chat/completions"), daily.ID, "acme")
	}
	for range 5 {
		wantAllowed(t, s.checkKey(t, emb.Secret, "POST", pricedPath), emb.ID, "acme")
	}
	wantAllowed(t, s.checkKey(t, revoked.Secret, "POST", "/v1/chat/completions"), revoked.ID, "beta")
	wantAllowed(t, s.checkKey(t, old.Secret, "POST", "/v1/chat/completions"), old.ID, "beta")
	s.ok(t, nil, "keys", "revoke", revoked.ID)
	var rotated keyJSON
	s.ok(t, &rotated, "keys", "rotate", old.ID, "--grace", "1h")
	s.stop(t)

	// On settle: on_response: one reservation settled, one left open.
	s = startServer(t, serverOpts{db: db, config: migrateSettleConfig})
	wantAllowed(t, s.checkID(t, daily.Secret, "r-settled"), daily.ID, "acme")
	s.sendLogs(t, []*accesslogdatav3.HTTPAccessLogEntry{logEntry("r-settled", 200, "0.003")})
	wantAllowed(t, s.checkID(t, daily.Secret, "r-open"), daily.ID, "acme")

	t.Run("refused while serve holds the file", func(t *testing.T) {
		wantFailure(t, migrate(), "in use by a running keygate serve", "stop it first")
	})

	reads := [][]string{{"accounts", "get", "acme"}, {"accounts", "get", "beta"}}
	for _, id := range []string{daily.ID, emb.ID, revoked.ID, old.ID, rotated.ID} {
		reads = append(reads, []string{"keys", "get", id})
	}
	before := make([]map[string]any, len(reads))
	for i, args := range reads {
		before[i] = rawJSON(t, s, args...)
	}
	if got := before[0]["reserved_micros"]; got != float64(priceChat) {
		t.Fatalf("acme reserved_micros before = %v, want the open reservation's %d", got, priceChat)
	}
	s.stop(t)

	t.Run("refused with a bbolt config", func(t *testing.T) {
		bbolt := writeFile(t, t.TempDir(), "bbolt.yaml", exampleConfig)
		wantFailure(t, runKeygate(t, baseEnv(), "migrate", "--db", db, "--config", bbolt), "store: redis")
	})
	t.Run("--force refused with nothing to clear", func(t *testing.T) {
		wantFailure(t, migrate("--force"), "interrupted", "nothing was changed")
	})

	var sum migrateSummaryJSON
	mustJSON(t, migrate("-o", "json"), &sum, []string{"migrate"})
	const totalBalance = 12_500_000 - 3*priceChat - 5*priceEmbedding - 3000 + // acme: credits, Checks, the settled reservation
		1_500_000 - 2*priceChat // beta
	want := migrateSummaryJSON{Accounts: 2, Keys: 5, Reservations: 1, BalanceMicros: strconv.Itoa(totalBalance),
		BalanceUSD: "13.9865", Epoch: sum.Epoch}
	if sum.Epoch == "" || sum != want {
		t.Errorf("migrate -o json = %+v, want %+v", sum, want)
	}

	t.Run("a second migrate into the same Redis is refused", func(t *testing.T) {
		r := migrate()
		wantFailure(t, r, "already holds keygate data", "never merges", "nothing was written")
	})

	t.Run("an interrupted migrate is named, and --force recovers", func(t *testing.T) {
		// What a migrate stopped midway leaves under a prefix: its mark and
		// some records.
		ctx := context.Background()
		rc := redis.NewClient(&redis.Options{Addr: rs.Addr()})
		defer rc.Close()
		rc.HSet(ctx, "again:migrating", "token", "t", "source", "old.db", "started_at", "2026-01-02T03:04:05Z", "host", "h")
		rc.HSet(ctx, "again:acct:stale", "tier", "free", "created_at", "1", "bal", "1")
		rc.SAdd(ctx, "again:accounts", "stale")
		again := writeFile(t, t.TempDir(), "again.yaml", migrateSettleConfig+"store: redis\nredis:\n  addr: "+rs.Addr()+"\n  key_prefix: \"again:\"\n")
		wantFailure(t, runKeygate(t, baseEnv(), "migrate", "--db", db, "--config", again),
			"did not finish", "old.db", "keygate migrate --db "+db+" --config "+again+" --force")
		var got migrateSummaryJSON
		mustJSON(t, runKeygate(t, baseEnv(), "migrate", "--db", db, "--config", again, "--force", "-o", "json"), &got, []string{"migrate", "--force"})
		if marker := rc.Get(ctx, "again:marker").Val(); got.Accounts != 2 || got.Keys != 5 || got.Epoch != marker || marker == "" {
			t.Errorf("migrate --force -o json = %+v, want 2 accounts, 5 keys, the prefix's marker %q", got, marker)
		}
		if ids := rc.SMembers(ctx, "again:accounts").Val(); len(ids) != 2 || slices.Contains(ids, "stale") {
			t.Errorf("again:accounts = %v, want acme and beta", ids)
		}
	})

	// A replica on a new --db file serves the migrated deployment.
	c := &cluster{redis: rs, config: migrateSettleConfig + "store: redis\nredis:\n  addr: " + rs.Addr() + "\n  " + steadyTimeout + "\n",
		names: []string{"A"}}
	a := c.start(t, "")
	c.reps = []*server{a}
	for i, args := range reads {
		if diff := cmp.Diff(before[i], rawJSON(t, a, args...)); diff != "" {
			t.Errorf("keygate %v through the Redis replica differs from the bbolt server (-bbolt +redis):\n%s", args, diff)
		}
	}
	wantAllowed(t, a.checkKey(t, daily.Secret, "GET", freePath), daily.ID, "acme")
	wantInvalidKey(t, a.checkKey(t, revoked.Secret, "POST", "/v1/chat/completions"))

	// Money moves from the migrated balances: the open reservation settles
	// through the replica, and new requests are charged exactly.
	a.sendLogs(t, []*accesslogdatav3.HTTPAccessLogEntry{logEntry("r-open", 200, "0.004")})
	wantAllowed(t, a.checkID(t, daily.Secret, "m-1"), daily.ID, "acme")
	wantAllowed(t, a.checkID(t, rotated.Secret, "m-2"), rotated.ID, "beta")
	wantAllowed(t, a.checkID(t, old.Secret, "m-3"), old.ID, "beta") // within its grace
	a.sendLogs(t, []*accesslogdatav3.HTTPAccessLogEntry{logEntry("m-1", 200, ""), logEntry("m-2", 200, "0.001"), logEntry("m-3", 200, "")})
	for _, tt := range []struct {
		what, id         string
		balance, reserve float64
	}{
		{"accounts", "acme", before[0]["balance_micros"].(float64) - 4000 - priceChat, 0},
		{"accounts", "beta", before[1]["balance_micros"].(float64) - 1000 - priceChat, 0},
	} {
		got := a.billing(t, tt.what, tt.id)
		if float64(got.BalanceMicros) != tt.balance || float64(got.ReservedMicros) != tt.reserve {
			t.Errorf("%s %s after settling through the replica: %+v, want balance %v reserved %v", tt.what, tt.id, got, tt.balance, tt.reserve)
		}
	}
	if got, want := a.billing(t, "keys", daily.ID).SpentMicros, int64(before[2]["spent_micros"].(float64))+4000+priceChat; got != want {
		t.Errorf("daily key spent %d, want %d", got, want)
	}
	replicaDB := a.db
	c.stopAll(t)

	t.Run("a replica's cache file is refused", func(t *testing.T) {
		r := runKeygate(t, baseEnv(), "migrate", "--db", replicaDB, "--config", redisCfg)
		wantFailure(t, r, "cache")
	})
	t.Run("serve in Redis mode refuses the old bbolt file as its cache", func(t *testing.T) {
		r := runKeygate(t, baseEnv(), "serve", "--db", db, "--config", redisCfg,
			"--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0")
		wantFailure(t, r, "replica's cache", "keygate migrate")
	})
	t.Run("help says what to do after a failure", func(t *testing.T) {
		r := runKeygate(t, baseEnv(), "migrate", "--help")
		for _, w := range []string{"--force", "NEW --db file", "never merges"} {
			if !strings.Contains(r.stdout, w) {
				t.Errorf("migrate --help does not say %q:\n%s", w, r.stdout)
			}
		}
	})
}
