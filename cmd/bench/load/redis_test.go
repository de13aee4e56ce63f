package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/grpc"

	"github.com/keygate/keygate/cmd/bench/internal/loadgen"
	"github.com/keygate/keygate/cmd/keygate/config"
	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/money"
	"github.com/keygate/keygate/keystore/rconn"
	"github.com/keygate/keygate/keystore/rconn/rconntest"
	"github.com/keygate/keygate/keystore/redisstore"
)

// exposition is a replica's /metrics, trimmed to what matters here, with
// n Checks and 2n rate_lease calls.
func exposition(n int) string {
	return fmt.Sprintf(`# HELP keygate_checks_total ext_authz Checks answered.
# TYPE keygate_checks_total counter
keygate_checks_total{reason="",result="allow",status="200"} %d
keygate_checks_total{reason="bad_key",result="deny",status="401"} 3
# TYPE keygate_redis_commands_total counter
keygate_redis_commands_total{op="rate_lease",result="ok"} %d
keygate_redis_commands_total{op="rate_lease",result="error"} 1
keygate_redis_commands_total{op="lease",result="refused"} 4
keygate_redis_commands_total_other{op="x",result="ok"} 1000
keygate_redis_mirror_syncs_total{reason="start"} 1
keygate_debits_total 99
go_goroutines 12
`, n, 2*n)
}

func TestParseCountersSumsReplicas(t *testing.T) {
	c := map[string]float64{}
	for _, n := range []int{10, 20, 30} { // three replicas
		if err := parseCounters(strings.NewReader(exposition(n)), redisCounters, c); err != nil {
			t.Fatal(err)
		}
	}
	want := map[string]float64{
		`keygate_checks_total{reason="",result="allow",status="200"}`:       60,
		`keygate_checks_total{reason="bad_key",result="deny",status="401"}`: 9,
		`keygate_redis_commands_total{op="rate_lease",result="ok"}`:         120,
		`keygate_redis_commands_total{op="rate_lease",result="error"}`:      3,
		`keygate_redis_commands_total{op="lease",result="refused"}`:         12,
		`keygate_redis_mirror_syncs_total{reason="start"}`:                  3,
	}
	if diff := cmp.Diff(want, c); diff != "" {
		t.Fatalf("parseCounters (-want +got):\n%s", diff)
	}
	cmds, checks := redisPerCheck(c)
	if cmds != 123 || checks != 69 { // ok + error reached Redis; refused did not
		t.Errorf("redisPerCheck = %v commands, %v checks; want 123, 69", cmds, checks)
	}
	for _, bad := range []string{
		"keygate_checks_total{result=\"allow\" 3\n",
		"keygate_checks_total x\n",
		"keygate_checks_total\n",
		"keygate_checks_total 1 2 3\n",
	} {
		if err := parseCounters(strings.NewReader(bad), redisCounters, map[string]float64{}); err == nil {
			t.Errorf("parseCounters(%q) succeeded", bad)
		}
	}
}

func TestLabel(t *testing.T) {
	tests := []struct {
		series, key, want string
	}{
		{`m{op="lease",result="ok"}`, "op", "lease"},
		{`m{op="lease",result="ok"}`, "result", "ok"},
		{`m{op="lease",result="ok"}`, "kind", ""},
		{`m{a="x\"y,z=\"w",z="v"}`, "z", "v"},
		{`m{a="x\"y,z=\"w",z="v"}`, "a", `x\"y,z=\"w`},
		{`m{a=""}`, "a", ""},
		{`m`, "a", ""},
		{`m{a="unterminated}`, "a", ""},
	}
	for _, tt := range tests {
		if got := label(tt.series, tt.key); got != tt.want {
			t.Errorf("label(%q, %q) = %q, want %q", tt.series, tt.key, got, tt.want)
		}
	}
	series, rest, err := splitSeries(`m{a="}{"} 3`, 1)
	if err != nil || series != `m{a="}{"}` || rest != " 3" {
		t.Errorf("splitSeries = %q, %q, %v", series, rest, err)
	}
}

func TestAggregateCounters(t *testing.T) {
	phase := func(round int, checks, cmds, redisCPU float64) *phaseRun {
		return &phaseRun{Server: "redis ×3", Mode: loadgen.ModeAllowed, Conc: 64, Round: round, Want: 200, Replicas: 3,
			Result: loadgen.Result{Seconds: 1, Requests: uint64(checks), ByStatus: map[int]uint64{200: uint64(checks)},
				RedisCPUSeconds: redisCPU, CoreBusySeconds: []float64{0.5, 0.25},
				Counters: map[string]float64{
					`keygate_checks_total{reason="",result="allow",status="200"}`: checks,
					`keygate_redis_commands_total{op="lease",result="ok"}`:        cmds,
				}}}
	}
	a := aggregate([]*phaseRun{phase(1, 1000, 10, 0.1), phase(2, 3000, 50, 0.3)}, "redis ×3", loadgen.ModeAllowed, 64)
	cmds, checks := redisPerCheck(a.counters)
	if cmds != 60 || checks != 4000 || ratioOf(cmds, checks) != 0.015 {
		t.Errorf("aggregate counters: %v commands over %v checks", cmds, checks)
	}
	if a.redisCPUPerCheck() != 100 || a.busy != 1.5 {
		t.Errorf("aggregate: redis %v µs/check, busy %v s", a.redisCPUPerCheck(), a.busy)
	}
}

