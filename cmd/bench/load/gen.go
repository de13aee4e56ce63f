package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"strconv"
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
	pid                               int
	ticks                             int64
	raw                               bool
}

func (g *genFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&g.addr, "addr", "127.0.0.1:9191", "ext_authz server (loopback only)")
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
	fs.IntVar(&g.pid, "pid", 0, "server PID whose CPU time and RSS to read over the window (0: none)")
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
	if err := loopback(g.addr); err != nil {
		return err
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
		Addr: g.addr, Client: g.client, Conns: g.conns, Concurrency: g.conc,
		Warmup: g.warmup, Duration: g.duration, MaxRequests: g.max, Source: src,
		Slot: g.slot, Timeout: g.timeout,
	}
	if g.pid > 0 {
		pid := strconv.Itoa(g.pid)
		cfg.Probe = func() loadgen.Sample {
			var s loadgen.Sample
			s.ServerCPU, _ = cpuTime(pid, g.ticks) // a failed read shows as zero CPU in the table
			s.ServerRSS, s.ServerHWM, _ = memory(pid)
			s.GenCPU, _ = cpuTime("self", g.ticks)
			s.CoreBusy, _ = coreBusy(g.ticks)
			return s
		}
	}
	res, err := loadgen.Run(ctx, cfg)
	if err != nil {
		return err
	}
	return json.NewEncoder(w).Encode(res)
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
