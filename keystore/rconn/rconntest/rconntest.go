// Package rconntest runs a real redis-server for tests: on a free
// 127.0.0.1 port, in a temporary directory, stopped when the test ends.
// It can kill, restart (same port and directory, so that AOF data comes
// back), and pause a server (SIGSTOP: a Redis that black-holes requests).
//
// When no redis-server binary is in PATH, Start skips the test with a loud
// message, or fails it when KEYGATE_REDIS_REQUIRED is set (CI, where a
// skipped Redis test would hide a broken install).
package rconntest

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Binary is the program Start runs, looked up in PATH.
const Binary = "redis-server"

// RequiredEnv, when set to a non-empty value, turns a missing redis-server
// into a test failure instead of a skip.
const RequiredEnv = "KEYGATE_REDIS_REQUIRED"

// SkipMessage is the reason a test is skipped without redis-server.
const SkipMessage = "SKIPPING: redis-server not found in PATH; install it (apt-get install redis-server) — Redis-mode tests did not run"

const (
	startTimeout = 10 * time.Second
	stopTimeout  = 5 * time.Second
)

// Option configures Start.
type Option func(*config)

type config struct {
	appendOnly bool
	password   string
	addr       string
	args       []string
}

// NoAppendOnly starts the server with appendonly no: as snapshots are off
// too, a restart loses all its data.
func NoAppendOnly() Option { return func(c *config) { c.appendOnly = false } }

// Password starts the server with requirepass.
func Password(pw string) Option { return func(c *config) { c.password = pw } }

// Addr starts the server on addr (127.0.0.1:port, as from FreeAddr)
// instead of a free port of its own choosing: to start Redis where a
// client already points.
func Addr(addr string) Option { return func(c *config) { c.addr = addr } }

// Args appends raw redis-server arguments, e.g. "--rename-command",
// "CONFIG", "".
func Args(args ...string) Option { return func(c *config) { c.args = append(c.args, args...) } }

// Server is a running (or stopped, killed, paused) redis-server.
type Server struct {
	t    testing.TB
	bin  string
	dir  string
	addr string
	pw   string
	args []string

	mu     sync.Mutex
	cmd    *exec.Cmd
	done   chan struct{} // closed when cmd has exited
	paused bool
	starts int // for the log file name
}

// Start runs redis-server and waits until it answers PING. The server is
// stopped when the test ends.
func Start(t testing.TB, opts ...Option) *Server {
	t.Helper()
	bin, err := exec.LookPath(Binary)
	if err != nil {
		if os.Getenv(RequiredEnv) != "" {
			t.Fatalf("%s is set but %s is not in PATH: %v", RequiredEnv, Binary, err)
		}
		t.Skip(SkipMessage)
	}
	c := config{appendOnly: true}
	for _, o := range opts {
		o(&c)
	}
	s := &Server{t: t, bin: bin, dir: t.TempDir(), addr: c.addr, pw: c.password}
	t.Cleanup(s.Stop)
	s.args = []string{
		"--port", "", // filled in by start
		"--bind", "127.0.0.1",
		"--dir", s.dir,
		"--save", "",
		"--appendonly", yesNo(c.appendOnly),
		"--daemonize", "no",
		"--protected-mode", "no",
	}
	if c.password != "" {
		s.args = append(s.args, "--requirepass", c.password)
	}
	s.args = append(s.args, c.args...)
	// A free port can be taken between FreeAddr and the server's bind:
	// retry on a new one, unless the caller chose the address.
	for attempt := 0; ; attempt++ {
		if c.addr == "" {
			s.addr = FreeAddr()
		}
		err := s.start()
		if err == nil {
			return s
		}
		if c.addr != "" || attempt == 2 {
			t.Fatalf("start redis-server: %v", err)
		}
	}
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

// FreeAddr returns a 127.0.0.1 address with a port nothing listens on now
// (for a client dialled before its Redis starts: Start with Addr). Like
// httptest.NewServer, it panics when the system has no port to give.
func FreeAddr() string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(fmt.Sprintf("rconntest: find a free port: %v", err))
	}
	defer l.Close()
	return l.Addr().String()
}