func TestRedisOptions(t *testing.T) {
	o, err := parseOptions([]string{"-redis", "-quick", "-replicas", "3, 1,3"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if o.flush || !cmp.Equal(o.replicas, []int{1, 3}) || o.redisWarmup != time.Second || o.hotKeys != 100 {
		t.Errorf("redis options: flush %v replicas %v warm-up %v hot %d", o.flush, o.replicas, o.redisWarmup, o.hotKeys)
	}
	o, err = parseOptions([]string{"-redis"}, io.Discard)
	if err != nil || o.redisWarmup != 5*time.Second || !cmp.Equal(o.replicas, []int{1, 3}) {
		t.Errorf("redis defaults: %+v, %v", o, err)
	}
	for _, bad := range [][]string{{"-replicas", "0"}, {"-replicas", "x"}, {"-replicas", "17"}, {"-hot-keys", "-1"}, {"-redis-warmup", "-1s"}, {"-redis", "-profile"}} {
		if _, err := parseOptions(bad, io.Discard); err == nil {
			t.Errorf("parseOptions(%q) succeeded", bad)
		}
	}
}

// TestRedisConfig: the replicas' config is one keygate accepts, in Redis
// mode, with the bbolt run's routes.
func TestRedisConfig(t *testing.T) {
	for _, timeout := range []string{"", "1s"} {
		cfg, err := config.Parse([]byte(redisConfig("127.0.0.1:6390", timeout)))
		if err != nil {
			t.Fatalf("timeout %q: %v", timeout, err)
		}
		want := config.DefaultRedisTimeout
		if timeout != "" {
			want = time.Second
		}
		if cfg.Store != config.StoreRedis || cfg.Redis.Addr != "127.0.0.1:6390" || cfg.RedisTimeout != want {
			t.Errorf("timeout %q: store %q addr %q timeout %v", timeout, cfg.Store, cfg.Redis.Addr, cfg.RedisTimeout)
		}
	}
}

func TestLoopbackURL(t *testing.T) {
	for give, ok := range map[string]bool{
		"http://127.0.0.1:9000/metrics": true,
		"http://localhost:9/metrics":    true,
		"http://10.0.0.1:9000/metrics":  false,
		"https://127.0.0.1:9/metrics":   false,
		"http://127.0.0.1/metrics":      false,
		"127.0.0.1:9000":                false,
	} {
		if err := loopbackURL(give); (err == nil) != ok {
			t.Errorf("loopbackURL(%q) = %v, want ok %v", give, err, ok)
		}
	}
}

// TestGenCluster runs `load gen` over two servers with their /metrics, as
// the Redis phases do, and checks the calls' spread and the counters'
// deltas summed over both.
func TestGenCluster(t *testing.T) {
	var addrs, urls []string
	var scrapes [2]atomic.Int64
	for i := range 2 {
		_, addr := startAllowAll(t)
		addrs = append(addrs, addr)
		ms := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			// Each scrape shows 100 more Checks and 200 more commands.
			n := int(scrapes[i].Add(1)) * 100
			io.WriteString(w, exposition(n)) //nolint:errcheck // a test server
		}))
		t.Cleanup(ms.Close)
		urls = append(urls, ms.URL+"/metrics")
	}
	keys := filepath.Join(t.TempDir(), "keys.txt")
	if err := writeLines(keys, testSecrets(2)); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	err := run(context.Background(), []string{"gen", "-addr", strings.Join(addrs, ","), "-keys", keys, "-c", "4", "-conns", "1",
		"-warmup", "20ms", "-duration", "300ms", "-timeout", "1m", "-pid", strconv.Itoa(os.Getpid()) + "," + strconv.Itoa(os.Getpid()),
		"-metrics", strings.Join(urls, ",")}, &out, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	var res loadgen.Result
	if err := json.Unmarshal(out.Bytes(), &res); err != nil {
		t.Fatalf("%v: %s", err, out.String())
	}
	if res.Requests == 0 || res.Errors != 0 {
		t.Errorf("result: %d requests, %d errors (%s)", res.Requests, res.Errors, res.FirstErr)
	}
	// Two scrapes of each server: +100 Checks, +200 rate_lease ok each.
	cmds, checks := redisPerCheck(res.Counters)
	if checks != 200 || cmds != 400 {
		t.Errorf("counters over the window: %v commands, %v checks; want 400, 200: %v", cmds, checks, res.Counters)
	}
	if err := run(context.Background(), []string{"gen", "-addr", addrs[0], "-keys", keys, "-metrics", "http://192.0.2.1:9/metrics"}, io.Discard, io.Discard); err == nil ||
		!strings.Contains(err.Error(), "loopback") {
		t.Errorf("gen reading metrics off the machine: %v", err)
	}
}

