package main

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/keygate/keygate/authz/ratelimit"
	"github.com/keygate/keygate/cmd/bench/internal/loadgen"
	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/money"
	"github.com/keygate/keygate/keystore/rconn"
	"github.com/keygate/keygate/keystore/redisstore"
)

// Redis mode (-redis) answers: what does store: redis cost a Check, with one
// replica and with three on one redis-server, and how many Redis commands
// does a Check take (issue 5's target: under 0.1 far from exhaustion)?
//
// It starts its own redis-server (a free loopback port, a temporary
// directory, AOF on), seeds it through keygate's own Redis store
// (keystore/redisstore in this process: the admin code path, without 11,000
// gRPC calls), and starts each replica as its own `keygate serve` with its
// own --db mirror, which it fills from Redis at start. Per round, at each
// concurrency: the floor and keygate on bbolt (reference rows), then one
// replica, then three, the generator sending Checks round-robin over them.
// Each phase reads the replicas' /metrics at the start and the end of its
// window: Redis commands per Check is Δkeygate_redis_commands_total (Calls
// that reached Redis) over Δkeygate_checks_total, summed over replicas.
//
// Nothing is pinned: three replicas, redis-server and the generator on two
// cores cannot each have one.

// redisSeedWorkers is how many admin commands the seeder has in flight.
const redisSeedWorkers = 16

// cluster is the target of a phase: one server or several replicas.
type cluster struct {
	name    string
	servers []*server
	redis   *proc // nil unless the servers use Redis
}

func single(s *server) *cluster { return &cluster{name: s.name, servers: []*server{s}} }

// redisRun is the Redis mode's state.
type redisRun struct {
	server   *proc
	addr     string
	config   string
	keys     string // secrets seeded in Redis, key-major
	hotKeys  string // the first -hot-keys of them: one key of each of as many accounts
	replicas []*server
	next     int // replica number for names and files
}

// replicasName names the rows and phases of n replicas on Redis.
func replicasName(n int) string { return fmt.Sprintf("redis ×%d", n) }

// measureRedis runs the Redis mode's phases.
func (b *bench) measureRedis(ctx context.Context) error {
	if err := b.startRedis(ctx); err != nil {
		return err
	}
	if err := b.seedRedis(ctx); err != nil {
		return err
	}
	floor, err := b.startNoop(ctx)
	if err != nil {
		return err
	}
	kg, err := b.startKeygate(ctx, "keygate", filepath.Join(b.work, "keygate.db"))
	if err != nil {
		return err
	}
	counts := b.o.replicas
	for r := 1; r <= b.o.rounds; r++ {
		for _, c := range b.o.concs {
			for _, s := range []*server{floor, kg} {
				if _, err := b.phase(ctx, s, loadgen.ModeAllowed, c, r, b.keys, 0); err != nil {
					return err
				}
			}
		}
		for _, n := range counts {
			cl, err := b.replicasUp(ctx, n)
			if err != nil {
				return err
			}
			for i, c := range b.o.concs {
				warmup := b.o.redisWarmup
				if i == 0 && n > 1 {
					// Fresh replicas: round-robin sends a key to every replica
					// only every keys × replicas Checks, and each replica's
					// first Check of a key leases. A longer warm-up lets the
					// window open on the steady state it claims to measure.
					warmup *= time.Duration(n)
				}
				if _, err := b.clusterPhase(ctx, cl, loadgen.ModeAllowed, c, r, b.rd.keys, warmup); err != nil {
					return err
				}
			}
		}
	}
	if b.o.hotKeys > 0 {
		conc := b.o.concs[len(b.o.concs)-1]
		for _, n := range counts {
			cl, err := b.replicasUp(ctx, n)
			if err != nil {
				return err
			}
			if _, err := b.clusterPhase(ctx, cl, modeHot, conc, 1, b.rd.hotKeys, b.o.redisWarmup); err != nil {
				return err
			}
		}
	}
	b.stopServer(floor)
	b.stopServer(kg)
	b.replicasDown(0)
	if err := b.rd.server.stop(15 * time.Second); err != nil {
		b.problem("redis-server did not stop cleanly: %v (see %s)", err, b.rd.server.log.Name())
	}
	return nil
}