// Addr returns the server's host:port.
func (s *Server) Addr() string { return s.addr }

// Password returns the server's requirepass ("" for none).
func (s *Server) Password() string { return s.pw }

// Dir returns the server's data directory.
func (s *Server) Dir() string { return s.dir }

// start runs the server (not running now) and waits until it answers.
func (s *Server) start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, port, err := net.SplitHostPort(s.addr)
	if err != nil {
		return fmt.Errorf("addr %q: %w", s.addr, err)
	}
	args := append([]string(nil), s.args...)
	args[1] = port
	s.starts++
	logPath := filepath.Join(s.dir, "redis-"+strconv.Itoa(s.starts)+".log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return err
	}
	defer logFile.Close() // the child has its own descriptor
	cmd := exec.Command(s.bin, args...)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.SysProcAttr = sysProcAttr()
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(done)
	}()
	s.cmd, s.done, s.paused = cmd, done, false
	deadline := time.Now().Add(startTimeout)
	for {
		if ping(s.addr) {
			return nil
		}
		select {
		case <-done:
			return fmt.Errorf("redis-server exited at start: %s", tail(logPath))
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			<-done
			return fmt.Errorf("redis-server did not answer PING within %s: %s", startTimeout, tail(logPath))
		}
	}
}

// ping reports whether a Redis answers on addr: +PONG, or -NOAUTH from a
// server with a password (it is up all the same). -LOADING is not up.
func ping(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, 100*time.Millisecond)
	if err != nil {
		return false
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(200 * time.Millisecond))
	if _, err := c.Write([]byte("PING\r\n")); err != nil {
		return false
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return false
	}
	return strings.HasPrefix(line, "+PONG") || strings.HasPrefix(line, "-NOAUTH")
}

// tail returns the end of a log file, for error messages.
func tail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	const max = 2000
	if len(b) > max {
		b = b[len(b)-max:]
	}
	return strings.TrimSpace(string(b))
}

// signal sends sig to the running server; false when none runs.
func (s *Server) signal(sig syscall.Signal) bool {
	if s.cmd == nil {
		return false
	}
	select {
	case <-s.done:
		return false
	default:
	}
	if err := s.cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		s.t.Errorf("signal redis-server (pid %d) with %v: %v", s.cmd.Process.Pid, sig, err)
		return false
	}
	return true
}

// Kill kills the server (SIGKILL) and waits until it has exited: a crash,
// which loses what the AOF had not yet written (up to a second).
func (s *Server) Kill() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.signal(syscall.SIGKILL) {
		<-s.done
	}
	s.paused = false
}

// Stop stops the server (SIGTERM, so that it writes its AOF; SIGKILL after
// 5s) and waits until it has exited. Safe to call more than once.
func (s *Server) Stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.paused {
		s.signal(syscall.SIGCONT) // a stopped process does not act on SIGTERM
		s.paused = false
	}
	if !s.signal(syscall.SIGTERM) {
		return
	}
	select {
	case <-s.done:
	case <-time.After(stopTimeout):
		s.t.Errorf("redis-server (pid %d) did not stop within %s of SIGTERM; killing it", s.cmd.Process.Pid, stopTimeout)
		s.signal(syscall.SIGKILL)
		<-s.done
	}
}

// Restart stops the server if it runs and starts it again on the same port
// and directory: what it had written to its AOF comes back.
func (s *Server) Restart() {
	s.t.Helper()
	s.Stop()
	if err := s.start(); err != nil {
		s.t.Fatalf("restart redis-server: %v", err)
	}
}

// Pause stops the server's process (SIGSTOP): connections are accepted by
// the kernel but nothing answers, as with a black-holed Redis.
func (s *Server) Pause() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.signal(syscall.SIGSTOP) {
		s.paused = true
	}
}

// Resume continues a paused server (SIGCONT).
func (s *Server) Resume() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.paused {
		s.signal(syscall.SIGCONT)
		s.paused = false
	}
}
