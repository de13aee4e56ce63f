package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/keygate/keygate/cmd/bench/internal/loadgen"
)

// genFlags are the generator's: one phase, one server. The orchestrator runs
// `load gen` as its own process so that it can pin it to its own core.
type genFlags struct {
	addr, mode, keys, limited, client string
	conc, conns                       int
	warmup, duration, slot, timeout   time.Duration
	max                               uint64
	pids, metrics                     string
	redisPID                          int
	ticks                             int64
	raw                               bool
}

func (g *genFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&g.addr, "addr", "127.0.0.1:9191", "ext_authz server (loopback only); several, comma-separated, get the calls in turn")
	fs.StringVar(&g.mode, "mode", loadgen.ModeAllowed, "traffic: allowed, unknown, garbage, ratelimited or badpath")
	fs.StringVar(&g.keys, "keys", "", "file of valid secrets, one a line")
	fs.StringVar(&g.limited, "limited", "", "file of rate-limited secrets, one a line (mode ratelimited)")
	fs.StringVar(&g.client, "client", loadgen.ClientH2, "h2 (lean, Envoy-like) or grpc (grpc-go's client)")
	fs.IntVar(&g.conc, "c", 64, "calls in flight")
	fs.IntVar(&g.conns, "conns", 2, "HTTP/2 connections")
	fs.DurationVar(&g.warmup, "warmup", time.Second, "warm-up, not measured")
	fs.DurationVar(&g.duration, "duration", 6*time.Second, "measured time")
	fs.DurationVar(&g.slot, "slot", 0, "latency timeline slot (0: no timeline)")
	fs.DurationVar(&g.timeout, "timeout", 200*time.Millisecond, "grpc-timeout of each call (Envoy's ext_authz default)")
	fs.Uint64Var(&g.max, "max", 50_000_000, "most calls to start, warm-up included")
	fs.StringVar(&g.pids, "pid", "", "server PIDs, comma-separated, whose CPU time and RSS to read (summed) over the window")
	fs.IntVar(&g.redisPID, "redis-pid", 0, "redis-server PID whose CPU time to read over the window (0: none)")
	fs.StringVar(&g.metrics, "metrics", "", "keygate /metrics URLs (loopback), comma-separated, whose Redis and Check counters to read (summed) over the window")
	fs.Int64Var(&g.ticks, "clk-tck", 100, "USER_HZ, the unit of /proc/PID/stat times")
	fs.BoolVar(&g.raw, "raw", false, "send headers as Envoy's encode_raw_headers does (header_map)")
}

// runGen runs one phase and writes its Result as JSON to w.
func runGen(ctx context.Context, args []string, w io.Writer) error {
	fs := flag.NewFlagSet("load gen", flag.ContinueOnError)
	var g genFlags
	g.register(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	addrs := splitList(g.addr)
	if len(addrs) == 0 {
		return fmt.Errorf("%w: -addr: no server", errFlags)
	}
	for _, a := range addrs {
		if err := loopback(a); err != nil {
			return err
		}
	}
	urls := splitList(g.metrics)
	for _, u := range urls {
		if err := loopbackURL(u); err != nil {
			return err
		}
	}
	var pids []string
	for _, p := range splitList(g.pids) {
		if n, err := strconv.Atoi(p); err != nil || n <= 0 {
			return fmt.Errorf("%w: -pid %q", errFlags, g.pids)
		}
		pids = append(pids, p)
	}
	var keys, limited []string
	var err error
	if g.keys != "" {
		if keys, err = readLines(g.keys); err != nil {
			return err
		}
	}
	if g.limited != "" {
		if limited, err = readLines(g.limited); err != nil {
			return err
		}
	}
	src, err := loadgen.NewModeSource(g.mode, keys, limited, g.raw, uint64(time.Now().UnixNano()))
	if err != nil {
		return err
	}
	cfg := loadgen.Config{
		Addrs: addrs, Client: g.client, Conns: g.conns, Concurrency: g.conc,
		Warmup: g.warmup, Duration: g.duration, MaxRequests: g.max, Source: src,
		Slot: g.slot, Timeout: g.timeout,
	}
	// The probe runs in one goroutine, and Run returns after it.
	var probeErr error
	if len(pids) > 0 || len(urls) > 0 {
		cfg.Probe = func() loadgen.Sample {
			var s loadgen.Sample
			// A failed read of /proc shows as zero CPU in the table (a problem there).
			for _, pid := range pids {
				cpu, _ := cpuTime(pid, g.ticks)
				rss, hwm, _ := memory(pid)
				s.ServerCPU += cpu
				s.ServerRSS += rss
				s.ServerHWM += hwm
			}
			if g.redisPID > 0 {
				s.RedisCPU, _ = cpuTime(strconv.Itoa(g.redisPID), g.ticks)
			}
			s.GenCPU, _ = cpuTime("self", g.ticks)
			s.CoreBusy, _ = coreBusy(g.ticks)
			if len(urls) > 0 {
				s.Counters = map[string]float64{}
				for _, u := range urls {
					if err := scrapeCounters(ctx, u, redisCounters, s.Counters); err != nil && probeErr == nil {
						probeErr = fmt.Errorf("read %s: %w", u, err)
					}
				}
			}
			return s
		}
	}
	res, err := loadgen.Run(ctx, cfg)
	if err != nil {
		return err
	}
	if probeErr != nil {
		return probeErr // counters summed over fewer replicas would be wrong, not noisy
	}
	return json.NewEncoder(w).Encode(res)
}

// splitList splits a comma-separated flag, dropping empty items.
func splitList(s string) []string {
	var out []string
	for _, x := range strings.Split(s, ",") {
		if x = strings.TrimSpace(x); x != "" {
			out = append(out, x)
		}
	}
	return out
}

// loopbackURL refuses an http URL whose host is not loopback.
func loopbackURL(raw string) error {
	u, err := url.Parse(raw)
	if err != nil || u.Scheme != "http" || u.Port() == "" {
		return fmt.Errorf("%w: -metrics %q: want http://127.0.0.1:PORT/metrics", errFlags, raw)
	}
	return loopback(u.Host)
}

// loopback refuses any target but this machine's loopback: the benchmark
// sends load to servers it started itself, nowhere else.
func loopback(addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%w: -addr %q: %w", errFlags, addr, err)
	}
	if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback()) {
		return fmt.Errorf("%w: -addr %q: the generator targets loopback addresses only", errFlags, addr)
	}
	return nil
}