// modeHot labels the phases of allowed traffic over a few hot keys; the
// generator sends ModeAllowed.
const modeHot = "allowed-hot"

// startRedis runs redis-server on a free loopback port with its data in the
// run's directory, as the README asks of production: AOF on (fsync every
// second, Redis's default), no eviction.
func (b *bench) startRedis(ctx context.Context) error {
	bin := b.o.redisBin
	path, err := exec.LookPath(bin)
	if err != nil {
		return fmt.Errorf("%w: -redis needs %s (apt-get install redis-server): %w", errBench, bin, err)
	}
	dir := filepath.Join(b.work, "redis")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	addrs, err := freeAddrs(1)
	if err != nil {
		return err
	}
	_, port, _ := net.SplitHostPort(addrs[0])
	p, err := startProc("redis-server", filepath.Join(b.o.out, "redis.log"), nil, path,
		"--port", port, "--bind", "127.0.0.1", "--dir", dir, "--save", "", "--appendonly", "yes",
		"--maxmemory-policy", "noeviction", "--daemonize", "no", "--protected-mode", "no")
	if err != nil {
		return err
	}
	b.procs = append(b.procs, p)
	b.rd = &redisRun{server: p, addr: addrs[0]}
	if err := p.waitReady(ctx, 30*time.Second, pingRedis(b.rd.addr)); err != nil {
		return err
	}
	out, _ := exec.CommandContext(ctx, path, "--version").Output()
	b.Redis = strings.TrimSpace(string(out))
	b.logf("redis-server on %s (pid %d): %s", b.rd.addr, p.pid(), b.Redis)
	b.rd.config = filepath.Join(b.work, "redis.yaml")
	return os.WriteFile(b.rd.config, []byte(redisConfig(b.rd.addr, b.o.redisTimeout)), 0o600)
}

// redisConfig is the replicas' config: the bbolt run's, on Redis.
func redisConfig(addr, timeout string) string {
	cfg := benchConfig + "store: redis\nredis:\n  addr: " + strconv.Quote(addr) + "\n"
	if timeout != "" {
		cfg += "  timeout: " + strconv.Quote(timeout) + "\n"
	}
	return cfg
}

// pingRedis is ready when Redis answers PING (not while it loads its AOF).
func pingRedis(addr string) func() error {
	return func() error {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(time.Second))
		if _, err := c.Write([]byte("PING\r\n")); err != nil {
			return err
		}
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			return err
		}
		if !strings.HasPrefix(line, "+PONG") {
			return fmt.Errorf("%w: redis answered %q", errBench, strings.TrimSpace(line))
		}
		return nil
	}
}

// seedRedis seeds Redis as the bbolt store is seeded (same accounts, keys,
// balances and limits; no rate-limited keys: Redis mode measures allowed
// traffic only) and writes the secrets' files.
func (b *bench) seedRedis(ctx context.Context) error {
	sp := seedSpec{Accounts: b.o.accounts, KeysPer: b.o.keysPer, Balance: money.Micros(1_000_000_000), AccountName: "acct-%05d"}
	s, err := seedRedis(ctx, b.rd.addr, filepath.Join(b.seedDir, "redis-seed.db"), sp)
	if err != nil {
		return fmt.Errorf("seed redis: %w", err)
	}
	b.rd.keys = filepath.Join(b.work, "redis-keys.txt")
	if err := writeLines(b.rd.keys, s.Keys); err != nil {
		return err
	}
	if b.o.hotKeys > 0 {
		b.rd.hotKeys = filepath.Join(b.work, "redis-hot-keys.txt")
		if err := writeLines(b.rd.hotKeys, s.Keys[:min(b.o.hotKeys, len(s.Keys))]); err != nil {
			return err
		}
	}
	msg := fmt.Sprintf("redis: %d accounts, %d keys seeded through keygate's Redis store (keystore/redisstore, %d admin commands in flight) in %v",
		sp.Accounts, len(s.Keys), redisSeedWorkers, s.Took.Round(time.Millisecond))
	b.Seeding = append(b.Seeding, msg)
	b.logf("%s", msg)
	return nil
}

