package rconn

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// Call runs fn with a context bounded by Timeout, unless the breaker is
// open: then it returns ErrUnavailable (wrapped with op) at once, without
// calling fn. op names the call in metrics and logs.
//
// fn's error is returned as it is (redis.Nil included, so err == redis.Nil
// works). What counts toward opening the breaker is an error saying that
// Redis could not serve: a timeout (opens it at once), a connection error
// (refused, reset, closed), or a reply saying Redis cannot serve now
// (LOADING, READONLY, MASTERDOWN, BUSY, MISCONF, OOM, NOAUTH, WRONGPASS,
// max clients...); three in a row open it. A reply in which Redis answered
// (redis.Nil, WRONGTYPE, an error raised by a script) and an error fn makes
// itself count as Redis having answered: a script refusing a lease must not
// trip the breaker. When the caller's ctx is done before fn returns, the
// call counts for nothing: Redis is not to blame.
func (c *Conn) Call(ctx context.Context, op string, fn func(ctx context.Context, r *redis.Client) error) error {
	return c.CallFor(ctx, op, c.timeout, fn)
}

// CallFor is Call with its own time bound, for calls off the Check path
// that may wait longer than a Check can (settling a reservation from the
// access log): a timeout still opens the breaker.
func (c *Conn) CallFor(ctx context.Context, op string, timeout time.Duration, fn func(ctx context.Context, r *redis.Client) error) error {
	om := c.opMetrics(op)
	if c.open.Load() {
		om.refused.Inc()
		return om.refusedErr
	}
	c.calls.Add(1)
	start := c.now()
	client := c.client
	if timeout > c.timeout {
		client = c.view(timeout)
	}
	cctx, cancel := context.WithTimeout(ctx, timeout)
	err := fn(cctx, client)
	expired := errors.Is(cctx.Err(), context.DeadlineExceeded)
	cancel()
	c.m.duration.Observe(c.now().Sub(start).Seconds())
	switch classify(ctx, err, expired) {
	case answered:
		c.failures.Store(0)
		om.ok.Inc()
	case abandoned:
		om.err.Inc()
	case failed:
		om.err.Inc()
		c.fail(op, err, false)
	case timedOut:
		om.err.Inc()
		c.fail(op, err, true)
	}
	return err
}

// view returns the client whose socket deadlines are timeout, sharing the
// connection pool.
func (c *Conn) view(timeout time.Duration) *redis.Client {
	if v, ok := c.views.Load(timeout); ok {
		return v.(*redis.Client)
	}
	v, _ := c.views.LoadOrStore(timeout, c.client.WithTimeout(timeout))
	return v.(*redis.Client)
}

// Available reports whether the breaker is closed: Calls reach Redis.
func (c *Conn) Available() bool { return !c.open.Load() }

// IsUnavailable reports whether err (from Call) means that Redis could not
// serve: the breaker was open, or the call failed in a way that counts
// toward opening it. An answer Redis gave (redis.Nil, a script's error) and
// a cancelled context are not unavailability.
func IsUnavailable(err error) bool {
	if errors.Is(err, ErrUnavailable) {
		return true
	}
	switch classify(context.Background(), err, false) {
	case failed, timedOut:
		return true
	}
	return false
}

type outcome int

const (
	answered  outcome = iota // Redis answered (or fn failed on its own)
	abandoned                // the caller's context ended first
	failed                   // Redis could not serve
	timedOut                 // Redis did not answer within the timeout
)

// classify decides what an error of fn says about Redis. expired tells
// that Call's own deadline passed.
func classify(parent context.Context, err error, expired bool) outcome {
	if err == nil || errors.Is(err, redis.Nil) {
		return answered
	}
	var reply redis.Error
	if errors.As(err, &reply) {
		if unavailableReply(reply.Error()) {
			return failed
		}
		return answered
	}
	if parent.Err() != nil || errors.Is(err, context.Canceled) {
		return abandoned
	}
	if expired || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, redis.ErrPoolTimeout) {
		return timedOut
	}
	var ne net.Error
	if errors.As(err, &ne) {
		if ne.Timeout() {
			return timedOut
		}
		return failed
	}
	var errno syscall.Errno
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, redis.ErrClosed) || errors.Is(err, redis.ErrPoolExhausted) ||
		errors.As(err, &errno) ||
		strings.HasPrefix(err.Error(), "redis: ") { // the client's own errors: protocol, pool, state
		return failed
	}
	return answered
}

// unavailableReplies are the prefixes of the error replies by which Redis
// says it cannot serve now, as opposed to answering the command.
var unavailableReplies = [...]string{
	"LOADING", "READONLY", "MASTERDOWN", "BUSY", "MISCONF", "OOM",
	"NOAUTH", "WRONGPASS", "NOPERM", "CLUSTERDOWN", "TRYAGAIN", "NOREPLICAS",
	"ERR max number of clients reached",
}

func unavailableReply(msg string) bool {
	for _, p := range unavailableReplies {
		if strings.HasPrefix(msg, p) && (len(msg) == len(p) || msg[len(p)] == ' ') {
			return true
		}
	}
	return false
}

// fail records a failed Call and opens the breaker after a timeout or
// failuresToOpen failures in a row.
func (c *Conn) fail(op string, err error, timeout bool) {
	n := c.failures.Add(1)
	if !timeout && n < failuresToOpen {
		return
	}
	if !c.open.CompareAndSwap(false, true) {
		return
	}
	c.openedAt.Store(c.now().UnixNano())
	c.m.open.Set(1)
	c.m.up.Set(0)
	reason := "consecutive failures"
	if timeout {
		reason = "timeout"
	}
	c.log.Warn("redis unavailable: breaker open, Redis calls are refused until a probe succeeds",
		zap.String("op", op), zap.String("reason", reason), zap.Int32("consecutive_failures", n),
		zap.Duration("timeout", c.timeout), zap.Error(err))
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// closeBreaker closes the breaker after a successful probe.
func (c *Conn) closeBreaker() {
	c.failures.Store(0)
	if !c.open.CompareAndSwap(true, false) {
		return
	}
	c.m.open.Set(0)
	c.m.up.Set(1)
	down := time.Duration(c.now().UnixNano() - c.openedAt.Load())
	c.log.Info("redis available again: breaker closed", zap.Duration("unavailable_for", down.Round(time.Millisecond)))
}

// Run probes Redis with PING every 250ms while the breaker is open, and
// closes it on the first answer, until ctx is done; it returns nil then.
// Run it once per Conn: without it an open breaker stays open.
func (c *Conn) Run(ctx context.Context) error {
	for {
		if !c.open.Load() {
			select {
			case <-ctx.Done():
				return nil
			case <-c.wake:
			}
			continue
		}
		t := time.NewTimer(probeEvery)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		if err := c.probe(ctx); err != nil {
			c.log.Debug("redis probe failed", zap.Error(err))
			continue
		}
		c.closeBreaker()
	}
}

// probe sends one PING bounded by the timeout.
func (c *Conn) probe(ctx context.Context) error {
	pctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	if err := c.client.Ping(pctx).Err(); err != nil {
		return fmt.Errorf("ping: %w", err)
	}
	return nil
}