// TestSeedRedis seeds a real redis-server and reads the keys back through
// another replica's mirror, as keygate serve does.
func TestSeedRedis(t *testing.T) {
	srv := rconntest.Start(t)
	const accounts = 3
	ctx := context.Background()
	got, err := seedRedis(ctx, srv.Addr(), filepath.Join(t.TempDir(), "seed.db"),
		seedSpec{Accounts: accounts, KeysPer: 2, Balance: money.Micros(7_000_000), AccountName: "acct-%04d"})
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Keys) != 2*accounts {
		t.Fatalf("got %d keys, want %d", len(got.Keys), 2*accounts)
	}
	conn, err := rconn.Dial(rconn.Config{Addr: srv.Addr(), Timeout: time.Second}, rconn.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	local, err := keystore.Open(filepath.Join(t.TempDir(), "mirror.db"), keystore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer local.Close()
	rs, err := redisstore.Open(conn, local, redisstore.Options{ReplicaID: "test"})
	if err != nil {
		t.Fatal(err)
	}
	accts, err := rs.ListAccounts()
	if err != nil {
		t.Fatal(err)
	}
	if len(accts) != accounts || accts[0].Balance != 7_000_000 {
		t.Fatalf("accounts in Redis: %+v", accts)
	}
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- rs.Run(runCtx) }()
	defer func() {
		stop()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	deadline := time.Now().Add(10 * time.Second)
	for i, s := range got.Keys {
		k, ok := local.Lookup(s, time.Now())
		for !ok && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
			k, ok = local.Lookup(s, time.Now())
		}
		if !ok {
			t.Fatalf("key %d not in the mirror", i)
		}
		// Key-major: key i belongs to account i mod accounts.
		if want := fmt.Sprintf("acct-%04d", i%accounts); k.Account() != want {
			t.Errorf("key %d: account %s, want %s", i, k.Account(), want)
		}
		if k.RateLimit.N != 1_000_000 || !k.HasScope("chat:write") {
			t.Errorf("key %d: limit %v, scopes %v", i, k.RateLimit, k.Scopes)
		}
	}
}

// startAllowAll serves an ext_authz server that allows everything on a
// loopback port, stopped when the test ends.
func startAllowAll(t *testing.T) (*grpc.Server, string) {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	authv3.RegisterAuthorizationServer(srv, allowAll{})
	go srv.Serve(lis) //nolint:errcheck // ends with Stop
	t.Cleanup(srv.Stop)
	return srv, lis.Addr().String()
}

// testSecrets returns n well-formed secrets.
func testSecrets(n int) []string {
	rnd := rand.New(rand.NewPCG(5, 6))
	out := make([]string, n)
	for i := range out {
		out[i] = loadgen.WellFormedSecret(rnd)
	}
	return out
}

// FuzzParseCounters: any exposition either fails to parse or yields series
// of the wanted metrics only, whose labels can be read, and parsing it twice
// into one map doubles every finite value (summing over replicas).
func FuzzParseCounters(f *testing.F) {
	f.Add(exposition(7))
	f.Add("keygate_checks_total 3\n")
	f.Add(`keygate_redis_commands_total{op="a\"}",result="ok"} 1e3 1700000000` + "\n")
	f.Fuzz(func(t *testing.T, text string) {
		once := map[string]float64{}
		if err := parseCounters(strings.NewReader(text), redisCounters, once); err != nil {
			return
		}
		twice := map[string]float64{}
		for range 2 {
			if err := parseCounters(strings.NewReader(text), redisCounters, twice); err != nil {
				t.Fatalf("second parse failed: %v", err)
			}
		}
		for s, v := range once {
			name, _, _ := strings.Cut(s, "{")
			if !slices.Contains(redisCounters, name) {
				t.Errorf("series %q is not of a wanted metric", s)
			}
			label(s, "op")
			if !math.IsNaN(v) && !math.IsInf(v, 0) && math.Abs(v) < math.MaxFloat64/4 && twice[s] != 2*v {
				t.Errorf("series %q: %v parsed twice is %v", s, v, twice[s])
			}
		}
	})
}