// seedRedis creates sp's accounts and keys in the Redis at addr through
// redisstore's admin commands, the code behind keygate's admin API in
// store: redis mode (each a Lua script, a change-stream entry, and a write
// to the seeder's own mirror at localPath, removed afterwards). Keys are
// listed key-major, as fill lists them.
func seedRedis(ctx context.Context, addr, localPath string, sp seedSpec) (out seeded, err error) {
	start := time.Now()
	conn, err := rconn.Dial(rconn.Config{Addr: addr, Timeout: 5 * time.Second}, rconn.Options{})
	if err != nil {
		return out, err
	}
	defer conn.Close()
	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	go conn.Run(runCtx) //nolint:errcheck // returns nil when stopped
	local, err := keystore.Open(localPath, keystore.Options{})
	if err != nil {
		return out, err
	}
	defer func() {
		if cerr := local.Close(); err == nil {
			err = cerr
		}
		os.Remove(localPath)
	}()
	rs, err := redisstore.Open(conn, local, redisstore.Options{ReplicaID: "bench-seed"})
	if err != nil {
		return out, err
	}
	now := time.Now()
	ids := make([]string, sp.Accounts)
	for i := range ids {
		ids[i] = fmt.Sprintf(sp.AccountName, i)
	}
	if err := parallel(ctx, len(ids), func(i int) error {
		_, err := rs.CreateAccount(ids[i], "free", sp.Balance, now)
		return err
	}); err != nil {
		return out, err
	}
	fast := ratelimit.Rate{N: 1_000_000, Per: time.Second}
	out.Keys = make([]string, sp.KeysPer*len(ids))
	if err := parallel(ctx, len(out.Keys), func(i int) error {
		_, secret, err := rs.CreateKey(keystore.NewKey{Account: ids[i%len(ids)], Name: "bench", Scopes: benchScopes, RateLimit: fast}, now)
		out.Keys[i] = secret
		return err
	}); err != nil {
		return out, err
	}
	out.Took = time.Since(start)
	return out, nil
}

// parallel runs fn(0..n-1) with redisSeedWorkers at a time, stopping at the
// first error.
func parallel(ctx context.Context, n int, fn func(i int) error) error {
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(redisSeedWorkers)
	for i := range n {
		if gctx.Err() != nil {
			break
		}
		g.Go(func() error { return fn(i) })
	}
	if err := g.Wait(); err != nil {
		return err
	}
	return ctx.Err()
}

// replicasUp starts or stops replicas until exactly n run, and returns them.
func (b *bench) replicasUp(ctx context.Context, n int) (*cluster, error) {
	b.replicasDown(n)
	for len(b.rd.replicas) < n {
		b.rd.next++
		name := fmt.Sprintf("keygate-redis-%d", b.rd.next)
		s, err := b.startServer(ctx, name, b.rd.config, filepath.Join(b.work, name+".db"))
		if err != nil {
			return nil, err
		}
		b.rd.replicas = append(b.rd.replicas, s)
		// Ready for the benchmark once its mirror holds every key.
		err = s.p.waitReady(ctx, 60*time.Second, func() error {
			c := map[string]float64{}
			if err := scrapeCounters(ctx, "http://"+s.httpAddr+"/metrics", []string{metricMirrorSyncs}, c); err != nil {
				return err
			}
			if sumSeries(c, metricMirrorSyncs, nil) < 1 {
				return fmt.Errorf("%w: %s: no full sync of its mirror yet", errBench, name)
			}
			return nil
		})
		if err != nil {
			return nil, err
		}
		b.logf("%s up (pid %d), mirror synced", name, s.p.pid())
	}
	return &cluster{name: replicasName(n), servers: slices.Clone(b.rd.replicas), redis: b.rd.server}, nil
}

// replicasDown stops replicas, the newest first, until at most n run.
func (b *bench) replicasDown(n int) {
	for len(b.rd.replicas) > n {
		last := b.rd.replicas[len(b.rd.replicas)-1]
		b.rd.replicas = b.rd.replicas[:len(b.rd.replicas)-1]
		b.stopServer(last)
	}
}

