package main_test

// End-to-end tests of store: redis: several real keygate processes on one
// real redis-server (rconntest), driven as an operator and Envoy drive
// them: admin commands (the admin API and the CLI) and ext_authz Checks.
// The bounds asserted are the contract's (issue 5, "Pinned details"): an
// admin change honoured by every replica within one second of the
// command's return, balances and caps exact across replicas, a global rate
// limit within limit + (replicas − 1) × lease, and the configured
// behaviour while Redis is down, with no committed debit lost or doubled.
// Measured figures (propagation times, allowed counts) are logged.

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"

	"github.com/keygate/keygate/keystore/rconn/rconntest"
	adminv1 "github.com/keygate/keygate/proto/keygate/admin/v1"
)

const (
	// pricedPath is POST /v1/embeddings of exampleConfig: scope
	// embeddings:write, priceEmbedding. freePath is a GET of chat:read,
	// price 0: it shows that a key authenticates without spending.
	pricedPath  = "/v1/embeddings"
	freePath    = "/v1/chat/completions/chatcmpl-e2e"
	redisScopes = "embeddings:write,chat:read"
	// unknownSecret is well formed but belongs to no key.
	unknownSecret = "kg_e2eUnknownKeyThatNoReplicaHasEverSeen00"

	// propagationBound is the contract's: a create, revoke, rotate or
	// credit is honoured by every replica within one second of the admin
	// command's return.
	propagationBound = time.Second
	// pollFor bounds the polls that measure propagation: long enough to
	// measure a miss of the bound rather than only report it.
	pollFor = 5 * time.Second
	// settleFor bounds waiting for spend reports (one a second per replica)
	// and for a breaker to close after Redis returns: generous, as the
	// machine is small; only the awaited event ends a wait.
	settleFor = 20 * time.Second
	// leaseFactor is rlease's largest money lease, in prices.
	leaseFactor = 64
)

func pricedReq(secret string) *authv3.CheckRequest { return bearerRequest(secret, "POST", pricedPath) }
func freeReq(secret string) *authv3.CheckRequest   { return bearerRequest(secret, "GET", freePath) }

// redisConfig is exampleConfig with store: redis on addr; extra are more
// lines of the redis: block.
func redisConfig(addr string, extra ...string) string {
	var b strings.Builder
	b.WriteString(exampleConfig)
	b.WriteString("store: redis\nredis:\n  addr: " + addr + "\n")
	var top []string
	for _, l := range extra {
		if strings.HasPrefix(l, "redis_outage:") {
			top = append(top, l) // a block of its own, not redis's
			continue
		}
		b.WriteString("  " + l + "\n")
	}
	for _, l := range top {
		b.WriteString(l + "\n")
	}
	return b.String()
}

// steadyTimeout replaces the 50ms default of redis.timeout in every test
// here: on this small shared machine, with race-instrumented replicas, a
// call now and then takes longer than 50ms, and a timeout opens the breaker
// as an outage would (spend fails closed, rate limits fall back to each
// replica's share) where the test did not mean one. An outage here is a
// killed Redis, whose refused connections fail at once whatever the
// timeout; the bound itself is keystore/rconn's tests' (a paused Redis).
const steadyTimeout = "timeout: 1s"

// alwaysFsync makes redis-server fsync its AOF before it answers a write,
// so that a SIGKILL loses nothing it acknowledged: "no committed debit
// lost" is then keygate's to keep, not the AOF's everysec window's.
var alwaysFsync = []rconntest.Option{rconntest.Args("--appendfsync", "always")}

// cluster is one redis-server and the keygate replicas that share it.
type cluster struct {
	redis  *rconntest.Server
	config string
	reps   []*server
	names  []string
}

// startCluster starts a redis-server and n replicas on it, each with its
// own --db file.
func startCluster(t *testing.T, n int, redisOpts []rconntest.Option, extra ...string) *cluster {
	t.Helper()
	rs := rconntest.Start(t, redisOpts...)
	c := &cluster{redis: rs, config: redisConfig(rs.Addr(), extra...)}
	for i := range n {
		c.reps = append(c.reps, c.start(t, ""))
		c.names = append(c.names, string(rune('A'+i)))
	}
	return c
}

// start starts a replica of c on db ("" for a new file).
func (c *cluster) start(t *testing.T, db string) *server {
	t.Helper()
	s := startServer(t, serverOpts{db: db, config: c.config})
	s.authz(t) // connect here: tryCheck runs on other goroutines
	return s
}

// stopAll stops every running replica with SIGTERM, requiring a clean
// exit: no data race, no panic, the final spend report written.
func (c *cluster) stopAll(t *testing.T) {
	t.Helper()
	for _, s := range c.reps {
		if s.running() {
			s.stop(t)
		}
	}
}

// redisTrouble returns, per replica, the Redis calls that failed or timed
// out and those the open breaker refused, by op.
func (c *cluster) redisTrouble(t *testing.T) string {
	t.Helper()
	re := regexp.MustCompile(`^keygate_redis_commands_total\{op="([^"]*)",result="(error|refused)"\} (\S+)`)
	var parts []string
	for i, s := range c.reps {
		if !s.running() {
			continue
		}
		_, body := httpGet(t, "http://"+s.http+"/metrics")
		var bad []string
		for _, line := range strings.Split(body, "\n") {
			if m := re.FindStringSubmatch(line); m != nil && m[3] != "0" {
				bad = append(bad, m[1]+" "+m[2]+" "+m[3])
			}
		}
		if len(bad) == 0 {
			bad = []string{"none failed"}
		}
		parts = append(parts, c.names[i]+": "+strings.Join(bad, ", "))
	}
	return strings.Join(parts, "; ")
}

// tryCheck sends one Check through s. Unlike check it may run on any
// goroutine: an RPC failure comes back as an error.
func tryCheck(t testing.TB, s *server, req *authv3.CheckRequest) (decision, error) {
	ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
	defer cancel()
	resp, err := s.authz(t).Check(ctx, req)
	if err != nil {
		return decision{}, err
	}
	return decode(t, resp), nil
}

