package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keygate/keygate/cmd/bench/internal/loadgen"
	"github.com/keygate/keygate/keystore/rconn/rconntest"
)

// TestMain lets the test binary stand in for the load command: the
// orchestrator runs its own executable as `load gen`.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == "gen" {
		if err := run(context.Background(), os.Args[1:], os.Stdout, os.Stderr); err != nil {
			fmt.Fprintln(os.Stderr, "load:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// TestOrchestrate runs the whole benchmark, tiny and short: it builds keygate
// and the no-op server, seeds a store, starts both, and checks that every
// phase got the answers its traffic should get from each server. It asserts
// nothing about speed.
func TestOrchestrate(t *testing.T) {
	if testing.Short() {
		t.Skip("builds keygate")
	}
	out := t.TempDir()
	o, err := parseOptions([]string{"-out", out, "-quick", "-warmup", "50ms", "-duration", "300ms", "-timeout", "1m",
		"-accounts", "20", "-keys-per-account", "2", "-limited-keys", "10", "-flush=false"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if err := orchestrate(ctx, o, io.Discard, io.Discard); err != nil {
		t.Fatal(err)
	}
	js, err := os.ReadFile(filepath.Join(out, "results.json"))
	if err != nil {
		t.Fatal(err)
	}
	var got struct {
		Phases []phaseRun `json:"phases"`
	}
	if err := json.Unmarshal(js, &got); err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, p := range got.Phases {
		seen[fmt.Sprintf("%s %s %d", p.Server, p.Mode, p.Conc)] = true
		if p.Result.Requests == 0 || p.Result.ByStatus[p.Want] != p.Result.Requests {
			t.Errorf("%s %s c=%d: %d requests, by status %v, want all %d", p.Server, p.Mode, p.Conc, p.Result.Requests, p.Result.ByStatus, p.Want)
		}
	}
	for _, want := range []string{"floor allowed 16", "keygate allowed 16", "floor allowed 64", "keygate allowed 64",
		"keygate " + loadgen.ModeUnknown + " 64", "keygate " + loadgen.ModeGarbage + " 64",
		"keygate " + loadgen.ModeRateLimited + " 64", "keygate " + loadgen.ModeBadPath + " 64"} {
		if !seen[want] {
			t.Errorf("no phase %q in results.json", want)
		}
	}
	if _, err := os.Stat(filepath.Join(out, "table.txt")); err != nil {
		t.Error(err)
	}
}

// TestOrchestrateRedis runs the Redis mode, tiny and short: a redis-server
// of its own, 1 and 2 replicas, and checks that every phase was answered
// as its traffic should be and that the replicas' Redis commands were
// counted. It asserts nothing about speed.
func TestOrchestrateRedis(t *testing.T) {
	if testing.Short() {
		t.Skip("builds keygate")
	}
	if _, err := exec.LookPath("redis-server"); err != nil {
		if os.Getenv(rconntest.RequiredEnv) != "" {
			t.Fatal(err)
		}
		t.Skip(rconntest.SkipMessage)
	}
	out := t.TempDir()
	// A generous redis.timeout: a busy test machine must not trip the
	// replicas' breaker (the benchmark itself keeps keygate's default).
	o, err := parseOptions([]string{"-out", out, "-redis", "-quick", "-warmup", "50ms", "-duration", "300ms", "-redis-warmup", "200ms",
		"-timeout", "1m", "-redis-timeout", "5s", "-replicas", "1,2", "-hot-keys", "5",
		"-accounts", "20", "-keys-per-account", "2", "-limited-keys", "10"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if err := orchestrate(ctx, o, io.Discard, io.Discard); err != nil {
		t.Fatal(err)
	}
	js, err := os.ReadFile(filepath.Join(out, "results.json"))
	if err != nil {
		t.Fatal(err)
	}
	var got struct {
		Phases []phaseRun `json:"phases"`
	}
	if err := json.Unmarshal(js, &got); err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	var allCmds float64
	for _, p := range got.Phases {
		seen[fmt.Sprintf("%s %s %d", p.Server, p.Mode, p.Conc)] = true
		if p.Result.Requests == 0 || p.Result.ByStatus[p.Want] != p.Result.Requests {
			t.Errorf("%s %s c=%d: %d requests, by status %v, want all %d", p.Server, p.Mode, p.Conc, p.Result.Requests, p.Result.ByStatus, p.Want)
		}
		if p.Replicas > 0 {
			// A phase may take no Redis command at all (replicas keep
			// their leases while nothing is contended), but it counts its
			// Checks, and the phases together take some.
			cmds, checks := redisPerCheck(p.Result.Counters)
			allCmds += cmds
			if checks == 0 || p.Result.RedisCPUSeconds < 0 {
				t.Errorf("%s %s c=%d: %v Redis commands over %v checks", p.Server, p.Mode, p.Conc, cmds, checks)
			}
		}
	}
	if allCmds == 0 {
		t.Error("no Redis command counted in any Redis phase")
	}
	for _, want := range []string{"floor allowed 16", "keygate allowed 64", "redis ×1 allowed 16", "redis ×2 allowed 64",
		"redis ×1 " + modeHot + " 64", "redis ×2 " + modeHot + " 64"} {
		if !seen[want] {
			t.Errorf("no phase %q in results.json", want)
		}
	}
	table, err := os.ReadFile(filepath.Join(out, "table.txt"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Redis mode", "redis cmds/check", "not pinned (Redis mode)"} {
		if !strings.Contains(string(table), want) {
			t.Errorf("table.txt lacks %q", want)
		}
	}
}