// clusterPhase runs one measured phase against every server of cl, calls
// round-robin over them.
func (b *bench) clusterPhase(ctx context.Context, cl *cluster, mode string, conc, round int, keys string, warmup time.Duration) (*phaseRun, error) {
	genMode := mode
	if mode == modeHot {
		genMode = loadgen.ModeAllowed
	}
	pr := &phaseRun{Server: cl.name, Mode: mode, Conc: conc, Round: round, Want: loadgen.Modes[genMode], Replicas: len(cl.servers)}
	res, err := b.genCluster(ctx, cl, genMode, conc, keys, 0, warmup, b.o.duration)
	if err != nil {
		return nil, fmt.Errorf("%s %s c=%d: %w", cl.name, mode, conc, err)
	}
	pr.Result = res
	b.add(pr)
	b.checkRedis(pr)
	h := loadgen.FromSparse(res.Latency)
	cmds, checks := redisPerCheck(res.Counters)
	b.logf("round %d  %-13s %-11s c=%-3d %8.0f/s  p50 %6.0fµs  p99 %6.0fµs  keygate %5.1f µs/check  redis %5.1f µs/check  %.3f redis cmds/check (%0.f checks)  %v",
		round, cl.name, mode, conc, res.PerSecond, us(h.Quantile(0.5)), us(h.Quantile(0.99)),
		perCheckUS(res.ServerCPUSeconds, res.Requests), perCheckUS(res.RedisCPUSeconds, res.Requests), ratioOf(cmds, checks), checks, res.ByStatus)
	return pr, nil
}

// redisPerCheck returns the Redis commands (Calls that reached Redis) and
// the Checks counted by the replicas over a window.
func redisPerCheck(c map[string]float64) (cmds, checks float64) {
	return sumSeries(c, metricRedisCommands, reachedRedis), sumSeries(c, metricChecks, nil)
}

func ratioOf(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return a / b
}

// checkRedis checks what only a Redis phase can get wrong.
func (b *bench) checkRedis(pr *phaseRun) {
	res := pr.Result
	name := fmt.Sprintf("%s %s c=%d round %d", pr.Server, pr.Mode, pr.Conc, pr.Round)
	// No Redis command in a window is no problem: replicas keep their
	// leases while nothing is contended, and a short window may fall
	// between two reports.
	if _, checks := redisPerCheck(res.Counters); checks == 0 {
		b.problem("%s: the replicas counted no Check in the window (keygate_checks_total)", name)
		return
	}
	// The probe reads the counters a few ms apart from the generator's
	// clock: the two counts agree to a few percent, or one is wrong.
	_, checks := redisPerCheck(res.Counters)
	if n := float64(res.Requests); n > 0 && (checks < 0.95*n || checks > 1.05*n) {
		b.warn("%s: the replicas counted %.0f Checks, the generator %d", name, checks, res.Requests)
	}
	failed := sumSeries(res.Counters, metricRedisCommands, func(s string) bool { return label(s, "result") == "error" })
	refused := sumSeries(res.Counters, metricRedisCommands, func(s string) bool { return label(s, "result") == "refused" })
	if failed > 0 || refused > 0 {
		b.warn("%s: %.0f Redis calls failed (timeout or error) and %.0f were refused by an open breaker", name, failed, refused)
	}
	if syncs := sumSeries(res.Counters, metricMirrorSyncs, nil); syncs > 0 {
		b.warn("%s: %.0f full syncs of a mirror during the window (a lost change or a Redis failure)", name, syncs)
	}
}

// startServer starts keygate serve with config on db.
func (b *bench) startServer(ctx context.Context, name, config, db string, env ...string) (*server, error) {
	addrs, err := freeAddrs(3)
	if err != nil {
		return nil, err
	}
	argv := pinned(b.serverCPU, b.keygateBin, "serve", "--config", config, "--db", db,
		"--listen", addrs[0], "--admin-listen", addrs[1], "--http-listen", addrs[2])
	p, err := startProc(name, filepath.Join(b.o.out, name+".log"), env, argv...)
	if err != nil {
		return nil, err
	}
	b.procs = append(b.procs, p)
	s := &server{name: name, p: p, addr: addrs[0], httpAddr: addrs[2]}
	if err := p.waitReady(ctx, 60*time.Second, httpOK("http://"+s.httpAddr+"/readyz")); err != nil {
		return nil, err
	}
	if err := p.waitReady(ctx, 10*time.Second, dialable(s.addr)); err != nil {
		return nil, err
	}
	return s, nil
}

