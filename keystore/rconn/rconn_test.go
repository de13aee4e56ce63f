package rconn_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/keygate/keygate/keystore/rconn"
	"github.com/keygate/keygate/keystore/rconn/rconntest"
)

// harness is a Conn with its registry and logs.
type harness struct {
	*rconn.Conn
	reg  *prometheus.Registry
	logs *observer.ObservedLogs
}

func dial(t *testing.T, c rconn.Config) *harness {
	t.Helper()
	core, logs := observer.New(zapcore.DebugLevel)
	reg := prometheus.NewPedanticRegistry()
	conn, err := rconn.Dial(c, rconn.Options{Log: zap.New(core), Metrics: reg})
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return &harness{Conn: conn, reg: reg, logs: logs}
}

// run runs the breaker's prober until the test ends.
func (h *harness) run(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- h.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run = %v, want nil", err)
		}
	})
}

// waitAvailable waits (generously: this is not a timing assertion) until
// the prober has closed the breaker.
func (h *harness) waitAvailable(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !h.Available() {
		if time.Now().After(deadline) {
			t.Fatal("breaker still open 15s after Redis came back")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func ping(ctx context.Context, r *redis.Client) error { return r.Ping(ctx).Err() }

// call runs a PING through Call and reports whether fn ran.
func (h *harness) ping(op string) (ran bool, err error) {
	err = h.Call(context.Background(), op, func(ctx context.Context, r *redis.Client) error {
		ran = true
		return r.Ping(ctx).Err()
	})
	return ran, err
}

// metric returns the value of the sample of name whose labels include
// labels: a counter's or gauge's value, a histogram's count.
func (h *harness) metric(t *testing.T, name string, labels ...string) float64 {
	t.Helper()
	mfs, err := h.reg.Gather()
	if err != nil {
		t.Fatalf("Gather: %v", err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if !hasLabels(m, labels) {
				continue
			}
			switch {
			case m.Counter != nil:
				return m.Counter.GetValue()
			case m.Gauge != nil:
				return m.Gauge.GetValue()
			case m.Histogram != nil:
				return float64(m.Histogram.GetSampleCount())
			}
		}
	}
	return 0
}

func hasLabels(m *dto.Metric, kv []string) bool {
	for i := 0; i+1 < len(kv); i += 2 {
		found := false
		for _, l := range m.GetLabel() {
			if l.GetName() == kv[i] && l.GetValue() == kv[i+1] {
				found = true
			}
		}
		if !found {
			return false
		}
	}
	return true
}

// raw is a plain client to look at what a Conn wrote.
func raw(t *testing.T, s *rconntest.Server, db int) *redis.Client {
	t.Helper()
	c := redis.NewClient(&redis.Options{Addr: s.Addr(), Password: s.Password(), DB: db})
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func TestCall(t *testing.T) {
	s := rconntest.Start(t)
	h := dial(t, rconn.Config{Addr: s.Addr()})
	ctx := context.Background()

	err := h.Call(ctx, "set", func(ctx context.Context, r *redis.Client) error {
		return r.Set(ctx, h.Key("k"), "v", 0).Err()
	})
	if err != nil {
		t.Fatalf("Call set: %v", err)
	}
	var got string
	err = h.Call(ctx, "get", func(ctx context.Context, r *redis.Client) error {
		var err error
		got, err = r.Get(ctx, h.Key("k")).Result()
		return err
	})
	if err != nil || got != "v" {
		t.Fatalf("Call get = %q, %v; want v", got, err)
	}
	err = h.Call(ctx, "get", func(ctx context.Context, r *redis.Client) error {
		return r.Get(ctx, h.Key("missing")).Err()
	})
	if err != redis.Nil { //nolint:errorlint // Call must return redis.Nil as it is
		t.Fatalf("Call get missing = %v, want redis.Nil unwrapped", err)
	}

	if n := h.Commands(); n != 3 {
		t.Errorf("Commands = %d, want 3", n)
	}
	for _, c := range []struct {
		op, result string
		want       float64
	}{{"set", "ok", 1}, {"get", "ok", 2}, {"get", "error", 0}, {"get", "refused", 0}} {
		if got := h.metric(t, "keygate_redis_commands_total", "op", c.op, "result", c.result); got != c.want {
			t.Errorf("commands_total{op=%s,result=%s} = %v, want %v", c.op, c.result, got, c.want)
		}
	}
	if got := h.metric(t, "keygate_redis_call_duration_seconds"); got != 3 {
		t.Errorf("call_duration_seconds count = %v, want 3", got)
	}
	if got := h.metric(t, "keygate_redis_up"); got != 1 {
		t.Errorf("redis_up = %v, want 1", got)
	}
	if !h.Available() {
		t.Error("Available = false after successful calls")
	}
}

func TestKeyPrefix(t *testing.T) {
	s := rconntest.Start(t)
	for _, tt := range []struct {
		prefix, want string
	}{
		{"", "keygate:acct:a1"},
		{"tenant1:", "tenant1:acct:a1"},
	} {
		h := dial(t, rconn.Config{Addr: s.Addr(), KeyPrefix: tt.prefix})
		if got := h.Key("acct", "a1"); got != tt.want {
			t.Errorf("prefix %q: Key = %q, want %q", tt.prefix, got, tt.want)
		}
		err := h.Call(context.Background(), "set", func(ctx context.Context, r *redis.Client) error {
			return r.Set(ctx, h.Key("acct", "a1"), "x", 0).Err()
		})
		if err != nil {
			t.Fatal(err)
		}
		if n, err := raw(t, s, 0).Exists(context.Background(), tt.want).Result(); err != nil || n != 1 {
			t.Errorf("prefix %q: EXISTS %s = %d, %v; want 1", tt.prefix, tt.want, n, err)
		}
	}
	h := dial(t, rconn.Config{Addr: s.Addr()})
	if got := h.Key("marker"); got != "keygate:marker" {
		t.Errorf("Key(marker) = %q", got)
	}
	if got := h.Prefix(); got != "keygate:" {
		t.Errorf("Prefix = %q", got)
	}
}

func TestDB(t *testing.T) {
	s := rconntest.Start(t)
	h := dial(t, rconn.Config{Addr: s.Addr(), DB: 3})
	err := h.Call(context.Background(), "set", func(ctx context.Context, r *redis.Client) error {
		return r.Set(ctx, h.Key("k"), "x", 0).Err()
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if n, _ := raw(t, s, 3).Exists(ctx, h.Key("k")).Result(); n != 1 {
		t.Error("key not in db 3")
	}
	if n, _ := raw(t, s, 0).Exists(ctx, h.Key("k")).Result(); n != 0 {
		t.Error("key in db 0")
	}
}

// A black-holed Redis (SIGSTOP: the kernel accepts, nothing answers) costs
// one call its timeout, then opens the breaker: later calls are refused
// without reaching Redis. The prober closes it when Redis answers again.
func TestBlackHoled(t *testing.T) {
	for _, warm := range []bool{true, false} {
		t.Run(fmt.Sprintf("pooled connection %v", warm), func(t *testing.T) {
			s := rconntest.Start(t)
			h := dial(t, rconn.Config{Addr: s.Addr(), Timeout: 100 * time.Millisecond})
			if warm {
				if _, err := h.ping("ping"); err != nil {
					t.Fatalf("warm-up: %v", err)
				}
			}
			s.Pause()
			ran, err := h.ping("ping")
			if !ran || err == nil {
				t.Fatalf("Call to a paused Redis = ran %v, %v; want an error", ran, err)
			}
			if !rconn.IsUnavailable(err) {
				t.Errorf("IsUnavailable(%v) = false", err)
			}
			if h.Available() {
				t.Fatal("Available after a timeout; want the breaker open at once")
			}
			calls := h.Commands()
			for range 3 {
				ran, err := h.ping("ping")
				if ran || !errors.Is(err, rconn.ErrUnavailable) {
					t.Fatalf("Call with the breaker open = ran %v, %v; want ErrUnavailable without running fn", ran, err)
				}
			}
			if h.Commands() != calls {
				t.Errorf("Commands grew from %d to %d with the breaker open", calls, h.Commands())
			}
			if got := h.metric(t, "keygate_redis_commands_total", "op", "ping", "result", "refused"); got != 3 {
				t.Errorf("refused = %v, want 3", got)
			}
			if got := h.metric(t, "keygate_redis_breaker_open"); got != 1 {
				t.Errorf("breaker_open = %v, want 1", got)
			}
			if got := h.metric(t, "keygate_redis_up"); got != 0 {
				t.Errorf("redis_up = %v, want 0", got)
			}
			if n := h.logs.FilterMessageSnippet("breaker open").FilterField(zap.String("reason", "timeout")).Len(); n != 1 {
				t.Errorf("%d warnings of the breaker opening on a timeout, want 1: %v", n, h.logs.All())
			}

			h.run(t)
			s.Resume()
			h.waitAvailable(t)
			if _, err := h.ping("ping"); err != nil {
				t.Fatalf("Call after Resume: %v", err)
			}
			if got := h.metric(t, "keygate_redis_breaker_open"); got != 0 {
				t.Errorf("breaker_open = %v after recovery, want 0", got)
			}
			if n := h.logs.FilterMessageSnippet("available again").Len(); n != 1 {
				t.Errorf("%d info logs of the breaker closing, want 1", n)
			}
		})
	}
}

// TestCallFor: a call off the Check path outwaits a Redis that stalls for
// longer than Timeout, which a Call does not.
func TestCallFor(t *testing.T) {
	s := rconntest.Start(t)
	h := dial(t, rconn.Config{Addr: s.Addr(), Timeout: 50 * time.Millisecond})
	if _, err := h.ping("ping"); err != nil {
		t.Fatalf("warm-up: %v", err)
	}
	s.Pause()
	resumed := make(chan struct{})
	go func() {
		defer close(resumed)
		time.Sleep(300 * time.Millisecond)
		s.Resume()
	}()
	err := h.CallFor(context.Background(), "slow", 10*time.Second, func(ctx context.Context, r *redis.Client) error {
		return r.Ping(ctx).Err()
	})
	<-resumed
	if err != nil {
		t.Errorf("CallFor(10s) across a 300ms stall: %v", err)
	}
	if !h.Available() {
		t.Error("breaker open after a CallFor that succeeded")
	}
	// The longer-timeout client is made once, not per call (a Settle per
	// request uses it): CallFor allocates no more than Call.
	noop := func(context.Context, *redis.Client) error { return nil }
	call := testing.AllocsPerRun(100, func() { _ = h.Call(context.Background(), "noop", noop) })
	callFor := testing.AllocsPerRun(100, func() { _ = h.CallFor(context.Background(), "noop", 10*time.Second, noop) })
	if callFor > call {
		t.Errorf("CallFor allocates %v per call, Call %v: the long-timeout client is made per call", callFor, call)
	}
	s.Pause()
	defer s.Resume()
	if _, err := h.ping("ping"); !rconn.IsUnavailable(err) {
		t.Errorf("Call(50ms) to a paused Redis: %v, want unavailable", err)
	}
}

// Refused connections (Redis killed) open the breaker after three failures
// in a row; a restart closes it.
func TestRefused(t *testing.T) {
	s := rconntest.Start(t)
	// A long timeout, so that the refusals are not mistaken for timeouts on
	// a loaded machine.
	h := dial(t, rconn.Config{Addr: s.Addr(), Timeout: 5 * time.Second})
	if _, err := h.ping("ping"); err != nil {
		t.Fatal(err)
	}
	s.Kill()
	for i := 1; i <= 3; i++ {
		ran, err := h.ping("ping")
		if !ran || err == nil || !rconn.IsUnavailable(err) {
			t.Fatalf("call %d to a killed Redis = ran %v, %v; want an unavailability error", i, ran, err)
		}
		if want := i < 3; h.Available() != want {
			t.Fatalf("after %d failures Available = %v, want %v (last error %v)", i, !want, want, err)
		}
	}
	if ran, err := h.ping("ping"); ran || !errors.Is(err, rconn.ErrUnavailable) {
		t.Fatalf("Call with the breaker open = ran %v, %v", ran, err)
	}
	if got := h.metric(t, "keygate_redis_commands_total", "op", "ping", "result", "error"); got != 3 {
		t.Errorf("errors = %v, want 3", got)
	}
	if n := h.logs.FilterMessageSnippet("breaker open").FilterField(zap.String("reason", "consecutive failures")).Len(); n != 1 {
		t.Errorf("%d warnings of the breaker opening, want 1: %v", n, h.logs.All())
	}
	h.run(t)
	s.Restart()
	h.waitAvailable(t)
	if _, err := h.ping("ping"); err != nil {
		t.Fatalf("Call after restart: %v", err)
	}
}

// A success between failures resets the count: only consecutive failures
// open the breaker. A reply by which Redis says it cannot serve (READONLY,
// LOADING...) is a failure; the Lua script fakes one.
func TestConsecutiveFailures(t *testing.T) {
	s := rconntest.Start(t)
	h := dial(t, rconn.Config{Addr: s.Addr()})
	fake := func(reply string) error {
		return h.Call(context.Background(), "script", func(ctx context.Context, r *redis.Client) error {
			return r.Eval(ctx, "return redis.error_reply(ARGV[1])", nil, reply).Err()
		})
	}
	for i, step := range []struct {
		reply     string // "" for a success
		available bool
	}{
		{"READONLY You can't write against a read only replica.", true},
		{"LOADING Redis is loading the dataset in memory", true},
		{"", true},
		{"MASTERDOWN Link with MASTER is down", true},
		{"BUSY Redis is busy running a script", true},
		{"OOM command not allowed when used memory > 'maxmemory'.", false},
	} {
		var err error
		if step.reply == "" {
			_, err = h.ping("script")
		} else {
			err = fake(step.reply)
			if err == nil || !rconn.IsUnavailable(err) {
				t.Fatalf("step %d: %q = %v, want an unavailability error", i, step.reply, err)
			}
		}
		if step.reply == "" && err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
		if h.Available() != step.available {
			t.Fatalf("step %d (%q): Available = %v, want %v", i, step.reply, h.Available(), step.available)
		}
	}
	h.run(t)
	h.waitAvailable(t) // PING answers: the prober closes it
}

// Errors by which Redis answered, and fn's own errors, are returned but
// do not trip the breaker: a script refusing a lease is not an outage.
func TestAnswersDoNotTrip(t *testing.T) {
	s := rconntest.Start(t)
	h := dial(t, rconn.Config{Addr: s.Addr()})
	errNoFunds := errors.New("no funds")
	if err := raw(t, s, 0).Set(context.Background(), h.Key("str"), "x", 0).Err(); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name string
		fn   func(ctx context.Context, r *redis.Client) error
		want func(error) bool
	}{
		{"script error", func(ctx context.Context, r *redis.Client) error {
			return r.Eval(ctx, "return redis.error_reply('NOFUNDS balance too low')", nil).Err()
		}, func(err error) bool { return err != nil && strings.HasPrefix(err.Error(), "NOFUNDS") }},
		{"wrongtype", func(ctx context.Context, r *redis.Client) error {
			return r.HGet(ctx, h.Key("str"), "f").Err()
		}, func(err error) bool { return err != nil && strings.HasPrefix(err.Error(), "WRONGTYPE") }},
		{"own error", func(ctx context.Context, r *redis.Client) error {
			if err := r.Ping(ctx).Err(); err != nil {
				return err
			}
			return errNoFunds
		}, func(err error) bool { return errors.Is(err, errNoFunds) }},
	} {
		for range 5 {
			err := h.Call(context.Background(), "op", tt.fn)
			if !tt.want(err) {
				t.Fatalf("%s: Call = %v", tt.name, err)
			}
			if rconn.IsUnavailable(err) {
				t.Errorf("%s: IsUnavailable(%v) = true", tt.name, err)
			}
		}
		if !h.Available() {
			t.Fatalf("%s: breaker open after 5 answers", tt.name)
		}
	}
	if got := h.metric(t, "keygate_redis_commands_total", "op", "op", "result", "ok"); got != 15 {
		t.Errorf("ok = %v, want 15", got)
	}
}

// A caller that gives up (its context cancelled) does not count against
// Redis.
func TestCancelledCallerDoesNotTrip(t *testing.T) {
	s := rconntest.Start(t)
	h := dial(t, rconn.Config{Addr: s.Addr()})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	for range 5 {
		err := h.Call(ctx, "ping", ping)
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Call with a cancelled context = %v, want context.Canceled", err)
		}
		if rconn.IsUnavailable(err) {
			t.Errorf("IsUnavailable(%v) = true", err)
		}
	}
	if !h.Available() {
		t.Fatal("breaker open after cancelled calls")
	}
}

// Dial never waits for Redis: a replica starts while Redis is down, and
// its calls work once Redis starts.
func TestDialWhileDown(t *testing.T) {
	addr := rconntest.FreeAddr()
	h := dial(t, rconn.Config{Addr: addr, Timeout: 5 * time.Second})
	if _, err := h.ping("ping"); err == nil || !rconn.IsUnavailable(err) {
		t.Fatalf("Call with Redis down = %v, want an unavailability error", err)
	}
	if !h.Available() {
		t.Fatal("breaker open after one refusal")
	}
	rconntest.Start(t, rconntest.Addr(addr))
	if _, err := h.ping("ping"); err != nil {
		t.Fatalf("Call after Redis started: %v", err)
	}
}

func TestCheckPersistence(t *testing.T) {
	ctx := context.Background()
	t.Run("good", func(t *testing.T) {
		s := rconntest.Start(t)
		h := dial(t, rconn.Config{Addr: s.Addr()})
		if w := h.CheckPersistence(ctx); len(w) != 0 {
			t.Errorf("warnings = %q, want none", w)
		}
	})
	t.Run("appendonly no, allkeys-lru", func(t *testing.T) {
		s := rconntest.Start(t, rconntest.NoAppendOnly())
		h := dial(t, rconn.Config{Addr: s.Addr()})
		w := h.CheckPersistence(ctx)
		if len(w) != 1 || !strings.Contains(w[0], "appendonly no") || !strings.Contains(w[0], "set appendonly yes") {
			t.Errorf("warnings = %q, want one about appendonly no", w)
		}
		if err := raw(t, s, 0).ConfigSet(ctx, "maxmemory-policy", "allkeys-lru").Err(); err != nil {
			t.Fatal(err)
		}
		w = h.CheckPersistence(ctx)
		if len(w) != 2 || !strings.Contains(w[1], "maxmemory-policy is allkeys-lru") || !strings.Contains(w[1], "set noeviction") {
			t.Errorf("warnings = %q, want appendonly and maxmemory-policy", w)
		}
	})
	t.Run("CONFIG disabled", func(t *testing.T) {
		s := rconntest.Start(t, rconntest.Args("--rename-command", "CONFIG", ""))
		h := dial(t, rconn.Config{Addr: s.Addr()})
		w := h.CheckPersistence(ctx)
		if len(w) != 1 || !strings.Contains(w[0], "could not check") {
			t.Errorf("warnings = %q, want one saying it could not check", w)
		}
	})
	t.Run("Redis down", func(t *testing.T) {
		h := dial(t, rconn.Config{Addr: rconntest.FreeAddr()})
		w := h.CheckPersistence(ctx)
		if len(w) != 1 || !strings.Contains(w[0], "could not check") {
			t.Errorf("warnings = %q, want one saying it could not check", w)
		}
		if !h.Available() {
			t.Error("CheckPersistence went through the breaker")
		}
	})
}

func TestMarker(t *testing.T) {
	s := rconntest.Start(t)
	h := dial(t, rconn.Config{Addr: s.Addr()})
	ctx := context.Background()

	if e, err := h.Marker(ctx); err != nil || e != "" {
		t.Fatalf("Marker on a new Redis = %q, %v; want none", e, err)
	}
	epoch, created, err := h.InitMarker(ctx)
	if err != nil || !created || epoch == "" {
		t.Fatalf("InitMarker = %q, %v, %v; want a new epoch", epoch, created, err)
	}
	if e, c, err := h.InitMarker(ctx); err != nil || c || e != epoch {
		t.Fatalf("InitMarker again = %q, %v, %v; want %q, not created", e, c, err, epoch)
	}
	if got, _ := raw(t, s, 0).Get(ctx, "keygate:marker").Result(); got != epoch {
		t.Fatalf("keygate:marker = %q, want %q", got, epoch)
	}
	s.Restart() // AOF: the marker survives
	if e, err := h.Marker(ctx); err != nil || e != epoch {
		t.Fatalf("Marker after restart = %q, %v; want %q", e, err, epoch)
	}
	if err := raw(t, s, 0).FlushAll(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	if e, err := h.Marker(ctx); err != nil || e != "" {
		t.Fatalf("Marker after data loss = %q, %v; want none", e, err)
	}
	e2, created, err := h.InitMarker(ctx)
	if err != nil || !created || e2 == epoch || e2 == "" {
		t.Fatalf("InitMarker after data loss = %q, %v, %v; want a new epoch other than %q", e2, created, err, epoch)
	}

	s.Kill()
	for range 3 {
		_, _ = h.ping("ping")
	}
	if _, err := h.Marker(ctx); !errors.Is(err, rconn.ErrUnavailable) {
		t.Errorf("Marker with the breaker open = %v, want ErrUnavailable", err)
	}
	if _, _, err := h.InitMarker(ctx); !errors.Is(err, rconn.ErrUnavailable) {
		t.Errorf("InitMarker with the breaker open = %v, want ErrUnavailable", err)
	}
}

func TestPassword(t *testing.T) {
	const pw = "s3cret-Pa55"
	s := rconntest.Start(t, rconntest.Password(pw))

	h := dial(t, rconn.Config{Addr: s.Addr(), Password: pw})
	if _, err := h.ping("ping"); err != nil {
		t.Fatalf("right password: %v", err)
	}

	for _, tt := range []struct{ name, pw, want string }{
		{"wrong password", "nope", "WRONGPASS"},
		{"no password", "", "NOAUTH"},
	} {
		h := dial(t, rconn.Config{Addr: s.Addr(), Password: tt.pw, Timeout: 5 * time.Second})
		for range 3 {
			_, err := h.ping("ping")
			if err == nil || !strings.Contains(err.Error(), tt.want) || !rconn.IsUnavailable(err) {
				t.Fatalf("%s: Call = %v, want %s counted as unavailable", tt.name, err, tt.want)
			}
		}
		if h.Available() {
			t.Errorf("%s: breaker closed after 3 refusals", tt.name)
		}
		for _, e := range h.logs.All() {
			if strings.Contains(fmt.Sprint(e.Message, e.ContextMap()), pw) {
				t.Errorf("%s: log entry carries the password: %v", tt.name, e)
			}
		}
	}
}

func TestConfigStringHidesPassword(t *testing.T) {
	c := rconn.Config{Addr: "r:6379", Password: "hunter2", TLS: &rconn.TLS{CAFile: "/ca.pem"}}
	core, logs := observer.New(zapcore.InfoLevel)
	zap.New(core).Info("config", zap.Any("redis", c))
	for _, s := range []string{c.String(), fmt.Sprint(c), fmt.Sprintf("%+v", c), fmt.Sprint(logs.All()[0].ContextMap())} {
		if strings.Contains(s, "hunter2") {
			t.Errorf("%q shows the password", s)
		}
		if !strings.Contains(s, "r:6379") || !strings.Contains(s, "/ca.pem") {
			t.Errorf("%q lacks the address or CA file", s)
		}
	}
}

func TestDialConfigErrors(t *testing.T) {
	for _, tt := range []struct {
		name string
		c    rconn.Config
		want string
	}{
		{"empty addr", rconn.Config{}, `redis addr ""`},
		{"no port", rconn.Config{Addr: "localhost"}, "want host:port"},
		{"no host", rconn.Config{Addr: ":6379"}, "missing host"},
		{"port not a number", rconn.Config{Addr: "localhost:redis"}, `port "redis"`},
		{"port 0", rconn.Config{Addr: "localhost:0"}, `port "0"`},
		{"port too big", rconn.Config{Addr: "localhost:70000"}, `port "70000"`},
		{"negative db", rconn.Config{Addr: "localhost:6379", DB: -1}, "db -1"},
		{"negative timeout", rconn.Config{Addr: "localhost:6379", Timeout: -time.Second}, "timeout -1s"},
	} {
		_, err := rconn.Dial(tt.c, rconn.Options{})
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: Dial = %v, want an error containing %q", tt.name, err, tt.want)
		}
	}
	if _, err := rconn.Dial(rconn.Config{Addr: "[::1]:6379"}, rconn.Options{}); err != nil {
		t.Errorf("IPv6 addr: %v", err)
	}
}

func TestTLSConfig(t *testing.T) {
	dir := t.TempDir()
	notPEM := filepath.Join(dir, "not.pem")
	if err := os.WriteFile(notPEM, []byte("not a certificate\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(dir, "missing.pem")
	for _, tt := range []struct {
		name, file, want string
	}{
		{"missing", missing, missing},
		{"not PEM", notPEM, notPEM},
		{"a directory", dir, dir},
	} {
		_, err := rconn.Dial(rconn.Config{Addr: "redis.internal:6380", TLS: &rconn.TLS{CAFile: tt.file}}, rconn.Options{})
		if err == nil || !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), "ca_file") {
			t.Errorf("%s: Dial = %v, want an error naming ca_file %s", tt.name, err, tt.want)
		}
	}

	ca := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(ca, selfSignedPEM(t), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name       string
		tls        rconn.TLS
		serverName string
	}{
		{"CA file, server name from addr", rconn.TLS{CAFile: ca}, "redis.internal"},
		{"system roots, explicit server name", rconn.TLS{ServerName: "cache.example"}, "cache.example"},
	} {
		c, err := rconn.Dial(rconn.Config{Addr: "redis.internal:6380", TLS: &tt.tls}, rconn.Options{})
		if err != nil {
			t.Fatalf("%s: Dial: %v", tt.name, err)
		}
		conf := c.Client().Options().TLSConfig
		if conf == nil || conf.ServerName != tt.serverName || (tt.tls.CAFile != "") != (conf.RootCAs != nil) {
			t.Errorf("%s: TLSConfig = %+v", tt.name, conf)
		}
		_ = c.Close()
	}
	c, err := rconn.Dial(rconn.Config{Addr: "redis.internal:6379"}, rconn.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if c.Client().Options().TLSConfig != nil {
		t.Error("TLS without a tls block")
	}
	_ = c.Close()
}

func selfSignedPEM(t *testing.T) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

// The client is set up so that no wait outlives the timeout and nothing
// retries.
func TestClientOptions(t *testing.T) {
	c, err := rconn.Dial(rconn.Config{Addr: "localhost:6379"}, rconn.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	o := c.Client().Options()
	if c.Timeout() != rconn.DefaultTimeout {
		t.Errorf("Timeout = %s, want %s", c.Timeout(), rconn.DefaultTimeout)
	}
	for name, d := range map[string]time.Duration{
		"DialTimeout": o.DialTimeout, "ReadTimeout": o.ReadTimeout,
		"WriteTimeout": o.WriteTimeout, "PoolTimeout": o.PoolTimeout,
	} {
		if d != rconn.DefaultTimeout {
			t.Errorf("%s = %s, want %s", name, d, rconn.DefaultTimeout)
		}
	}
	if o.MaxRetries != 0 || o.DialerRetries != 1 || !o.ContextTimeoutEnabled {
		t.Errorf("MaxRetries %d, DialerRetries %d, ContextTimeoutEnabled %v; want 0 (after -1), 1, true",
			o.MaxRetries, o.DialerRetries, o.ContextTimeoutEnabled)
	}
}

func TestMetricsShareARegistry(t *testing.T) {
	reg := prometheus.NewPedanticRegistry()
	for range 2 {
		c, err := rconn.Dial(rconn.Config{Addr: "localhost:6379"}, rconn.Options{Metrics: reg})
		if err != nil {
			t.Fatalf("Dial: %v", err)
		}
		_ = c.Close()
	}
}

func TestRunStopsWithContext(t *testing.T) {
	s := rconntest.Start(t)
	h := dial(t, rconn.Config{Addr: s.Addr()})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- h.Run(ctx) }()
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run (breaker closed) = %v, want nil", err)
	}

	s.Kill()
	for range 3 {
		_, _ = h.ping("ping")
	}
	if h.Available() {
		t.Fatal("breaker closed")
	}
	ctx, cancel = context.WithCancel(context.Background())
	go func() { done <- h.Run(ctx) }()
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run (breaker open) = %v, want nil", err)
	}
}

// Concurrent calls while Redis is paused and resumed: for -race, and to
// check that every call is counted once.
func TestConcurrentCalls(t *testing.T) {
	s := rconntest.Start(t)
	h := dial(t, rconn.Config{Addr: s.Addr(), Timeout: 100 * time.Millisecond})
	h.run(t)
	var ran atomic.Int64
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for range 8 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				case <-time.After(time.Millisecond):
				}
				_ = h.Call(context.Background(), "ping", func(ctx context.Context, r *redis.Client) error {
					ran.Add(1)
					return r.Ping(ctx).Err()
				})
			}
		})
	}
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(15 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("no %s within 15s", what)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	waitFor("successful call", func() bool { return h.metric(t, "keygate_redis_commands_total", "op", "ping", "result", "ok") > 0 })
	s.Pause()
	waitFor("refused call", func() bool {
		return h.metric(t, "keygate_redis_commands_total", "op", "ping", "result", "refused") > 0
	})
	s.Resume()
	h.waitAvailable(t)
	okBefore := h.metric(t, "keygate_redis_commands_total", "op", "ping", "result", "ok")
	waitFor("successful call after Resume", func() bool {
		return h.metric(t, "keygate_redis_commands_total", "op", "ping", "result", "ok") > okBefore
	})
	close(stop)
	wg.Wait()

	if uint64(ran.Load()) != h.Commands() {
		t.Errorf("fn ran %d times, Commands = %d", ran.Load(), h.Commands())
	}
	var total float64
	for _, r := range []string{"ok", "error"} {
		total += h.metric(t, "keygate_redis_commands_total", "op", "ping", "result", r)
	}
	if total != float64(ran.Load()) {
		t.Errorf("ok+error = %v, fn ran %d times", total, ran.Load())
	}
	if got := h.metric(t, "keygate_redis_call_duration_seconds"); got != float64(ran.Load()) {
		t.Errorf("call_duration_seconds count = %v, fn ran %d times", got, ran.Load())
	}
}

func BenchmarkCall(b *testing.B) {
	s := rconntest.Start(b)
	c, err := rconn.Dial(rconn.Config{Addr: s.Addr()}, rconn.Options{Metrics: prometheus.NewRegistry()})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if err := c.Call(ctx, "ping", ping); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkCallRefused is what a Check pays for Redis during an outage.
func BenchmarkCallRefused(b *testing.B) {
	c, err := rconn.Dial(rconn.Config{Addr: rconntest.FreeAddr(), Timeout: 5 * time.Second},
		rconn.Options{Metrics: prometheus.NewRegistry()})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	for range 3 {
		_ = c.Call(ctx, "ping", ping)
	}
	if c.Available() {
		b.Fatal("breaker closed")
	}
	b.ReportAllocs()
	for b.Loop() {
		if err := c.Call(ctx, "ping", ping); !errors.Is(err, rconn.ErrUnavailable) {
			b.Fatal(err)
		}
	}
}