// awaitAll polls every replica at once with req until cond holds for its
// answer, and returns how long after since each first saw it hold, or -1
// for one that did not within pollFor. The time is taken when the answer
// has arrived: an upper bound of the propagation time.
func awaitAll(t *testing.T, reps []*server, since time.Time, req func() *authv3.CheckRequest, cond func(decision) bool) []time.Duration {
	t.Helper()
	out := make([]time.Duration, len(reps))
	var wg sync.WaitGroup
	for i, s := range reps {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out[i] = -1
			for time.Since(since) <= pollFor {
				d, err := tryCheck(t, s, req())
				if err != nil {
					t.Errorf("Check: %v", err)
					return
				}
				if cond(d) {
					out[i] = time.Since(since)
					return
				}
				time.Sleep(5 * time.Millisecond)
			}
		}()
	}
	wg.Wait()
	return out
}

// wantPropagated logs the measured times and fails for any replica that
// did not honour the change within the contract's bound.
func (c *cluster) wantPropagated(t *testing.T, what string, reps []int, got []time.Duration) {
	t.Helper()
	var parts []string
	for i, d := range got {
		name := c.names[reps[i]]
		if d < 0 {
			t.Errorf("%s: replica %s did not honour it within %s", what, name, pollFor)
			parts = append(parts, name+": never")
			continue
		}
		parts = append(parts, fmt.Sprintf("%s: %s", name, d.Round(time.Millisecond)))
		if d > propagationBound {
			t.Errorf("%s: replica %s honoured it %s after the command returned; the contract is %s", what, name, d, propagationBound)
		}
	}
	t.Logf("propagation, %s: %s", what, strings.Join(parts, ", "))
}

// awaitKey waits until every replica authenticates secret (on the free
// route, spending nothing).
func (c *cluster) awaitKey(t *testing.T, secret string) {
	t.Helper()
	got := awaitAll(t, c.reps, time.Now(), func() *authv3.CheckRequest { return freeReq(secret) },
		func(d decision) bool { return d.allowed })
	for i, d := range got {
		if d < 0 {
			t.Fatalf("replica %s does not authenticate the key after %s", c.names[i], pollFor)
		}
	}
}

// adminAPI is a client of one replica's admin API.
type adminAPI struct {
	c     adminv1.AdminClient
	token string
}

func (s *server) api(t testing.TB) adminAPI {
	t.Helper()
	cc := dial(t, s.admin)
	t.Cleanup(func() { cc.Close() })
	return adminAPI{c: adminv1.NewAdminClient(cc), token: s.token}
}

// ctx returns a context carrying the admin token, bounded by cliTimeout.
func (a adminAPI) ctx() (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(context.Background(), cliTimeout)
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+a.token), cancel
}

// money reads an account's balance and a key's spend.
func (a adminAPI) money(account, keyID string) (balance, spent int64, err error) {
	ctx, cancel := a.ctx()
	defer cancel()
	acct, err := a.c.GetAccount(ctx, &adminv1.GetAccountRequest{Id: account})
	if err != nil {
		return 0, 0, err
	}
	k, err := a.c.GetKey(ctx, &adminv1.GetKeyRequest{Id: keyID})
	if err != nil {
		return 0, 0, err
	}
	return acct.GetBalanceMicros(), k.GetSpentMicros(), nil
}

// awaitExact waits until every replica reads the account's balance and
// the key's spend as wanted, and fails saying by how many prices each is
// off otherwise (fewer debits than allows: lost; more: doubled). It
// returns how long after since the last replica read them exact.
func (c *cluster) awaitExact(t *testing.T, account, keyID string, balance, spent int64, since time.Time) time.Duration {
	t.Helper()
	apis := make([]adminAPI, len(c.reps))
	for i, s := range c.reps {
		apis[i] = s.api(t)
	}
	type read struct {
		balance, spent int64
		err            error
	}
	last := make([]read, len(c.reps))
	exact := eventually(settleFor, func() bool {
		all := true
		for i, a := range apis {
			b, s, err := a.money(account, keyID)
			last[i] = read{b, s, err}
			all = all && err == nil && b == balance && s == spent
		}
		return all
	})
	took := time.Since(since)
	if !exact {
		for i, r := range last {
			switch {
			case r.err != nil:
				t.Errorf("replica %s: reading %s and %s: %v", c.names[i], account, keyID, r.err)
			case r.balance != balance || r.spent != spent:
				t.Errorf("replica %s: balance %d (want %d: %+d prices of %d), spent %d (want %d), %s after the last Check",
					c.names[i], r.balance, balance, (r.balance-balance)/priceEmbedding, priceEmbedding, r.spent, spent, took)
			}
		}
	}
	return took
}

// tally counts the answers of many Checks.
type tally struct {
	mu      sync.Mutex
	allowed int
	denials map[string]int // "status type: message"
	byRep   []int          // allowed, per replica
}

func newTally(replicas int) *tally {
	return &tally{denials: map[string]int{}, byRep: make([]int, replicas)}
}

func (c *tally) add(rep int, d decision) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if d.allowed {
		c.allowed++
		c.byRep[rep]++
		return
	}
	c.denials[fmt.Sprintf("%d %s: %s", d.status, d.errType, d.errMsg)]++
}

// burst sends n concurrent Checks to every replica, all released at once,
// and tallies the answers. It returns the time from the release to the
// last answer.
func burst(t *testing.T, reps []*server, n int, req func() *authv3.CheckRequest) (*tally, time.Duration) {
	t.Helper()
	c := newTally(len(reps))
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i, s := range reps {
		for range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				r := req()
				<-start
				d, err := tryCheck(t, s, r)
				if err != nil {
					t.Errorf("Check: %v", err)
					return
				}
				c.add(i, d)
			}()
		}
	}
	began := time.Now()
	close(start)
	wg.Wait()
	return c, time.Since(began)
}

// ---------------------------------------------------------------------------
// 1. Propagation