// clusterArgs are the generator's flags that name cl: its addresses (calls
// go round-robin over them), the PIDs whose CPU time it reads, and, for
// Redis, the replicas' /metrics and redis-server's PID.
func clusterArgs(cl *cluster) []string {
	var addrs, pids, urls []string
	for _, s := range cl.servers {
		addrs = append(addrs, s.addr)
		pids = append(pids, strconv.Itoa(s.p.pid()))
		if cl.redis != nil {
			urls = append(urls, "http://"+s.httpAddr+"/metrics")
		}
	}
	args := []string{"-addr", strings.Join(addrs, ","), "-pid", strings.Join(pids, ",")}
	if cl.redis != nil {
		args = append(args, "-metrics", strings.Join(urls, ","), "-redis-pid", strconv.Itoa(cl.redis.pid()))
	}
	return args
}

// redisTarget is issue 5's: fewer Redis commands per Check than this, far
// from exhaustion.
const redisTarget = 0.1

const redisLegend = `
keygate CPU µs/check: user+system CPU time of every keygate process of the row (all replicas) over the window, per answered Check.
redis CPU µs/check: redis-server's CPU time over the window per answered Check.
redis cmds/check: Δkeygate_redis_commands_total (Calls that reached Redis: result ok or error) over Δkeygate_checks_total,
  both read from every replica's /metrics at the window's start and end and summed over the replicas.
200s: share of the answers that allowed (the rest: 503s when a replica's breaker opened and spend failed closed).
gen CPU: share of one core used by the generator. other CPU: busy time of the machine (/proc/stat) not used by the row's
  servers, redis-server or the generator, in cores: other processes, or the kernel's share of loopback traffic.
Nothing is pinned in Redis mode; compare these rows with each other, not with the pinned main benchmark's.
`

// redisRow is one row of the Redis tables.
type redisRow struct {
	label  string
	server string
	mode   string
	conc   int
	keys   int
}

// redisRows lists the rows in order: at each concurrency the floor, bbolt,
// each replica count, then the hot-key phases.
func (b *bench) redisRows() []redisRow {
	keys := b.o.accounts * b.o.keysPer
	var rows []redisRow
	for _, c := range b.o.concs {
		rows = append(rows, redisRow{"floor (no-op)", "floor", loadgen.ModeAllowed, c, keys},
			redisRow{"keygate, bbolt", "keygate", loadgen.ModeAllowed, c, keys})
		for _, n := range b.o.replicas {
			rows = append(rows, redisRow{"keygate, " + replicasName(n), replicasName(n), loadgen.ModeAllowed, c, keys})
		}
	}
	if b.o.hotKeys > 0 {
		c := b.o.concs[len(b.o.concs)-1]
		for _, n := range b.o.replicas {
			rows = append(rows, redisRow{fmt.Sprintf("keygate, %s, %d hot keys", replicasName(n), min(b.o.hotKeys, keys)), replicasName(n), modeHot, c, min(b.o.hotKeys, keys)})
		}
	}
	return rows
}

