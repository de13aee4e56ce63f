// Command load is keygate's load benchmark: `make bench` runs it.
//
// It builds keygate and the no-op ext_authz server (cmd/bench/noop), seeds a
// store through the keystore's Go API, starts both servers pinned to one
// core, and drives them from a generator pinned to the other core,
// alternating floor and keygate phases (A B A B) at each concurrency. It then
// measures keygate's denial paths and the effect of a large ledger flush on
// latency, prints a table, and writes everything to -out. Every process it
// starts is stopped by PID on the way out, errors and interrupts included.
//
//	go run ./cmd/bench/load -out bin/bench            # the full run, under 5 minutes
//	go run ./cmd/bench/load -out bin/bench -quick     # every phase, 1 s each
//	go run ./cmd/bench/load -out bin/bench -profile   # also a CPU profile of keygate under load
//	go run ./cmd/bench/load -out bin/bench -redis     # Redis mode: 1 and 3 replicas on a redis-server it starts
//
// `load gen` is the generator alone, one phase against one server (or
// several replicas, round-robin); the orchestrator runs it as a child
// process (see cmd/bench/README.md).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

var errFlags = errors.New("bad flags")

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "load:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 && args[0] == "gen" {
		return runGen(ctx, args[1:], stdout)
	}
	o, err := parseOptions(args, stderr)
	if err != nil {
		return err
	}
	return orchestrate(ctx, o, stdout, stderr)
}

// options of a benchmark run.
type options struct {
	out         string
	quick       bool
	profile     bool
	rounds      int
	warmup      time.Duration
	duration    time.Duration
	concs       []int // of the allowed-traffic phases
	denialConc  int
	conns       int
	client      string
	timeout     time.Duration
	raw         bool
	flush       bool
	flushAccts  int
	keygateBin  string // prebuilt; "" builds
	noopBin     string
	keep        bool
	accounts    int
	keysPer     int
	limitedKeys int
	// Redis mode (-redis): replaces the main, denial and flush phases.
	redis       bool
	redisBin    string
	replicas    []int
	redisWarmup time.Duration
	hotKeys     int
	// redisTimeout is the replicas' redis.timeout ("": keygate's default).
	redisTimeout string
}

func parseOptions(args []string, stderr io.Writer) (options, error) {
	fs := flag.NewFlagSet("load", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o options
	var concs string
	fs.StringVar(&o.out, "out", "bin/bench", "directory for the table, results.json, logs and the profile")
	fs.BoolVar(&o.quick, "quick", false, "short phases, one round, a 10,000-account flush: a smoke test, not a measurement")
	fs.BoolVar(&o.profile, "profile", false, "write a CPU profile of keygate under load (keygate must honour KEYGATE_PPROF=1)")
	fs.IntVar(&o.rounds, "rounds", 2, "rounds of floor/keygate alternation")
	fs.DurationVar(&o.warmup, "warmup", time.Second, "warm-up of each phase, not measured")
	fs.DurationVar(&o.duration, "duration", 6*time.Second, "measured time of each phase")
	fs.StringVar(&concs, "c", "16,64", "concurrencies of the allowed-traffic phases")
	fs.IntVar(&o.denialConc, "denial-c", 64, "concurrency of the denial phases")
	fs.IntVar(&o.conns, "conns", 2, "HTTP/2 connections from the generator (Envoy: one per worker thread)")
	fs.StringVar(&o.client, "client", "h2", "generator client: h2 (lean, Envoy-like) or grpc (grpc-go)")
	fs.DurationVar(&o.timeout, "timeout", 200*time.Millisecond, "grpc-timeout of each Check (Envoy's ext_authz default)")
	fs.BoolVar(&o.raw, "raw", false, "send headers as Envoy's encode_raw_headers (header_map)")
	fs.BoolVar(&o.flush, "flush", true, "run the ledger-flush phases")
	fs.IntVar(&o.flushAccts, "flush-accounts", 100_000, "accounts made dirty before a flush")
	fs.StringVar(&o.keygateBin, "keygate", "", "use this keygate binary instead of building one")
	fs.StringVar(&o.noopBin, "noop", "", "use this no-op server binary instead of building one")
	fs.BoolVar(&o.keep, "keep", false, "keep the run's temporary directory (stores, configs, keys)")
	fs.IntVar(&o.accounts, "accounts", 1_000, "accounts in the main store")
	fs.IntVar(&o.keysPer, "keys-per-account", 10, "keys per account in the main store")
	fs.IntVar(&o.limitedKeys, "limited-keys", 1_000, "rate-limited keys (1/d, spent before measuring)")
	var replicas string
	fs.BoolVar(&o.redis, "redis", false, "Redis mode: keygate with store: redis, 1 and 3 replicas on one redis-server it starts, beside the floor and keygate on bbolt, all unpinned (instead of the main, denial and flush phases)")
	fs.StringVar(&o.redisBin, "redis-server", "redis-server", "redis-server binary for -redis")
	fs.StringVar(&replicas, "replicas", "1,3", "replica counts of the Redis phases")
	fs.DurationVar(&o.redisWarmup, "redis-warmup", 5*time.Second, "warm-up of each Redis phase, so that its window opens on a steady state, not on first leases")
	fs.StringVar(&o.redisTimeout, "redis-timeout", "", "the replicas' redis.timeout (empty: keygate's default, 50ms); the tests raise it, so that a slow machine does not trip the breaker")
	fs.IntVar(&o.hotKeys, "hot-keys", 100, "Redis mode: one more phase per replica count at the highest concurrency, over this many keys only (0: none)")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("%w: unexpected arguments %q", errFlags, fs.Args())
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if o.quick {
		if !set["rounds"] {
			o.rounds = 1
		}
		if !set["warmup"] {
			o.warmup = 300 * time.Millisecond
		}
		if !set["duration"] {
			o.duration = time.Second
		}
		if !set["flush-accounts"] {
			o.flushAccts = 10_000
		}
		if !set["redis-warmup"] {
			o.redisWarmup = time.Second
		}
	}
	if o.redis {
		o.flush = false // the flush phases are the bbolt ledger's
	}
	for _, r := range strings.Split(replicas, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(r))
		if err != nil || n < 1 || n > 16 {
			return o, fmt.Errorf("%w: -replicas %q: counts from 1 to 16", errFlags, replicas)
		}
		o.replicas = append(o.replicas, n)
	}
	slices.Sort(o.replicas)
	o.replicas = slices.Compact(o.replicas)
	for _, c := range strings.Split(concs, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(c))
		if err != nil || n < 1 {
			return o, fmt.Errorf("%w: -c %q", errFlags, concs)
		}
		o.concs = append(o.concs, n)
	}
	switch {
	case o.rounds < 1 || o.duration <= 0 || o.warmup < 0 || o.redisWarmup < 0 || o.conns < 1 || o.denialConc < 1 || o.hotKeys < 0:
		return o, fmt.Errorf("%w: rounds, duration, conns and denial-c must be positive", errFlags)
	case o.accounts < 1 || o.keysPer < 1 || o.limitedKeys < 1 || o.flushAccts < 1:
		return o, fmt.Errorf("%w: accounts, keys-per-account, limited-keys and flush-accounts must be positive", errFlags)
	case o.redis && o.profile:
		return o, fmt.Errorf("%w: -profile profiles the bbolt run; run it without -redis", errFlags)
	case o.client != "h2" && o.client != "grpc":
		return o, fmt.Errorf("%w: -client %q: h2 or grpc", errFlags, o.client)
	}
	return o, nil
}