// TestE2ERedisPropagation: three replicas on one Redis. A key created
// through A authenticates on B and C, a revocation through B is refused on
// A and C, a rotation without grace through C swaps the keys everywhere,
// and a credit through any replica reads the same on all: each within a
// second of the admin command's return.
func TestE2ERedisPropagation(t *testing.T) {
	t.Parallel()
	c := startCluster(t, 3, nil, steadyTimeout)
	a, b, cc := c.reps[0].api(t), c.reps[1].api(t), c.reps[2].api(t)
	all := []int{0, 1, 2}
	allowed := func(d decision) bool { return d.allowed }
	refused := func(d decision) bool { return d.status == 401 && d.errMsg == "Invalid API key" }

	ctx, cancel := a.ctx()
	defer cancel()
	if _, err := a.c.CreateAccount(ctx, &adminv1.CreateAccountRequest{Id: "prop", BalanceUsd: "1"}); err != nil {
		t.Fatalf("CreateAccount through A: %v", err)
	}
	created, err := a.c.CreateKey(ctx, &adminv1.CreateKeyRequest{Account: "prop",
		Scopes: []string{"chat:read", "embeddings:write"}, RateLimit: "60000/m"})
	returned := time.Now()
	if err != nil {
		t.Fatalf("CreateKey through A: %v", err)
	}
	first := created.GetSecret()
	got := awaitAll(t, c.reps, returned, func() *authv3.CheckRequest { return freeReq(first) }, allowed)
	c.wantPropagated(t, "key created through A authenticates", all, got)

	ctx, cancel = b.ctx()
	defer cancel()
	_, err = b.c.RevokeKey(ctx, &adminv1.RevokeKeyRequest{Id: created.GetKey().GetId()})
	returned = time.Now()
	if err != nil {
		t.Fatalf("RevokeKey through B: %v", err)
	}
	got = awaitAll(t, c.reps, returned, func() *authv3.CheckRequest { return freeReq(first) }, refused)
	c.wantPropagated(t, "key revoked through B refused", all, got)

	ctx, cancel = cc.ctx()
	defer cancel()
	second, err := cc.c.CreateKey(ctx, &adminv1.CreateKeyRequest{Account: "prop",
		Scopes: []string{"chat:read", "embeddings:write"}, RateLimit: "60000/m"})
	if err != nil {
		t.Fatalf("CreateKey through C: %v", err)
	}
	c.awaitKey(t, second.GetSecret())
	rotated, err := cc.c.RotateKey(ctx, &adminv1.RotateKeyRequest{Id: second.GetKey().GetId(), Grace: "0"})
	returned = time.Now()
	if err != nil {
		t.Fatalf("RotateKey --grace 0 through C: %v", err)
	}
	var wg sync.WaitGroup
	var oldGot, newGot []time.Duration
	wg.Add(2)
	go func() {
		defer wg.Done()
		oldGot = awaitAll(t, c.reps, returned, func() *authv3.CheckRequest { return freeReq(second.GetSecret()) }, refused)
	}()
	go func() {
		defer wg.Done()
		newGot = awaitAll(t, c.reps, returned, func() *authv3.CheckRequest { return freeReq(rotated.GetSecret()) }, allowed)
	}()
	wg.Wait()
	c.wantPropagated(t, "rotated through C (grace 0): old key refused", all, oldGot)
	c.wantPropagated(t, "rotated through C (grace 0): new key works", all, newGot)
	// The answers of a replica that has it are final: once refused, the old
	// key stays refused; once working, the new key keeps working.
	for i, s := range c.reps {
		if d := s.checkKey(t, second.GetSecret(), "GET", freePath); !refused(d) {
			t.Errorf("replica %s: old key after the rotation: %s", c.names[i], d)
		}
		wantAllowed(t, s.checkKey(t, rotated.GetSecret(), "POST", pricedPath), rotated.GetKey().GetId(), "prop")
	}

	rid := rotated.GetKey().GetId()
	c.awaitExact(t, "prop", rid, 1_000_000-3*priceEmbedding, 3*priceEmbedding, time.Now()) // reported

	// A credit through C is honoured by every replica: an account without
	// money, refused everywhere, is allowed everywhere.
	if _, err := cc.c.CreateAccount(ctx, &adminv1.CreateAccountRequest{Id: "broke", BalanceUsd: "0"}); err != nil {
		t.Fatalf("CreateAccount through C: %v", err)
	}
	broke, err := cc.c.CreateKey(ctx, &adminv1.CreateKeyRequest{Account: "broke",
		Scopes: []string{"chat:read", "embeddings:write"}, RateLimit: "60000/m"})
	if err != nil {
		t.Fatalf("CreateKey through C: %v", err)
	}
	c.awaitKey(t, broke.GetSecret())
	for _, s := range c.reps {
		wantDenied(t, s.checkKey(t, broke.GetSecret(), "POST", pricedPath), 429, "insufficient_quota")
	}
	_, err = cc.c.CreditAccount(ctx, &adminv1.CreditAccountRequest{Id: "broke", AmountUsd: "0.01"})
	returned = time.Now()
	if err != nil {
		t.Fatalf("CreditAccount through C: %v", err)
	}
	got = awaitAll(t, c.reps, returned, func() *authv3.CheckRequest { return pricedReq(broke.GetSecret()) }, allowed)
	c.wantPropagated(t, "credit through C allows priced Checks", all, got)

	// Credits through each replica read the same through every replica.
	balance := int64(1_000_000 - 3*priceEmbedding)
	for i, via := range c.reps {
		var acct accountJSON
		via.ok(t, &acct, "accounts", "credit", "prop", "0.25")
		balance += 250_000
		for j, s := range c.reps {
			if got := s.account(t, "prop").BalanceMicros; got != balance {
				t.Errorf("credit through %s: accounts get through %s reads %d, want %d", c.names[i], c.names[j], got, balance)
			}
		}
	}
	c.stopAll(t)
}

// ---------------------------------------------------------------------------
// 2. Exactness

