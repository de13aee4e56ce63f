package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/keygate/keygate/cmd/bench/internal/loadgen"
	"github.com/keygate/keygate/keystore/money"
)

var errBench = errors.New("benchmark")

// bench is one run of the benchmark: its directories, binaries, servers and
// results.
type bench struct {
	o      options
	stdout io.Writer
	log    io.Writer // progress
	start  time.Time

	self                string // this executable, run as `load gen`
	work                string // temporary: stores, config, keys
	seedDir             string // where stores are seeded (tmpfs when there is one)
	serverCPU, genCPU   string // taskset CPU lists; "" when not pinned
	ticks               int64
	keygateBin, noopBin string
	config              string
	keys, limited       string // files of secrets
	flushKeys           string
	flushDB             string

	procs    []*proc
	rd       *redisRun
	Redis    string      `json:"redis_server,omitempty"` // its --version, in Redis mode
	Machine  machine     `json:"machine"`
	Phases   []*phaseRun `json:"phases"`
	Flush    *flushRun   `json:"flush,omitempty"`
	Profile  string      `json:"profile,omitempty"`
	Problems []string    `json:"problems"`
	Warnings []string    `json:"warnings"`
	Seeding  []string    `json:"seeding"`
}

type machine struct {
	CPU     string `json:"cpu"`
	Cores   int    `json:"cores"`
	Kernel  string `json:"kernel"`
	Go      string `json:"go"`
	Pinning string `json:"pinning"`
	Date    string `json:"date"`
	Command string `json:"command"`
	Method  string `json:"method"`
}

// server is a running ext_authz server.
type server struct {
	name     string // floor, keygate, keygate-flush
	p        *proc
	addr     string // ext_authz
	httpAddr string // keygate's /metrics, /readyz ("" for the floor)
}

// phaseRun is one measured phase.
type phaseRun struct {
	Server string         `json:"server"`
	Mode   string         `json:"mode"`
	Conc   int            `json:"concurrency"`
	Round  int            `json:"round"`
	Want   int            `json:"want_status"`
	Result loadgen.Result `json:"result"`
	// Other is the CPU time that something other than the server used on
	// the server's core during the window: noise, when it is not small.
	Other float64 `json:"other_on_server_core_seconds"`
	// Replicas is the number of keygate replicas of a Redis phase (0: one
	// server on its own store).
	Replicas int `json:"replicas,omitempty"`
	// Slots summarises Result.Timeline in results.json.
	Slots []slotSummary `json:"timeline,omitempty"`
}

func orchestrate(ctx context.Context, o options, stdout, stderr io.Writer) (err error) {
	b := &bench{o: o, stdout: stdout, log: stderr, start: time.Now(), ticks: clockTicks(), Problems: []string{}, Warnings: []string{}}
	defer func() {
		if cerr := b.cleanup(); err == nil {
			err = cerr
		}
	}()
	type step struct {
		name string
		fn   func(context.Context) error
	}
	steps := []step{{"set up", b.setup}, {"build", b.build}, {"seed", b.seedAll}}
	if o.redis {
		steps = append(steps, step{"redis mode", b.measureRedis})
	} else {
		steps = append(steps, step{"measure", b.measure}, step{"flush phases", b.measureFlush})
	}
	for _, s := range steps {
		if err := s.fn(ctx); err != nil {
			return fmt.Errorf("%s: %w", s.name, err)
		}
	}
	if err := b.report(); err != nil {
		return err
	}
	if len(b.Problems) > 0 {
		return fmt.Errorf("%w: %d problems (above): the figures do not show what they claim", errBench, len(b.Problems))
	}
	return nil
}

func (b *bench) logf(format string, args ...any) {
	fmt.Fprintf(b.log, "[%5.1fs] "+format+"\n", append([]any{time.Since(b.start).Seconds()}, args...)...)
}

// problem records something that makes a figure wrong, loudly.
func (b *bench) problem(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	b.Problems = append(b.Problems, msg)
	fmt.Fprintf(b.log, "\n!!!!! PROBLEM: %s\n\n", msg)
}

