package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/genproto/googleapis/rpc/code"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"

	"github.com/keygate/keygate/cmd/bench/internal/loadgen"
	"github.com/keygate/keygate/keystore"
)

func TestParseStat(t *testing.T) {
	// The command name may hold spaces and parentheses.
	line := []byte("1234 (my (odd) cmd) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0 1000 123456 789 18446744073709551615\n")
	got, err := parseStat(line, 100)
	if err != nil {
		t.Fatal(err)
	}
	if want := 3 * time.Second; got != want {
		t.Errorf("parseStat = %v, want %v", got, want)
	}
	for _, bad := range []string{"", "1234 (x) S 1", "1234 (x) S 1 1 1 0 -1 0 0 0 0 0 zz 50 0"} {
		if _, err := parseStat([]byte(bad), 100); err == nil {
			t.Errorf("parseStat(%q) succeeded", bad)
		}
	}
	// Our own process, for real.
	if _, err := cpuTime("self", clockTicks()); err != nil {
		t.Error(err)
	}
}

func TestParseStatus(t *testing.T) {
	status := "Name:\tkeygate\nVmPeak:\t  999 kB\nVmHWM:\t    2048 kB\nVmRSS:\t    1024 kB\nThreads:\t9\n"
	rss, hwm, err := parseStatus([]byte(status))
	if err != nil {
		t.Fatal(err)
	}
	if rss != 1024<<10 || hwm != 2048<<10 {
		t.Errorf("rss %d hwm %d", rss, hwm)
	}
	for _, bad := range []string{"Name: x\n", "VmRSS: 12 MB\nVmHWM: 1 kB\n", "VmRSS: x kB\nVmHWM: 1 kB\n"} {
		if _, _, err := parseStatus([]byte(bad)); err == nil {
			t.Errorf("parseStatus(%q) succeeded", bad)
		}
	}
	if _, _, err := memory("self"); err != nil {
		t.Error(err)
	}
}

func TestParseProcStat(t *testing.T) {
	stat := "cpu  300 0 60 900 5 0 6 3 0 0\ncpu0 100 0 20 500 3 0 2 1 0 0\ncpu1 200 0 40 400 2 0 4 2 0 0\nintr 5 0\n"
	got, err := parseProcStat([]byte(stat), 100)
	if err != nil {
		t.Fatal(err)
	}
	want := []time.Duration{1230 * time.Millisecond, 2460 * time.Millisecond}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("parseProcStat (-want +got):\n%s", diff)
	}
	if _, err := parseProcStat([]byte("cpu1 1 2 3 4 5 6 7 8\n"), 100); err == nil {
		t.Error("cpu1 without cpu0 accepted")
	}
	if _, err := coreBusy(100); err != nil {
		t.Error(err)
	}
}

func TestLoopback(t *testing.T) {
	tests := []struct {
		give string
		ok   bool
	}{
		{"127.0.0.1:9191", true},
		{"127.1.2.3:80", true},
		{"localhost:1", true},
		{"[::1]:9191", true},
		{"10.0.0.1:9191", false},
		{"192.0.2.1:9191", false},
		{"example.com:443", false},
		{"127.0.0.1", false},
	}
	for _, tt := range tests {
		if err := loopback(tt.give); (err == nil) != tt.ok {
			t.Errorf("loopback(%q) = %v, want ok %v", tt.give, err, tt.ok)
		}
	}
}