// TestE2ERedisExact: 3 × 100 concurrent Checks, 100 on each replica at
// once, against money for exactly 100 requests allow exactly 100 in total;
// once reported, every replica reads the balance and the key's spend
// exactly. Once against the account's balance, once against the key's cap.
func TestE2ERedisExact(t *testing.T) {
	t.Parallel()
	c := startCluster(t, 3, nil, steadyTimeout)
	const perReplica, afford = 100, 100
	run := func(t *testing.T, account, balance string, capArgs []string, wantBalance int64, denial string) {
		c.reps[0].createAccount(t, account, balance)
		k := c.reps[1].createKey(t, account, redisScopes, append([]string{"--rate-limit", "60000/m"}, capArgs...)...)
		c.awaitKey(t, k.Secret)
		got, took := burst(t, c.reps, perReplica, func() *authv3.CheckRequest { return pricedReq(k.Secret) })
		done := time.Now()
		t.Logf("%s: %d of %d concurrent Checks allowed (per replica %v) in %s; denials %v; Redis calls %s",
			account, got.allowed, len(c.reps)*perReplica, got.byRep, took.Round(time.Millisecond), got.denials, c.redisTrouble(t))
		if got.allowed != afford {
			t.Errorf("%d allowed in total, want exactly %d", got.allowed, afford)
		}
		for d, n := range got.denials {
			if !strings.HasPrefix(d, "429 insufficient_quota: ") || !strings.Contains(strings.ToLower(d), denial) {
				t.Errorf("denial %q ×%d, want only 429 insufficient_quota about the %s", d, n, denial)
			}
		}
		exactAfter := c.awaitExact(t, account, k.ID, wantBalance, afford*priceEmbedding, done)
		t.Logf("%s: balance and spend read exact through every replica %s after the last Check", account, exactAfter.Round(time.Millisecond))
		for i, s := range c.reps { // and the CLI's views say the same
			if got := s.key(t, k.ID).SpentMicros; got != afford*priceEmbedding {
				t.Errorf("keys get through %s: spent_micros %d, want %d", c.names[i], got, afford*priceEmbedding)
			}
			if got := s.account(t, account).BalanceMicros; got != wantBalance {
				t.Errorf("accounts get through %s: balance_micros %d, want %d", c.names[i], got, wantBalance)
			}
		}
	}
	t.Run("account balance", func(t *testing.T) {
		t.Parallel()
		run(t, "exact-balance", "0.01", nil, 0, "balance") // 100 × 0.0001
	})
	t.Run("key spend cap", func(t *testing.T) {
		t.Parallel()
		run(t, "exact-cap", "10", []string{"--spend-cap", "0.01"}, 10_000_000-afford*priceEmbedding, "cap")
	})
	t.Cleanup(func() { c.stopAll(t) })
}

// ---------------------------------------------------------------------------
// 3. Global rate limit

// TestE2ERedisRateLimit: a key limited to 100/m hammered through three
// replicas at once gets at most 100 plus what the limit refills meanwhile,
// as one exact bucket would (the contract allows (3 − 1) × 5 more: a lease
// is 5% of the limit; held tokens are counted in Redis, so keygate does
// not use that margin), and, as demand exceeds the limit, at least 100
// once unused leases have returned. A second key, 100/s, is used once on
// each replica (each keeps a lease), left quiet while its bucket refills,
// then hammered: the tokens kept through the quiet spell do not add to
// the burst.
func TestE2ERedisRateLimit(t *testing.T) {
	t.Parallel()
	c := startCluster(t, 3, nil, steadyTimeout)
	const (
		limit    = 100
		lease    = limit * 5 / 100
		interval = time.Minute / limit // the limit refills a request this often
	)
	bound := func(elapsed time.Duration) int {
		return limit + int(elapsed/interval) + 1 // + 1: a token refilled as the burst began
	}
	c.reps[0].createAccount(t, "rate", "1")
	k := c.reps[2].createKey(t, "rate", redisScopes, "--rate-limit", "100/m")
	// Wait for the key without spending its limit: a 401 says the replica
	// lacks it; any other answer says it has it.
	got := awaitAll(t, c.reps, time.Now(), func() *authv3.CheckRequest { return bearerRequest(k.Secret, "GET", "/v1/no-such-route") },
		func(d decision) bool { return d.status != 401 })
	for i, d := range got {
		if d < 0 {
			t.Fatalf("replica %s does not know the key", c.names[i])
		}
	}

	began := time.Now()
	first, took := burst(t, c.reps, limit, func() *authv3.CheckRequest { return freeReq(k.Secret) })
	t.Logf("burst of 3 × %d Checks: %d allowed (per replica %v) in %s; bound %d; denials %v",
		limit, first.allowed, first.byRep, took.Round(time.Millisecond), bound(took), first.denials)
	if first.allowed > bound(took) {
		t.Errorf("burst: %d allowed, want at most %d + %d refilled in %s (+1) = %d; the contract's margin is (3−1)×%d",
			first.allowed, limit, int(took/interval), took, bound(took), lease)
	}
	for d, n := range first.denials {
		if !strings.HasPrefix(d, "429 rate_limit_error: ") {
			t.Errorf("denial %q ×%d, want only 429 rate_limit_error", d, n)
		}
	}

	// Demand goes on through every replica: unused leases return within a
	// second, so the limit is reached; the total stays within the bound.
	total := first.allowed
	var rounds int
	eventually(3*time.Second, func() bool {
		rounds++
		more, _ := burst(t, c.reps, 5, func() *authv3.CheckRequest { return freeReq(k.Secret) })
		total += more.allowed
		return total >= limit
	})
	elapsed := time.Since(began)
	t.Logf("after %d more rounds of 3 × 5 Checks: %d allowed in %s; bound %d; Redis calls %s",
		rounds, total, elapsed.Round(time.Millisecond), bound(elapsed), c.redisTrouble(t))
	if total < limit {
		t.Errorf("%d allowed in %s of demand beyond the limit, want at least the limit %d", total, elapsed, limit)
	}
	if total > bound(elapsed) {
		t.Errorf("%d allowed in %s, want at most %d", total, elapsed, bound(elapsed))
	}

	// The quiet spell: 100/s refills its whole bucket in a second.
	const fastInterval = time.Second / limit
	q := c.reps[1].createKey(t, "rate", redisScopes, "--rate-limit", "100/s")
	got = awaitAll(t, c.reps, time.Now(), func() *authv3.CheckRequest { return bearerRequest(q.Secret, "GET", "/v1/no-such-route") },
		func(d decision) bool { return d.status != 401 })
	for i, d := range got {
		if d < 0 {
			t.Fatalf("replica %s does not know the second key", c.names[i])
		}
	}
	warm, _ := burst(t, c.reps, 1, func() *authv3.CheckRequest { return freeReq(q.Secret) })
	if warm.allowed != len(c.reps) {
		t.Fatalf("one Check per replica on a fresh 100/s key: %d allowed, want %d", warm.allowed, len(c.reps))
	}
	time.Sleep(3 * time.Second) // reported, refilled; each replica keeps its idle lease (uncontended)
	quiet, took := burst(t, c.reps, limit, func() *authv3.CheckRequest { return freeReq(q.Secret) })
	qbound := limit + int(took/fastInterval) + 1
	t.Logf("burst of 3 × %d Checks after a quiet spell: %d allowed (per replica %v) in %s; bound %d",
		limit, quiet.allowed, quiet.byRep, took.Round(time.Millisecond), qbound)
	if quiet.allowed > qbound {
		t.Errorf("burst after a quiet spell: %d allowed, want at most %d + %d refilled in %s (+1) = %d",
			quiet.allowed, limit, int(took/fastInterval), took, qbound)
	}
	// The warm-up's spends are still held (an uncontended key's spends are
	// reported with its lease) until the burst marks the key contended.
	if quiet.allowed < limit-len(c.reps) {
		t.Errorf("burst after a quiet spell: %d allowed, want at least the full bucket less the warm-up's %d spends, %d",
			quiet.allowed, len(c.reps), limit-len(c.reps))
	}
	c.stopAll(t)
}

