package main_test

// The end-to-end suite drives the real keygate binary the way an operator and
// Envoy do: `keygate serve` as a subprocess on loopback ports, the CLI as
// further subprocesses, and ext_authz Checks over gRPC. The binary is built
// once per test run, lazily, so that `go test -run SomethingElse` does not
// pay for it. Under -race the binary itself is built with -race too, so a
// data race in the server fails the test that stops it (exit code 66).

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

// Stamped into the test binary, so that `keygate version` can be checked.
const (
	e2eVersion = "v0.0.0-e2e"
	e2eCommit  = "e2ec0ffee"
)

var (
	binDir    string // temporary directory holding the binary; removed by TestMain
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	dir, err := os.MkdirTemp("", "keygate-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e: temp dir:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	binDir = dir
	return m.Run()
}

// keygateBinary returns the path of the keygate binary built from this
// package, building it on first use.
func keygateBinary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		goTool, err := exec.LookPath("go")
		if err != nil {
			buildErr = fmt.Errorf("go tool not found: %w", err)
			return
		}
		out := filepath.Join(binDir, "keygate")
		args := []string{"build", "-o", out,
			"-ldflags", "-X main.version=" + e2eVersion + " -X main.commit=" + e2eCommit}
		if raceEnabled {
			args = append(args, "-race")
		}
		args = append(args, ".") // the test runs in the package directory, cmd/keygate
		cmd := exec.Command(goTool, args...)
		if b, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go %v: %w\n%s", args, err, b)
			return
		}
		binPath = out
	})
	if buildErr != nil {
		t.Fatalf("building keygate: %v", buildErr)
	}
	return binPath
}
