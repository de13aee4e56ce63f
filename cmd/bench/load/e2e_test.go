package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/keygate/keygate/cmd/bench/internal/loadgen"
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