func TestParseOptions(t *testing.T) {
	o, err := parseOptions([]string{"-quick", "-c", "8, 32"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if o.rounds != 1 || o.duration != time.Second || o.flushAccts != 10_000 || !cmp.Equal(o.concs, []int{8, 32}) {
		t.Errorf("quick options: %+v", o)
	}
	o, err = parseOptions([]string{"-quick", "-rounds", "3"}, io.Discard)
	if err != nil || o.rounds != 3 {
		t.Errorf("-quick overrode -rounds: %+v, %v", o, err)
	}
	o, err = parseOptions(nil, io.Discard)
	if err != nil || o.rounds != 2 || o.duration != 6*time.Second || o.flushAccts != 100_000 || !cmp.Equal(o.concs, []int{16, 64}) {
		t.Errorf("defaults: %+v, %v", o, err)
	}
	for _, bad := range [][]string{{"-c", "x"}, {"-c", "0"}, {"-rounds", "0"}, {"-client", "curl"}, {"extra"}, {"-nope"}} {
		if _, err := parseOptions(bad, io.Discard); err == nil {
			t.Errorf("parseOptions(%q) succeeded", bad)
		}
	}
}

// TestSecretsMatchKeystore ties the generator's secrets to the store's format:
// well-formed unknown keys must pass the format check (so that they cost a
// hash and an index probe), random ones must not.
func TestSecretsMatchKeystore(t *testing.T) {
	rnd := rand.New(rand.NewPCG(1, 2))
	for range 1000 {
		if s := loadgen.WellFormedSecret(rnd); !keystore.ValidSecretFormat(s) {
			t.Fatalf("WellFormedSecret() = %q fails keystore's format check", s)
		}
	}
	failed := 0
	for range 1000 {
		if !keystore.ValidSecretFormat(loadgen.RandomSecret(rnd)) {
			failed++
		}
	}
	if failed < 990 {
		t.Errorf("only %d of 1000 random secrets fail the checksum", failed)
	}
}

func TestGrid(t *testing.T) {
	got := grid([][]string{{"a", "µs", "1"}, {"bbb", "2", "333"}})
	want := "a    µs    1\nbbb   2  333\n"
	if got != want {
		t.Errorf("grid:\n%q\nwant\n%q", got, want)
	}
	if got := fmtRate(1234567.4); got != "1,234,567" {
		t.Errorf("fmtRate = %q", got)
	}
	if got := fmtRate(999); got != "999" {
		t.Errorf("fmtRate = %q", got)
	}
}

func TestAggregate(t *testing.T) {
	var h1, h2 loadgen.Histogram
	h1.Record(time.Millisecond)
	h2.Record(3 * time.Millisecond)
	phases := []*phaseRun{
		{Server: "keygate", Mode: "allowed", Conc: 64, Want: 200, Result: loadgen.Result{Seconds: 2, Requests: 1000, PerSecond: 500, ServerCPUSeconds: 0.5, ServerRSS: 10, ByStatus: map[int]uint64{200: 1000}, Latency: h1.Sparse()}},
		{Server: "keygate", Mode: "allowed", Conc: 64, Want: 200, Result: loadgen.Result{Seconds: 2, Requests: 3000, PerSecond: 1500, ServerCPUSeconds: 1.5, ServerRSS: 30, ByStatus: map[int]uint64{200: 3000}, Latency: h2.Sparse()}},
		{Server: "floor", Mode: "allowed", Conc: 64, Result: loadgen.Result{Seconds: 1, Requests: 1}},
	}
	a := aggregate(phases, "keygate", "allowed", 64)
	if a.rate() != 1000 || a.cpuPerCheck() != 500 || a.rss != 30 || a.byStatus[200] != 4000 || a.hist.Count() != 2 {
		t.Errorf("aggregate: rate %v cpu %v rss %v status %v", a.rate(), a.cpuPerCheck(), a.rss, a.byStatus)
	}
	if a.spread() != "0.5k–1.5k" {
		t.Errorf("spread = %q", a.spread())
	}
	if aggregate(phases, "keygate", "allowed", 16) != nil {
		t.Error("aggregate of no phase is not nil")
	}
}

func TestFlushAnalyse(t *testing.T) {
	start := time.Unix(1000, 0)
	slot := func(i int, lat time.Duration, n int) loadgen.Slot {
		var h loadgen.Histogram
		for range n {
			h.Record(lat)
		}
		return loadgen.Slot{Offset: time.Duration(i) * slotWidth, Latency: h.Sparse()}
	}
	fp := &flushPhase{Result: loadgen.Result{Start: start}}
	for i := range 40 { // 2 s of slots; slots 20-23 (1.0-1.2 s) are slow
		lat := time.Millisecond
		if i >= 20 && i < 24 {
			lat = 5 * time.Millisecond
		}
		fp.Result.Timeline = append(fp.Result.Timeline, slot(i, lat, 100))
	}
	// Polls every 100 ms; a flush of 0.15 s ends between the polls at 1.1 s and 1.2 s.
	for i := range 20 {
		p := metricPoll{At: start.Add(time.Duration(i) * 100 * time.Millisecond)}
		if i >= 12 {
			p.Flushes, p.Seconds, p.Entries = 1, 0.15, 2000
		}
		fp.Polls = append(fp.Polls, p)
	}
	fp.analyse()
	want := []flushEvent{{From: 950 * time.Millisecond, To: 1200 * time.Millisecond, Seconds: 0.15, Entries: 2000}}
	if diff := cmp.Diff(want, fp.Events); diff != "" {
		t.Fatalf("events (-want +got):\n%s", diff)
	}
	// Slots overlapping 0.95-1.2 s: 19..23, of which 20..23 are slow.
	if fp.NDuring != 500 {
		t.Errorf("checks during = %d, want 500", fp.NDuring)
	}
	if fp.P99During < 5*time.Millisecond || fp.P99Outside > time.Millisecond+time.Millisecond/100 {
		t.Errorf("p99 during %v, outside %v", fp.P99During, fp.P99Outside)
	}
}

// TestGen runs `load gen` against a server in this process and decodes what
// it prints, as the orchestrator does.
func TestGen(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	authv3.RegisterAuthorizationServer(srv, allowAll{})
	go srv.Serve(lis) //nolint:errcheck // ends with Stop
	defer srv.Stop()

	keys := filepath.Join(t.TempDir(), "keys.txt")
	rnd := rand.New(rand.NewPCG(3, 4))
	if err := writeLines(keys, []string{loadgen.WellFormedSecret(rnd), loadgen.WellFormedSecret(rnd)}); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	err = run(context.Background(), []string{"gen", "-addr", lis.Addr().String(), "-keys", keys, "-c", "4", "-conns", "1",
		"-warmup", "20ms", "-duration", "300ms", "-timeout", "1m", "-pid", strconv.Itoa(os.Getpid())}, &out, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	var res loadgen.Result
	if err := json.Unmarshal(out.Bytes(), &res); err != nil {
		t.Fatalf("%v: %s", err, out.String())
	}
	if res.Requests == 0 || res.Errors != 0 || res.ByStatus[200] != res.Requests {
		t.Errorf("result: %d requests, %d errors (%s), by status %v", res.Requests, res.Errors, res.FirstErr, res.ByStatus)
	}
	if res.ServerRSS == 0 || len(res.CoreBusySeconds) == 0 {
		t.Errorf("no process readings: rss %d, cores %v", res.ServerRSS, res.CoreBusySeconds)
	}
	if err := run(context.Background(), []string{"gen", "-addr", "192.0.2.1:9191"}, io.Discard, io.Discard); err == nil ||
		!strings.Contains(err.Error(), "loopback") {
		t.Errorf("gen toward a non-loopback address: %v", err)
	}
}

type allowAll struct {
	authv3.UnimplementedAuthorizationServer
}

func (allowAll) Check(context.Context, *authv3.CheckRequest) (*authv3.CheckResponse, error) {
	return &authv3.CheckResponse{Status: &rpcstatus.Status{Code: int32(code.Code_OK)}}, nil
}