func (b *bench) setup(context.Context) error {
	var err error
	if b.self, err = os.Executable(); err != nil {
		return err
	}
	if err := os.MkdirAll(b.o.out, 0o755); err != nil {
		return err
	}
	if b.work, err = os.MkdirTemp("", "keygate-bench-"); err != nil {
		return err
	}
	// bbolt fsyncs every admin write: on tmpfs seeding takes a second, on
	// a disk a minute. Stores are seeded there and copied to the disk,
	// where keygate serves (and flushes) them.
	b.seedDir = b.work
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		if d, err := os.MkdirTemp("/dev/shm", "keygate-bench-seed-"); err == nil {
			b.seedDir = d
		}
	}
	cores := runtime.NumCPU()
	pin := "not pinned: taskset not found"
	if b.o.redis {
		pin = fmt.Sprintf("not pinned (Redis mode): up to %d keygate replicas, redis-server and the generator share %d cores, so pinning one process per core is meaningless; every row here, floor and bbolt included, runs unpinned",
			slices.Max(b.o.replicas), cores)
	} else if _, err := exec.LookPath("taskset"); err == nil {
		if cores >= 2 {
			b.serverCPU, b.genCPU = "0", "1"
			pin = "server on CPU 0, generator on CPU 1 (taskset)"
		} else {
			pin = "not pinned: one core"
		}
	}
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	b.Machine = machine{
		CPU: cpuModel(), Cores: cores, Kernel: strings.TrimSpace(string(kernel)), Go: runtime.Version(),
		Pinning: pin, Date: b.start.UTC().Format(time.RFC3339),
		Command: "go run ./cmd/bench/load " + strings.Join(os.Args[1:], " "),
		Method: fmt.Sprintf("closed loop, %s client, %d HTTP/2 connections, %v warm-up + %v measured per phase, %d round(s) alternating floor and keygate",
			b.o.client, b.o.conns, b.o.warmup, b.o.duration, b.o.rounds),
	}
	if b.o.redis {
		b.Machine.Method = fmt.Sprintf("closed loop, %s client, %d HTTP/2 connections per server, %d round(s): at each concurrency the floor and keygate on bbolt (%v warm-up), then keygate on Redis with %v replicas (%v warm-up), Checks round-robin over the replicas; %v measured per phase",
			b.o.client, b.o.conns, b.o.rounds, b.o.warmup, b.o.replicas, b.o.redisWarmup, b.o.duration)
	}
	b.logf("machine: %s, %d cores, %s; %s", b.Machine.CPU, cores, b.Machine.Go, pin)
	return nil
}

func cpuModel() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "unknown"
	}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown"
}

// build compiles keygate as `make build` does (GOFLAGS from the environment
// apply, e.g. build tags), and the no-op server, unless -keygate or -noop
// name binaries to use instead.
func (b *bench) build(ctx context.Context) error {
	for _, p := range []*string{&b.o.keygateBin, &b.o.noopBin} {
		if *p != "" {
			abs, err := filepath.Abs(*p)
			if err != nil {
				return err
			}
			*p = abs
		}
	}
	b.keygateBin, b.noopBin = b.o.keygateBin, b.o.noopBin
	var pkgs []string
	if b.keygateBin == "" {
		pkgs = append(pkgs, "./cmd/keygate")
		b.keygateBin = filepath.Join(b.work, "keygate")
	}
	if b.noopBin == "" {
		pkgs = append(pkgs, "./cmd/bench/noop")
		b.noopBin = filepath.Join(b.work, "noop")
	}
	if len(pkgs) == 0 {
		return nil
	}
	root, err := moduleRoot(ctx)
	if err != nil {
		return err
	}
	start := time.Now()
	args := append([]string{"build", "-trimpath", "-o", b.work + string(filepath.Separator)}, pkgs...)
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build: %w\n%s", err, out)
	}
	b.logf("built %s in %v", strings.Join(pkgs, " "), time.Since(start).Round(time.Millisecond))
	return nil
}

func moduleRoot(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", fmt.Errorf("%w: run from inside the keygate module", errBench)
	}
	return filepath.Dir(mod), nil
}