// ---------------------------------------------------------------------------
// 4. Redis killed and restarted under load

// shot is one Check of a load and its answer.
type shot struct {
	rep        int
	sent, done time.Time
	d          decision
}

// loadGen sends Checks through every replica from a few goroutines each
// until halted.
type loadGen struct {
	stop  chan struct{}
	once  sync.Once
	wg    sync.WaitGroup
	mu    sync.Mutex
	shots []shot
}

func startLoad(t *testing.T, reps []*server, workers int, req func() *authv3.CheckRequest) *loadGen {
	t.Helper()
	l := &loadGen{stop: make(chan struct{})}
	for i, s := range reps {
		for range workers {
			l.wg.Add(1)
			go func() {
				defer l.wg.Done()
				for {
					select {
					case <-l.stop:
						return
					default:
					}
					sent := time.Now()
					d, err := tryCheck(t, s, req())
					if err != nil {
						t.Errorf("Check through replica %d: %v", i, err)
						return
					}
					l.mu.Lock()
					l.shots = append(l.shots, shot{rep: i, sent: sent, done: time.Now(), d: d})
					l.mu.Unlock()
				}
			}()
		}
	}
	t.Cleanup(func() { l.halt() })
	return l
}

func (l *loadGen) snapshot() []shot {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.shots)
}

// halt stops the load, waits for the Checks in flight and returns them all.
func (l *loadGen) halt() []shot {
	l.once.Do(func() { close(l.stop) })
	l.wg.Wait()
	return l.snapshot()
}

// each reports whether every one of n replicas has a shot that ok accepts.
func each(shots []shot, n int, ok func(shot) bool) bool {
	seen := make([]bool, n)
	for _, s := range shots {
		if ok(s) {
			seen[s.rep] = true
		}
	}
	return !slices.Contains(seen, false)
}

// TestE2ERedisOutage kills Redis (SIGKILL) under load, then restarts it.
func TestE2ERedisOutage(t *testing.T) {
	t.Parallel()
	t.Run("fail_closed", func(t *testing.T) {
		t.Parallel()
		testOutageFailClosed(t)
	})
	t.Run("allow_local", func(t *testing.T) {
		t.Parallel()
		testOutageAllowLocal(t)
	})
}

