package rconntest_test

import (
	"bufio"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/keygate/keygate/keystore/rconn/rconntest"
)

// do sends one inline command and returns the first line of the reply, or
// "" when the server does not answer within a short while.
func do(t *testing.T, addr, cmd string) string {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return ""
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(300 * time.Millisecond))
	if _, err := c.Write([]byte(cmd + "\r\n")); err != nil {
		return ""
	}
	r := bufio.NewReader(c)
	line, err := r.ReadString('\n')
	if err != nil {
		return ""
	}
	line = strings.TrimSpace(line)
	if strings.HasPrefix(line, "$") && line != "$-1" { // bulk string: read its value
		v, _ := r.ReadString('\n')
		return strings.TrimSpace(v)
	}
	return line
}

func TestRestartKeepsAppendOnlyData(t *testing.T) {
	s := rconntest.Start(t)
	if got := do(t, s.Addr(), "SET k v1"); got != "+OK" {
		t.Fatalf("SET = %q", got)
	}
	addr := s.Addr()
	s.Restart()
	if s.Addr() != addr {
		t.Fatalf("Addr after Restart = %s, want %s", s.Addr(), addr)
	}
	if got := do(t, s.Addr(), "GET k"); got != "v1" {
		t.Fatalf("GET after Restart = %q, want v1 (AOF)", got)
	}
}

func TestNoAppendOnlyLosesDataOnRestart(t *testing.T) {
	s := rconntest.Start(t, rconntest.NoAppendOnly())
	if got := do(t, s.Addr(), "SET k v1"); got != "+OK" {
		t.Fatalf("SET = %q", got)
	}
	s.Restart()
	if got := do(t, s.Addr(), "GET k"); got != "$-1" {
		t.Fatalf("GET after Restart = %q, want nil", got)
	}
}

func TestKillThenRestart(t *testing.T) {
	s := rconntest.Start(t)
	s.Kill()
	if got := do(t, s.Addr(), "PING"); got != "" {
		t.Fatalf("PING after Kill = %q, want no answer", got)
	}
	s.Restart()
	if got := do(t, s.Addr(), "PING"); got != "+PONG" {
		t.Fatalf("PING after Restart = %q", got)
	}
}

func TestPauseResume(t *testing.T) {
	s := rconntest.Start(t)
	s.Pause()
	if got := do(t, s.Addr(), "PING"); got != "" {
		t.Fatalf("PING while paused = %q, want no answer", got)
	}
	s.Resume()
	if got := do(t, s.Addr(), "PING"); got != "+PONG" {
		t.Fatalf("PING after Resume = %q", got)
	}
	s.Pause() // Stop at cleanup must continue it first
}

func TestStopTwice(t *testing.T) {
	s := rconntest.Start(t)
	s.Stop()
	s.Stop()
	if got := do(t, s.Addr(), "PING"); got != "" {
		t.Fatalf("PING after Stop = %q, want no answer", got)
	}
}

func TestAddrAndPassword(t *testing.T) {
	addr := rconntest.FreeAddr()
	s := rconntest.Start(t, rconntest.Addr(addr), rconntest.Password("pw"))
	if s.Addr() != addr || s.Password() != "pw" {
		t.Fatalf("Addr, Password = %s, %q; want %s, pw", s.Addr(), s.Password(), addr)
	}
	if got := do(t, addr, "PING"); !strings.HasPrefix(got, "-NOAUTH") {
		t.Fatalf("PING without AUTH = %q, want -NOAUTH", got)
	}
}

func TestArgs(t *testing.T) {
	s := rconntest.Start(t, rconntest.Args("--maxmemory-policy", "allkeys-lru"))
	c, err := net.DialTimeout("tcp", s.Addr(), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(time.Second))
	if _, err := c.Write([]byte("CONFIG GET maxmemory-policy\r\n")); err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(c)
	var lines []string
	for range 5 { // *2, $16, maxmemory-policy, $11, allkeys-lru
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("reply so far %q: %v", lines, err)
		}
		lines = append(lines, strings.TrimSpace(line))
	}
	if lines[4] != "allkeys-lru" {
		t.Fatalf("CONFIG GET maxmemory-policy = %q, want allkeys-lru", lines)
	}
}