// seedAll seeds the main store and, for the flush phases, the flush store.
func (b *bench) seedAll(ctx context.Context) error {
	b.config = filepath.Join(b.work, "config.yaml")
	if err := os.WriteFile(b.config, []byte(benchConfig), 0o600); err != nil {
		return err
	}
	main, err := b.seedStore(ctx, "keygate.db", seedSpec{
		Accounts: b.o.accounts, KeysPer: b.o.keysPer, Limited: b.o.limitedKeys,
		Balance: money.Micros(1_000_000_000), AccountName: "acct-%05d",
	})
	if err != nil {
		return err
	}
	b.keys, b.limited = filepath.Join(b.work, "keys.txt"), filepath.Join(b.work, "limited.txt")
	if err := writeLines(b.keys, main.Keys); err != nil {
		return err
	}
	if err := writeLines(b.limited, main.Limited); err != nil {
		return err
	}
	if !b.o.flush {
		return nil
	}
	fl, err := b.seedStore(ctx, "flush.db", seedSpec{
		Accounts: b.o.flushAccts, KeysPer: 1, Limited: 0,
		Balance: money.Micros(1_000_000_000), AccountName: "flush-%07d",
	})
	if err != nil {
		return err
	}
	b.flushDB = filepath.Join(b.work, "flush.db")
	b.flushKeys = filepath.Join(b.work, "flush-keys.txt")
	return writeLines(b.flushKeys, fl.Keys)
}

func (b *bench) seedStore(ctx context.Context, name string, sp seedSpec) (seeded, error) {
	path := filepath.Join(b.seedDir, name)
	s, err := seed(ctx, path, sp)
	if err != nil {
		return s, fmt.Errorf("seed %s: %w", name, err)
	}
	where := "on tmpfs, then copied to disk"
	if b.seedDir != b.work {
		if err := copyFile(path, filepath.Join(b.work, name)); err != nil {
			return s, err
		}
		os.Remove(path)
	} else {
		where = "on disk"
	}
	msg := fmt.Sprintf("%s: %d accounts, %d keys (%d rate-limited) seeded through keystore's API in %v %s",
		name, sp.Accounts, len(s.Keys)+len(s.Limited), len(s.Limited), s.Took.Round(time.Millisecond), where)
	b.Seeding = append(b.Seeding, msg)
	b.logf("%s", msg)
	return s, nil
}

