package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
)

var errProc = errors.New("process")

// proc is a server process the orchestrator started; stop ends it by PID.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  *os.File
	done chan struct{} // closed when the process has exited
	err  error         // exit status, once done
}

// pinned returns argv run on the given CPU through taskset, or argv as it is
// when cpu is "" (no taskset, or one core). taskset execs the program, so
// the PID is the program's.
func pinned(cpu string, argv ...string) []string {
	if cpu == "" {
		return argv
	}
	return append([]string{"taskset", "-c", cpu}, argv...)
}

// startProc starts argv with its output in logPath.
func startProc(name, logPath string, env []string, argv ...string) (*proc, error) {
	lf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.Env = append(os.Environ(), env...)
	// Should the orchestrator itself be killed, its servers get SIGTERM
	// rather than outliving it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		lf.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, log: lf, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		lf.Close()
		close(p.done)
	}()
	return p, nil
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM, waits up to grace, then kills. It returns the exit
// error of a process that did not exit cleanly on SIGTERM.
func (p *proc) stop(grace time.Duration) error {
	if p.exited() {
		return p.err
	}
	p.cmd.Process.Signal(syscall.SIGTERM) //nolint:errcheck // it may have just exited
	select {
	case <-p.done:
		return p.err
	case <-time.After(grace):
		p.cmd.Process.Kill() //nolint:errcheck // same
		<-p.done
		return fmt.Errorf("%w: %s did not stop within %v of SIGTERM: killed", errProc, p.name, grace)
	}
}

// waitReady polls until check succeeds, the process exits or timeout passes.
func (p *proc) waitReady(ctx context.Context, timeout time.Duration, check func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := check()
		if err == nil {
			return nil
		}
		if p.exited() {
			return fmt.Errorf("%w: %s exited before it was ready (%v); see %s", errProc, p.name, p.err, p.log.Name())
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%w: %s not ready after %v: %v", errProc, p.name, timeout, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func dialable(addr string) func() error {
	return func() error {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
		}
		return err
	}
}

func httpOK(url string) func() error {
	return func() error {
		resp, err := http.Get(url) //nolint:gosec // a loopback URL the orchestrator built
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("%s: %s", url, resp.Status)
		}
		return nil
	}
}

// freeAddrs returns n loopback addresses with ports free at the time of the
// call.
func freeAddrs(n int) ([]string, error) {
	var out []string
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
		out = append(out, l.Addr().String())
	}
	return out, nil
}

// clockTicks is the kernel's USER_HZ, the unit of /proc/PID/stat's times.
// It is 100 on every Linux platform Go supports; getconf confirms it.
func clockTicks() int64 {
	out, err := exec.Command("getconf", "CLK_TCK").Output()
	if err == nil {
		if n, err := strconv.ParseInt(strings.TrimSpace(string(out)), 10, 64); err == nil && n > 0 {
			return n
		}
	}
	return 100
}

// cpuTime returns the user + system CPU time of process pid (all threads,
// exited ones included) from /proc/PID/stat.
func cpuTime(pid string, ticks int64) (time.Duration, error) {
	b, err := os.ReadFile("/proc/" + pid + "/stat")
	if err != nil {
		return 0, err
	}
	return parseStat(b, ticks)
}

// parseStat reads utime and stime (fields 14 and 15) from a /proc/PID/stat
// line. The command name, field 2, may hold spaces and parentheses: fields
// are counted from the last ')'.
func parseStat(b []byte, ticks int64) (time.Duration, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("%w: malformed stat %q", errProc, b)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("%w: short stat %q", errProc, b)
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("%w: stat: %w", errProc, err)
	}
	return time.Duration((ut + st) * int64(time.Second) / ticks), nil
}

// memory returns VmRSS and VmHWM (peak RSS) of process pid, in bytes.
func memory(pid string) (rss, hwm int64, err error) {
	b, err := os.ReadFile("/proc/" + pid + "/status")
	if err != nil {
		return 0, 0, err
	}
	return parseStatus(b)
}

func parseStatus(b []byte) (rss, hwm int64, err error) {
	found := 0
	for _, line := range strings.Split(string(b), "\n") {
		name, val, ok := strings.Cut(line, ":")
		if !ok || (name != "VmRSS" && name != "VmHWM") {
			continue
		}
		f := strings.Fields(val)
		if len(f) != 2 || f[1] != "kB" {
			return 0, 0, fmt.Errorf("%w: status line %q", errProc, line)
		}
		n, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return 0, 0, fmt.Errorf("%w: status line %q: %w", errProc, line, err)
		}
		if name == "VmRSS" {
			rss = n << 10
		} else {
			hwm = n << 10
		}
		found++
	}
	if found != 2 {
		return 0, 0, fmt.Errorf("%w: no VmRSS and VmHWM in status", errProc)
	}
	return rss, hwm, nil
}

// coreBusy returns each core's non-idle time from /proc/stat.
func coreBusy(ticks int64) ([]time.Duration, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return nil, err
	}
	return parseProcStat(b, ticks)
}

// parseProcStat reads the "cpuN" lines of /proc/stat: user nice system idle
// iowait irq softirq steal ...; busy is all but idle and iowait.
func parseProcStat(b []byte, ticks int64) ([]time.Duration, error) {
	var out []time.Duration
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 9 || !strings.HasPrefix(f[0], "cpu") || f[0] == "cpu" {
			continue
		}
		n, err := strconv.Atoi(f[0][3:])
		if err != nil || n != len(out) {
			return nil, fmt.Errorf("%w: /proc/stat line %q", errProc, line)
		}
		var busy int64
		for i, v := range f[1:9] {
			if i == 3 || i == 4 { // idle, iowait
				continue
			}
			x, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				return nil, fmt.Errorf("%w: /proc/stat line %q", errProc, line)
			}
			busy += x
		}
		out = append(out, time.Duration(busy*int64(time.Second)/ticks))
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%w: no cpuN lines in /proc/stat", errProc)
	}
	return out, nil
}