func (b *bench) redisTable() string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "Redis mode: %d keys over %d accounts (balances $1,000, limits 1,000,000/s: far from exhaustion), allowed traffic with prices; replicas share one redis-server (AOF on); Checks round-robin over the replicas\n",
		b.o.accounts*b.o.keysPer, b.o.accounts)
	rows := [][]string{{"server", "conc", "checks/s", "rounds", "vs bbolt", "200s", "p50", "p99", "p99.9", "timeouts", "keygate CPU µs/check", "redis CPU µs/check", "redis cmds/check", "gen CPU", "other CPU", "RSS MiB"}}
	type opRow struct {
		label string
		conc  int
		a     *agg
	}
	var ops []opRow
	var verdicts []string
	for _, r := range b.redisRows() {
		a := aggregate(b.Phases, r.server, r.mode, r.conc)
		if a == nil {
			continue
		}
		vs := "-"
		if ref := aggregate(b.Phases, "keygate", loadgen.ModeAllowed, r.conc); ref != nil && r.server != "floor" {
			vs = ratio(a.rate(), ref.rate())
		}
		redisCPU, cmds := "-", "-"
		if strings.HasPrefix(r.server, "redis") {
			c, checks := redisPerCheck(a.counters)
			redisCPU = fmt.Sprintf("%.1f", a.redisCPUPerCheck())
			cmds = fmt.Sprintf("%.3f", ratioOf(c, checks))
			ops = append(ops, opRow{r.label, r.conc, a})
			if r.mode == loadgen.ModeAllowed {
				verdict := "met"
				if ratioOf(c, checks) >= redisTarget {
					verdict = "MISSED"
				}
				if refused := sumSeries(a.counters, metricRedisCommands, func(s string) bool { return label(s, "result") == "refused" }); refused > 0 {
					// Refused Calls do not reach Redis: the figure is low.
					verdict += fmt.Sprintf(", but the breaker refused %.0f calls", refused)
				}
				verdicts = append(verdicts, fmt.Sprintf("%s c=%d: %.3f (%s)", r.server, r.conc, ratioOf(c, checks), verdict))
			}
		}
		other := max(0, a.busy-a.cpu-a.redisCPU-a.gen) / a.secs
		ok := fmt.Sprintf("%.1f%%", 100*float64(a.byStatus[200])/float64(a.n))
		rows = append(rows, []string{r.label, fmt.Sprint(r.conc), fmtRate(a.rate()), a.spread(), vs, ok, fmtDur(a.q(0.5)), fmtDur(a.q(0.99)), fmtDur(a.q(0.999)),
			fmt.Sprint(a.timeouts), fmt.Sprintf("%.1f", a.cpuPerCheck()), redisCPU, cmds, pct(a.gen / a.secs), fmt.Sprintf("%.2f", other), fmt.Sprintf("%.1f", float64(a.rss)/(1<<20))})
	}
	sb.WriteString(grid(rows))
	if len(verdicts) > 0 {
		fmt.Fprintf(&sb, "Redis commands per Check (target < %.1f far from exhaustion), %d keys: %s\n", redisTarget, b.o.accounts*b.o.keysPer, strings.Join(verdicts, "; "))
	}
	if len(ops) == 0 {
		return sb.String()
	}
	// Which Calls they were, per Check.
	seen := map[string]bool{}
	for _, o := range ops {
		for s := range o.a.counters {
			if strings.HasPrefix(s, metricRedisCommands+"{") {
				seen[label(s, "op")] = true
			}
		}
	}
	names := sortOps(seen)
	fmt.Fprintf(&sb, "\nRedis calls per Check by op (Δ%s{op} that reached Redis over Δ%s, summed over replicas and rounds)\n", metricRedisCommands, metricChecks)
	head := append([]string{"server", "conc", "checks counted"}, names...)
	head = append(head, "total", "failed", "refused")
	orows := [][]string{head}
	for _, o := range ops {
		c, checks := redisPerCheck(o.a.counters)
		row := []string{o.label, fmt.Sprint(o.conc), fmt.Sprintf("%.0f", checks)}
		for _, op := range names {
			n := sumSeries(o.a.counters, metricRedisCommands, func(s string) bool { return label(s, "op") == op && reachedRedis(s) })
			row = append(row, fmt.Sprintf("%.4f", ratioOf(n, checks)))
		}
		failed := sumSeries(o.a.counters, metricRedisCommands, func(s string) bool { return label(s, "result") == "error" })
		refused := sumSeries(o.a.counters, metricRedisCommands, func(s string) bool { return label(s, "result") == "refused" })
		row = append(row, fmt.Sprintf("%.4f", ratioOf(c, checks)), fmt.Sprintf("%.0f", failed), fmt.Sprintf("%.0f", refused))
		orows = append(orows, row)
	}
	sb.WriteString(grid(orows))
	return sb.String()
}

// sortOps orders Redis ops: the Check path's first, then the background's,
// then any other by name.
func sortOps(seen map[string]bool) []string {
	known := []string{"rate_lease", "lease", "rate_return", "report", "heartbeat", "marker"}
	var out []string
	for _, op := range known {
		if seen[op] {
			out = append(out, op)
		}
	}
	var rest []string
	for op := range seen {
		if !slices.Contains(known, op) {
			rest = append(rest, op)
		}
	}
	slices.Sort(rest)
	return append(out, rest...)
}