// testOutageFailClosed: with the default outage policy, Checks beyond the
// leases the replicas hold are refused with a 503 while Redis is down,
// keys keep authenticating, admin writes are refused; once Redis is back
// the balance is the initial one less one price per allowed Check,
// exactly.
func testOutageFailClosed(t *testing.T) {
	c := startCluster(t, 3, alwaysFsync, steadyTimeout)
	const initial = 10_000_000
	c.reps[0].createAccount(t, "outage", "10")
	k := c.reps[0].createKey(t, "outage", redisScopes, "--rate-limit", "1000000/m")
	c.awaitKey(t, k.Secret)

	load := startLoad(t, c.reps, 3, func() *authv3.CheckRequest { return pricedReq(k.Secret) })
	// Mid-load: once every replica has allowed a few.
	if !eventually(settleFor, func() bool {
		return each(load.snapshot(), len(c.reps), func(s shot) bool { return s.d.allowed })
	}) {
		t.Fatalf("no Check allowed on some replica before the outage")
	}
	c.redis.Kill()
	killed := time.Now()
	if !eventually(settleFor, func() bool {
		return each(load.snapshot(), len(c.reps), func(s shot) bool { return s.sent.After(killed) && s.d.status == 503 })
	}) {
		t.Fatalf("Redis is down but some replica allows every Check: leases are at most %d prices", leaseFactor)
	}

	// While Redis is down: keys authenticate, unknown ones do not; the
	// replicas stay ready and say Redis is down; admin writes are refused.
	for i, s := range c.reps {
		wantAllowed(t, s.checkKey(t, k.Secret, "GET", freePath), k.ID, "outage")
		wantInvalidKey(t, s.checkKey(t, unknownSecret, "GET", freePath))
		wantInvalidKey(t, s.checkKey(t, unknownSecret, "POST", pricedPath))
		if code, _ := httpGet(t, "http://"+s.http+"/readyz"); code != 200 {
			t.Errorf("replica %s: /readyz %d while Redis is down, want 200 (keys still authenticate)", c.names[i], code)
		}
		if !eventually(settleFor, func() bool { return metricSum(t, s, "keygate_redis_up") == 0 }) {
			t.Errorf("replica %s: keygate_redis_up is not 0 while Redis is down", c.names[i])
		}
	}
	wantFailure(t, c.reps[1].cli(t, "accounts", "credit", "outage", "1"), "unavailable")

	restarting := time.Now()
	c.redis.Restart()
	restarted := time.Now()
	if !eventually(settleFor, func() bool {
		return each(load.snapshot(), len(c.reps), func(s shot) bool { return s.sent.After(restarted) && s.d.allowed })
	}) {
		t.Fatalf("some replica allows no Check after Redis came back")
	}
	shots := load.halt()
	done := time.Now()

	var allowed, unavailable, allowedDown int
	other := map[string]int{}
	for _, s := range shots {
		switch {
		case s.d.allowed:
			allowed++
			if s.sent.After(killed) && s.done.Before(restarting) {
				allowedDown++
			}
		case s.d.status == 503:
			unavailable++
			if !strings.HasPrefix(s.d.errMsg, "Billing is temporarily unavailable") ||
				s.d.headers["content-type"] != "application/json" {
				other[fmt.Sprintf("503 %s: %s", s.d.errType, s.d.errMsg)]++
			}
		default:
			other[fmt.Sprintf("%d %s: %s", s.d.status, s.d.errType, s.d.errMsg)]++
		}
	}
	t.Logf("%d Checks: %d allowed (%d of them sent and answered while Redis was down), %d × 503; Redis down for %s",
		len(shots), allowed, allowedDown, unavailable, restarting.Sub(killed).Round(time.Millisecond))
	for d, n := range other {
		t.Errorf("unexpected answer ×%d: %s", n, d)
	}
	if most := len(c.reps) * leaseFactor; allowedDown > most {
		t.Errorf("%d Checks allowed while Redis was down, want at most the leases held: %d", allowedDown, most)
	}
	if unavailable == 0 {
		t.Errorf("no 503 while Redis was down")
	}

	exactAfter := c.awaitExact(t, "outage", k.ID, initial-int64(allowed)*priceEmbedding, int64(allowed)*priceEmbedding, done)
	t.Logf("balance exact (initial − %d × price) through every replica %s after the last Check", allowed, exactAfter.Round(time.Millisecond))
	// Two more report rounds change nothing: no report is applied twice.
	time.Sleep(2500 * time.Millisecond)
	c.awaitExact(t, "outage", k.ID, initial-int64(allowed)*priceEmbedding, int64(allowed)*priceEmbedding, done)

	c.stopAll(t)
}

// TestE2ERedisFailClosedAnswer: the answer to a priced Check refused
// because Redis is down, as issue 5 pins it ("Outage"): a 503 with the
// error type service_unavailable, a retry-after, and gRPC UNAVAILABLE.
func TestE2ERedisFailClosedAnswer(t *testing.T) {
	t.Parallel()
	c := startCluster(t, 1, nil, steadyTimeout)
	s := c.reps[0]
	s.createAccount(t, "closed", "1")
	k := s.createKey(t, "closed", redisScopes)
	c.redis.Kill() // before any priced Check: no lease held
	d := s.checkKey(t, k.Secret, "POST", pricedPath)
	if d.allowed || d.status != 503 || d.errMsg == "" || d.headers["content-type"] != "application/json" {
		t.Fatalf("priced Check while Redis is down: %s, want a 503 JSON denial", d)
	}
	if d.errType != "service_unavailable" {
		t.Errorf("503 error type %q, want service_unavailable (%s)", d.errType, d)
	}
	if d.headers["retry-after"] == "" {
		t.Errorf("503 without retry-after (%s)", d)
	}
	if d.grpcCode != codes.Unavailable {
		t.Errorf("503 with gRPC code %s, want UNAVAILABLE (%s)", d.grpcCode, d)
	}
	c.redis.Restart()
	if !eventually(settleFor, func() bool { return metricSum(t, s, "keygate_redis_up") == 1 }) {
		t.Errorf("keygate_redis_up is not 1 after Redis came back")
	}
	c.stopAll(t)
}

// testOutageAllowLocal: with outage: allow_local, a replica holding no
// lease allows each key exactly its outage allowance while Redis is down,
// and every one of those spends is charged once when Redis is back.
func testOutageAllowLocal(t *testing.T) {
	const (
		allowance = 1000 // micro-USD: 10 prices
		prices    = allowance / priceEmbedding
		initial   = 1_000_000
	)
	c := startCluster(t, 3, alwaysFsync, steadyTimeout, "redis_outage: {spend: local_allowance, local_allowance_usd: \"0.001\"}")
	c.reps[0].createAccount(t, "local", "1")
	k := c.reps[1].createKey(t, "local", redisScopes, "--rate-limit", "1000000/m")
	c.awaitKey(t, k.Secret)

	// No priced Check before the outage: no replica holds a lease, so what
	// each allows is its allowance, to the price.
	c.redis.Kill()
	for i, s := range c.reps {
		var seq []int
		for range prices + 5 {
			d := s.checkKey(t, k.Secret, "POST", pricedPath)
			seq = append(seq, d.status)
			if !d.allowed && (d.status != 503 || !strings.HasPrefix(d.errMsg, "Billing is temporarily unavailable")) {
				t.Errorf("replica %s: %s, want allowed or 503 billing unavailable", c.names[i], d)
			}
		}
		want := slices.Repeat([]int{200}, prices)
		want = append(want, slices.Repeat([]int{503}, 5)...)
		if !slices.Equal(seq, want) {
			t.Errorf("replica %s while Redis is down: statuses %v, want %d allowed (the allowance) then 503s", c.names[i], seq, prices)
		}
		wantAllowed(t, s.checkKey(t, k.Secret, "GET", freePath), k.ID, "local")
	}
	c.redis.Restart()
	restarted := time.Now()
	charged := int64(len(c.reps) * prices * priceEmbedding)
	took := c.awaitExact(t, "local", k.ID, initial-charged, charged, restarted)
	t.Logf("outage spends (%d × %d prices) charged, read exact through every replica %s after Redis restarted",
		len(c.reps), prices, took.Round(time.Millisecond))
	time.Sleep(2500 * time.Millisecond) // more report rounds charge nothing twice
	c.awaitExact(t, "local", k.ID, initial-charged, charged, restarted)

	// Leases work again.
	for _, s := range c.reps {
		if !eventually(settleFor, func() bool { return s.checkKey(t, k.Secret, "POST", pricedPath).allowed }) {
			t.Fatalf("no priced Check allowed after Redis came back")
		}
	}
	charged += int64(len(c.reps) * priceEmbedding)
	c.awaitExact(t, "local", k.ID, initial-charged, charged, time.Now())
	c.stopAll(t)
}