func copyFile(from, to string) error {
	src, err := os.Open(from)
	if err != nil {
		return err
	}
	defer src.Close()
	dst, err := os.OpenFile(to, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(dst, src); err != nil {
		dst.Close()
		return err
	}
	if err := dst.Sync(); err != nil {
		dst.Close()
		return err
	}
	return dst.Close()
}

// startKeygate starts keygate serve (store: bbolt) on db with extra
// environment.
func (b *bench) startKeygate(ctx context.Context, name, db string, env ...string) (*server, error) {
	return b.startServer(ctx, name, b.config, db, env...)
}

func (b *bench) startNoop(ctx context.Context) (*server, error) {
	addrs, err := freeAddrs(1)
	if err != nil {
		return nil, err
	}
	p, err := startProc("floor", filepath.Join(b.o.out, "noop.log"), nil,
		pinned(b.serverCPU, b.noopBin, "-listen", addrs[0])...)
	if err != nil {
		return nil, err
	}
	b.procs = append(b.procs, p)
	s := &server{name: "floor", p: p, addr: addrs[0]}
	return s, p.waitReady(ctx, 30*time.Second, dialable(s.addr))
}

// stopServer stops s; a server that does not exit cleanly is a problem
// (keygate's SIGTERM path flushes the ledger).
func (b *bench) stopServer(s *server) {
	if err := s.p.stop(30 * time.Second); err != nil {
		b.problem("%s did not stop cleanly: %v (see %s)", s.name, err, s.p.log.Name())
	}
}

// cleanup stops every process still running and removes temporary files.
func (b *bench) cleanup() error {
	var errs []error
	for _, p := range b.procs {
		if !p.exited() {
			if err := p.stop(15 * time.Second); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if b.seedDir != "" && b.seedDir != b.work {
		os.RemoveAll(b.seedDir)
	}
	if b.work != "" {
		if b.o.keep {
			b.logf("kept %s", b.work)
		} else {
			os.RemoveAll(b.work)
		}
	}
	return errors.Join(errs...)
}

// primeFor is the window of a generator with one call in flight that
// sends n Checks: ample on a loaded machine (the window is fixed: it
// lasts that long).
func primeFor(n int) time.Duration { return time.Second + time.Duration(n)*5*time.Millisecond }

// measure runs the main phases: rounds of floor and keygate with allowed
// traffic at each concurrency, then keygate's denial paths.
func (b *bench) measure(ctx context.Context) error {
	floor, err := b.startNoop(ctx)
	if err != nil {
		return err
	}
	env := []string{}
	if b.o.profile {
		env = append(env, "KEYGATE_PPROF=1")
	}
	kg, err := b.startKeygate(ctx, "keygate", filepath.Join(b.work, "keygate.db"), env...)
	if err != nil {
		return err
	}
	// A rate-limited key's bucket holds one request (1/d): one Check per
	// key spends them all before anything is measured, whatever the
	// warm-up manages on a slow machine.
	prime, err := b.gen(ctx, kg, loadgen.ModeRateLimited, 1, b.keys, 0, 0, primeFor(b.o.limitedKeys),
		"-max", strconv.Itoa(b.o.limitedKeys))
	if err == nil && prime.Requests != uint64(b.o.limitedKeys) {
		err = fmt.Errorf("%w: %d of %d Checks answered in %v (errors %d, first: %s)",
			errBench, prime.Requests, b.o.limitedKeys, primeFor(b.o.limitedKeys), prime.Errors, prime.FirstErr)
	}
	if err != nil {
		return fmt.Errorf("spending the rate-limited keys' buckets: %w", err)
	}
	denials := []string{loadgen.ModeUnknown, loadgen.ModeGarbage, loadgen.ModeRateLimited, loadgen.ModeBadPath}
	for r := 1; r <= b.o.rounds; r++ {
		for _, c := range b.o.concs {
			for _, s := range []*server{floor, kg} {
				if _, err := b.phase(ctx, s, loadgen.ModeAllowed, c, r, b.keys, 0); err != nil {
					return err
				}
			}
		}
		for _, m := range denials {
			if _, err := b.phase(ctx, kg, m, b.o.denialConc, r, b.keys, 0); err != nil {
				return err
			}
		}
	}
	if b.o.profile {
		if err := b.profileKeygate(ctx, kg); err != nil {
			return err
		}
	}
	b.stopServer(floor)
	b.stopServer(kg)
	return nil
}

// phase runs the generator once, pinned to its core, and checks that the
// server answered what the traffic should get.
func (b *bench) phase(ctx context.Context, s *server, mode string, conc, round int, keys string, slot time.Duration, extra ...string) (*phaseRun, error) {
	want := loadgen.Modes[mode]
	if s.name == "floor" {
		want = 200
	}
	pr := &phaseRun{Server: s.name, Mode: mode, Conc: conc, Round: round, Want: want}
	res, err := b.gen(ctx, s, mode, conc, keys, slot, b.o.warmup, b.o.duration, extra...)
	if err != nil {
		return nil, fmt.Errorf("%s %s c=%d: %w", s.name, mode, conc, err)
	}
	pr.Result = res
	b.add(pr)
	h := loadgen.FromSparse(res.Latency)
	b.logf("round %d  %-13s %-11s c=%-3d %8.0f/s  p50 %6.0fµs  p99 %6.0fµs  server %5.1f µs/check  %v",
		round, s.name, mode, conc, res.PerSecond, us(h.Quantile(0.5)), us(h.Quantile(0.99)),
		perCheckUS(res.ServerCPUSeconds, res.Requests), res.ByStatus)
	return pr, nil
}

// add records a measured phase and checks it.
func (b *bench) add(pr *phaseRun) {
	res := pr.Result
	if core, err := strconv.Atoi(b.serverCPU); err == nil && core < len(res.CoreBusySeconds) {
		pr.Other = max(0, res.CoreBusySeconds[core]-res.ServerCPUSeconds)
		if share := pr.Other / res.Seconds; share > 0.10 {
			b.warn("%s %s c=%d round %d: other processes used %.0f%% of the server's core: its figures are low", pr.Server, pr.Mode, pr.Conc, pr.Round, 100*share)
		}
	}
	b.Phases = append(b.Phases, pr)
	b.check(pr)
}

// warn records something that makes figures noisy, not wrong.
func (b *bench) warn(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	b.Warnings = append(b.Warnings, msg)
	b.logf("warning: %s", msg)
}

func (b *bench) check(pr *phaseRun) {
	res := pr.Result
	name := fmt.Sprintf("%s %s c=%d round %d", pr.Server, pr.Mode, pr.Conc, pr.Round)
	switch {
	case res.Requests == 0:
		b.problem("%s: no request answered (errors %d, first: %s)", name, res.Errors, res.FirstErr)
	case res.Errors > 0:
		b.problem("%s: %d errors (first: %s)", name, res.Errors, res.FirstErr)
	}
	if res.Timeouts > 0 {
		b.warn("%s: %d Checks not answered within the %v timeout (Envoy would fail them)", name, res.Timeouts, b.o.timeout)
	}
	if res.Requests > 0 {
		if frac := float64(res.ByStatus[pr.Want]) / float64(res.Requests); frac < 0.999 {
			b.problem("%s: only %.2f%% of answers were %d, by status %v", name, 100*frac, pr.Want, res.ByStatus)
		}
	}
	if res.ServerCPUSeconds <= 0 {
		b.problem("%s: no server CPU time measured", name)
	}
}

// gen runs `load gen` against s and decodes its result.
func (b *bench) gen(ctx context.Context, s *server, mode string, conc int, keys string, slot, warmup, duration time.Duration, extra ...string) (loadgen.Result, error) {
	return b.genCluster(ctx, single(s), mode, conc, keys, slot, warmup, duration, extra...)
}

// genCluster runs `load gen` against every server of cl and decodes its
// result.
func (b *bench) genCluster(ctx context.Context, cl *cluster, mode string, conc int, keys string, slot, warmup, duration time.Duration, extra ...string) (loadgen.Result, error) {
	args := append([]string{b.self, "gen"}, clusterArgs(cl)...)
	args = append(args, "-mode", mode, "-keys", keys, "-limited", b.limited,
		"-c", strconv.Itoa(conc), "-conns", strconv.Itoa(b.o.conns), "-client", b.o.client,
		"-warmup", warmup.String(), "-duration", duration.String(), "-slot", slot.String(),
		"-clk-tck", strconv.FormatInt(b.ticks, 10),
		"-timeout", b.o.timeout.String(), "-raw="+strconv.FormatBool(b.o.raw))
	args = append(args, extra...)
	argv := pinned(b.genCPU, args...)
	ctx, cancel := context.WithTimeout(ctx, warmup+duration+2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return loadgen.Result{}, fmt.Errorf("generator: %w: %s", err, strings.TrimSpace(stderr.String()))
	}
	var res loadgen.Result
	if err := json.Unmarshal(stdout.Bytes(), &res); err != nil {
		return loadgen.Result{}, fmt.Errorf("generator output: %w", err)
	}
	procs := []*proc{cl.redis}
	for _, s := range cl.servers {
		procs = append(procs, s.p)
	}
	for _, p := range procs {
		if p != nil && p.exited() {
			return res, fmt.Errorf("%w: %s exited during the phase (%v); see %s", errBench, p.name, p.err, p.log.Name())
		}
	}
	return res, nil
}

// profileKeygate runs one more keygate phase (allowed traffic at the
// highest concurrency) while keygate's /debug/pprof/profile records it.
func (b *bench) profileKeygate(ctx context.Context, kg *server) error {
	url := "http://" + kg.httpAddr + "/debug/pprof/profile"
	resp, err := http.Get(url + "?seconds=0")
	if err == nil {
		resp.Body.Close()
	}
	if err != nil || resp.StatusCode == http.StatusNotFound {
		b.problem("no CPU profile: keygate does not serve %s with KEYGATE_PPROF=1", url)
		return nil
	}
	conc := b.o.concs[len(b.o.concs)-1]
	secs := max(1, int(b.o.duration.Seconds()))
	type got struct {
		body []byte
		err  error
	}
	ch := make(chan got, 1)
	go func() {
		time.Sleep(b.o.warmup + 300*time.Millisecond) // gen start-up, then the window
		resp, err := http.Get(url + "?seconds=" + strconv.Itoa(secs))
		if err != nil {
			ch <- got{err: err}
			return
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err == nil && resp.StatusCode != http.StatusOK {
			err = fmt.Errorf("%w: %s: %s", errBench, url, resp.Status)
		}
		ch <- got{body, err}
	}()
	// The phase runs longer than the profile so that the profile sees load only.
	_, err = b.gen(ctx, kg, loadgen.ModeAllowed, conc, b.keys, 0, b.o.warmup, time.Duration(secs)*time.Second+time.Second)
	if err != nil {
		return err
	}
	g := <-ch
	if g.err != nil {
		b.problem("CPU profile: %v", g.err)
		return nil
	}
	b.Profile = filepath.Join(b.o.out, "keygate.cpu.pprof")
	if err := os.WriteFile(b.Profile, g.body, 0o644); err != nil {
		return err
	}
	b.logf("CPU profile of keygate, allowed traffic at c=%d, %ds: %s", conc, secs, b.Profile)
	return nil
}

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

func perCheckUS(cpuSeconds float64, n uint64) float64 {
	if n == 0 {
		return 0
	}
	return cpuSeconds * 1e6 / float64(n)
}