// ---------------------------------------------------------------------------
// 5. A replica restarted while Redis is down

// TestE2ERedisRestartDuringOutage: a replica restarted while Redis is down
// starts from its --db file, authenticates the keys it last knew (created
// through itself or another replica), refuses revoked and unknown ones,
// fails spend closed, and spends again once Redis is back.
func TestE2ERedisRestartDuringOutage(t *testing.T) {
	t.Parallel()
	c := startCluster(t, 2, alwaysFsync, steadyTimeout)
	a, b := c.reps[0], c.reps[1]
	a.createAccount(t, "restart", "1")
	ka := a.createKey(t, "restart", redisScopes, "--rate-limit", "60000/m")
	kb := b.createKey(t, "restart", redisScopes, "--rate-limit", "60000/m") // reaches A through Redis
	kr := b.createKey(t, "restart", redisScopes, "--rate-limit", "60000/m")
	c.awaitKey(t, kr.Secret)
	b.ok(t, nil, "keys", "revoke", kr.ID)
	c.awaitKey(t, kb.Secret)
	if got := awaitAll(t, []*server{a}, time.Now(), func() *authv3.CheckRequest { return freeReq(kr.Secret) },
		func(d decision) bool { return d.status == 401 }); got[0] < 0 {
		t.Fatalf("A still accepts the key revoked through B")
	}
	wantAllowed(t, a.checkKey(t, ka.Secret, "POST", pricedPath), ka.ID, "restart")
	c.awaitExact(t, "restart", ka.ID, 1_000_000-priceEmbedding, priceEmbedding, time.Now()) // reported

	c.redis.Kill()
	if err := a.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	code, exited := a.wait(stopTimeout)
	if !exited {
		t.Fatalf("replica A still running %s after SIGTERM while Redis is down", stopTimeout)
	}
	t.Logf("replica A stopped (SIGTERM) while Redis was down: exit code %d; its last lines:\n%s", code, lastLines(a.out.String(), 3))
	a.checkLogsClean(t)

	a = c.start(t, a.db) // ready: serve starts during the outage
	c.reps[0] = a
	wantAllowed(t, a.checkKey(t, ka.Secret, "GET", freePath), ka.ID, "restart")
	wantAllowed(t, a.checkKey(t, kb.Secret, "GET", freePath), kb.ID, "restart")
	wantInvalidKey(t, a.checkKey(t, kr.Secret, "GET", freePath))
	wantInvalidKey(t, a.checkKey(t, unknownSecret, "GET", freePath))
	d := a.checkKey(t, ka.Secret, "POST", pricedPath)
	if d.allowed || d.status != 503 || !strings.HasPrefix(d.errMsg, "Billing is temporarily unavailable") {
		t.Errorf("priced Check on the restarted replica while Redis is down: %s, want 503 billing unavailable (fail closed)", d)
	}
	if got := metricSum(t, a, "keygate_redis_up"); got != 0 {
		t.Errorf("keygate_redis_up = %v while Redis is down, want 0", got)
	}
	wantFailure(t, a.cli(t, "keys", "create", "--account", "restart", "--scopes", "chat:read"), "unavailable")

	c.redis.Restart()
	if !eventually(settleFor, func() bool { return a.checkKey(t, ka.Secret, "POST", pricedPath).allowed }) {
		t.Fatalf("the restarted replica allows no priced Check after Redis came back")
	}
	c.awaitExact(t, "restart", ka.ID, 1_000_000-2*priceEmbedding, 2*priceEmbedding, time.Now())
	c.stopAll(t)
}

// lastLines returns the last n lines of s.
func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(len(lines)-n, 0):], "\n")
}

// ---------------------------------------------------------------------------
// 6. Admin commands through any replica, and offline

// adminStep is one admin command of the sequence that runs in both modes;
// via picks the replica (0 or 1) in Redis mode. $1, $2... in args stand
// for the IDs of the keys created (or rotated to) so far, in order.
type adminStep struct {
	via  int
	args []string
	fail bool
}

var adminSteps = []adminStep{
	{0, []string{"accounts", "create", "acme", "--balance", "5", "--tier", "tier1", "--alert-below", "1"}, false},
	{1, []string{"accounts", "get", "acme"}, false},
	{1, []string{"accounts", "credit", "acme", "2.5"}, false},
	{0, []string{"accounts", "create", "beta"}, false},
	{0, []string{"accounts", "list"}, false},
	{1, []string{"keys", "create", "--account", "acme", "--scopes", "chat:write,chat:read", "--name", "n1",
		"--rate-limit", "600/m", "--spend-cap", "1", "--cap-period", "day", "--expires-in", "90d"}, false},
	{0, []string{"keys", "get", "$1"}, false},
	{0, []string{"keys", "create", "--account", "beta", "--scopes", "embeddings:write"}, false},
	{1, []string{"keys", "list"}, false},
	{0, []string{"keys", "list", "--account", "acme"}, false},
	{0, []string{"keys", "rotate", "$1", "--grace", "1h"}, false},
	{1, []string{"keys", "get", "$1"}, false},
	{1, []string{"keys", "revoke", "$3"}, false},
	{0, []string{"keys", "get", "$3"}, false},
	{1, []string{"keys", "list", "--account", "beta"}, false},
	{1, []string{"keys", "list", "--account", "nobody"}, true},
	{0, []string{"accounts", "get", "nobody"}, true},
	{1, []string{"accounts", "create", "acme"}, true},
	{0, []string{"accounts", "create", "gamma", "--tier", "no-such-tier"}, true},
	{0, []string{"keys", "get", "key_nosuchkey"}, true},
	{1, []string{"keys", "revoke", "key_nosuchkey"}, true},
	{1, []string{"keys", "create", "--account", "nobody", "--scopes", "chat:write"}, true},
	{0, []string{"keys", "rotate", "$3"}, true},
	{1, []string{"accounts", "credit", "acme", "0"}, true},
}

// volatileFields differ between two runs of the same commands: IDs,
// secrets and times. normalize replaces their values (when not null).
var volatileFields = map[string]bool{"id": true, "secret": true, "created_at": true, "expires_at": true,
	"revoked_at": true, "period_resets_at": true, "rotated_to": true}

var keyIDPattern = regexp.MustCompile(`key_[A-Za-z0-9]+`)

func normalize(v any) any {
	switch v := v.(type) {
	case map[string]any:
		out := make(map[string]any, len(v))
		for k, x := range v {
			if volatileFields[k] && x != nil {
				out[k] = "<" + k + ">"
				continue
			}
			out[k] = normalize(x)
		}
		return out
	case []any:
		out := make([]any, len(v))
		for i, x := range v {
			out[i] = normalize(x)
		}
		return out
	}
	return v
}

// runSteps runs adminSteps through run and returns what each printed,
// normalized: the JSON without volatile values, or the exit code and
// stderr without key IDs.
func runSteps(t *testing.T, run func(via int, args ...string) result) []string {
	t.Helper()
	var ids []string
	var out []string
	for _, st := range adminSteps {
		args := slices.Clone(st.args)
		for i, a := range args {
			if len(a) == 2 && a[0] == '$' {
				n := int(a[1] - '1')
				if n >= len(ids) {
					t.Fatalf("%v: key %s not created yet", st.args, a)
				}
				args[i] = ids[n]
			}
		}
		r := run(st.via, append(args, "-o", "json")...)
		if st.fail {
			if r.code == 0 {
				t.Errorf("keygate %v: exit 0, want a failure\n%s", args, r)
			}
			out = append(out, fmt.Sprintf("%v: exit %d: %s", st.args, r.code, keyIDPattern.ReplaceAllString(strings.TrimSpace(r.stderr), "key_<id>")))
			continue
		}
		var v any
		mustJSON(t, r, &v, args)
		if m, ok := v.(map[string]any); ok && st.args[0] == "keys" && (st.args[1] == "create" || st.args[1] == "rotate") {
			id, _ := m["id"].(string)
			ids = append(ids, id)
		}
		b, err := json.MarshalIndent(normalize(v), "", "  ")
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, fmt.Sprintf("%v:\n%s", st.args, b))
	}
	return out
}

// TestE2ERedisAdmin: every admin command answers the same through either
// replica and the same as with store: bbolt (the JSON views, the errors);
// reads agree between replicas; and a stopped replica's --db file with the
// Redis config runs admin commands against Redis.
func TestE2ERedisAdmin(t *testing.T) {
	t.Parallel()
	c := startCluster(t, 2, nil, steadyTimeout)
	single := startServer(t, serverOpts{})

	redisOut := runSteps(t, func(via int, args ...string) result { return c.reps[via].cli(t, args...) })
	bboltOut := runSteps(t, func(_ int, args ...string) result { return single.cli(t, args...) })
	if diff := cmp.Diff(bboltOut, redisOut); diff != "" {
		t.Errorf("admin commands answer differently with store: redis than with store: bbolt (-bbolt +redis):\n%s", diff)
	}

	// Reads through either replica are the same, byte for byte.
	var keys []keyJSON
	c.reps[0].ok(t, &keys, "keys", "list")
	reads := [][]string{{"accounts", "list"}, {"accounts", "get", "acme"}, {"keys", "list"}, {"keys", "list", "--account", "acme"}}
	for _, k := range keys {
		reads = append(reads, []string{"keys", "get", k.ID})
	}
	for _, args := range reads {
		ra, rb := c.reps[0].cli(t, append(args, "-o", "json")...), c.reps[1].cli(t, append(args, "-o", "json")...)
		if ra.code != 0 || ra.stdout != rb.stdout {
			t.Errorf("keygate %v through A and B differ:\nA: %s\nB: %s", args, ra, rb)
		}
	}

	// Offline: in Redis mode the --db file is a replica's cache, not an
	// admin target (issue 5): --db commands say so and refuse, with the
	// Redis config or without it, and change nothing. They run in a
	// working directory of their own so that a file opened by mistake shows.
	dir := t.TempDir()
	cfg := filepath.Join(dir, "redis.yaml")
	if err := os.WriteFile(cfg, []byte(c.config), 0o600); err != nil {
		t.Fatal(err)
	}
	b := c.reps[1]
	b.stop(t)
	before := c.reps[0].account(t, "acme").BalanceMicros
	for _, tt := range []struct {
		name string
		args []string
		want string
	}{
		{"with the Redis config", []string{"--config", cfg}, "--server"},
		{"without the Redis config", nil, "store: redis"},
	} {
		t.Run("--db "+tt.name+" is refused", func(t *testing.T) {
			for _, cmd := range [][]string{{"accounts", "credit", "acme", "1"}, {"accounts", "get", "acme"},
				{"keys", "create", "--account", "acme", "--scopes", "chat:read"}} {
				r := runKeygateIn(t, dir, baseEnv(), append(append(cmd, "--db", b.db), tt.args...)...)
				wantFailure(t, r, tt.want, "cache")
			}
			if after := c.reps[0].account(t, "acme").BalanceMicros; after != before {
				t.Errorf("balance %d after the refused commands, want %d", after, before)
			}
			if _, err := os.Stat(filepath.Join(dir, "keygate.db")); err == nil {
				t.Errorf("the refused commands created keygate.db in their working directory")
			}
		})
	}
	var k keyJSON
	c.reps[0].ok(t, &k, "keys", "create", "--account", "acme", "--scopes", "chat:read")

	// The replica restarts on its file, with what was done meanwhile.
	b = c.start(t, b.db)
	c.reps[1] = b
	c.awaitKey(t, k.Secret)
	c.stopAll(t)
	single.stop(t)
}
