package rlease

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/keygate/keygate/authz/ratelimit"
	"github.com/keygate/keygate/keystore/metric"
	"github.com/keygate/keygate/keystore/rconn"
)

// Tuning of the limiter.
const (
	// leasePercent bounds a token lease: at most this percentage of the
	// key's N (and at least one token), so that across R replicas at most
	// N + (R−1)·lease requests pass in a window.
	leasePercent = 5
	// returnAfter is how long a token lease of a contended key (one whose
	// bucket could not grant a full lease, to any replica, within
	// contendedFor) is kept before what is left of it goes back to Redis;
	// with returnEvery and pollEvery it bounds how long a token can sit
	// unused on one replica while another is refused: about a second.
	returnAfter = 750 * time.Millisecond
	returnEvery = 250 * time.Millisecond
	// pollEvery is how often a replica holding tokens asks Redis which
	// keys are contended (one call, which returns tokens too).
	pollEvery = time.Second
	// A token lease of an uncontended key is kept until the key has been
	// unused for keepIdle (the Ledger's), so that a key used every few
	// seconds does not cost a Redis call per Check.
	// maxRefusalWait bounds how long a refusal is remembered locally, so a
	// refused key does not cost Redis a call per Check, yet sees tokens that
	// other replicas return.
	maxRefusalWait = time.Second
	// maxRatePer bounds a Rate's period in Redis mode, so that a whole
	// bucket (N·T nanoseconds) is exact in the scripts' doubles.
	maxRatePer = 100 * 24 * time.Hour
	// forgetBucketAfter drops the local state of keys idle this long.
	forgetBucketAfter = time.Minute
)

// LimiterOptions configure a Limiter. The zero value is usable.
type LimiterOptions struct {
	// ReplicaID, when set, heartbeats this replica in Redis with every
	// token lease (the Ledger's heartbeat does it too).
	ReplicaID string
	// Live, when set, returns the number of live replicas (for instance
	// Ledger.LiveReplicas, which heartbeats every second); nil: the count
	// learned from the last token lease.
	Live    func() int64
	Log     *zap.Logger
	Metrics prometheus.Registerer
	Now     func() time.Time // Run's clock; Allow takes its own. nil: time.Now
}

// Limiter enforces each key's rate limit across replicas: the key's token
// bucket is a GCRA in Redis (P rl:{key}), and each replica leases a few
// tokens at a time from it and spends them locally. While Redis does not
// answer, each replica enforces its share, N / live replicas, locally.
//
// A Limiter is safe for concurrent use; use NewLimiter to make one.
type Limiter struct {
	c         conn
	o         LimiterOptions
	log       *zap.Logger
	m         leaseMetrics
	now       func() time.Time
	buckets   *shards[bucket]
	local     *ratelimit.Limiter // the outage fallback
	kReplicas string
	kContend  string
	live      atomic.Int64 // live replicas at the last answer, at least 1
	// contended holds the rl:{key} contention marks the last return call
	// found, and lastPoll (unix ns, Run's clock) when it was made.
	contended atomic.Pointer[map[string]struct{}]
	lastPoll  atomic.Int64
}

// bucket is one key's token lease.
type bucket struct {
	mu       sync.Mutex
	rate     ratelimit.Rate // the rate tokens and tat are for
	t        int64          // emission interval of rate (ns per token)
	tokens   int64          // leased, not yet spent
	leasedAt int64          // unix ns of the lease tokens came from
	lastUse  int64          // unix ns of the last Allow
	// tat is the global theoretical arrival time known at the last lease
	// (unix ns): the source of Remaining and Reset.
	tat int64
	// A refusal from Redis is remembered until refusedUntil, so a refused
	// key does not cost a call per Check; retryAt is when Redis said one
	// token would be free.
	refusedUntil, retryAt int64
	// contendedUntil (unix ns) is set when a lease here was short: the key
	// is contended, so its tokens go back after returnAfter until then.
	contendedUntil int64
	removed        bool

	key, rlKey, mark string // immutable; mark is the key's contention mark
}

// NewLimiter returns a Limiter using c. It does not wait for Redis.
func NewLimiter(c *rconn.Conn, o LimiterOptions) *Limiter {
	return newLimiter(c, o)
}

func newLimiter(c conn, o LimiterOptions) *Limiter {
	l := &Limiter{
		c: c, o: o, log: o.Log, now: o.Now,
		buckets:   newShards[bucket](),
		local:     ratelimit.NewLimiter(),
		kReplicas: c.Key("replicas"),
		kContend:  c.Key("contended"),
	}
	if l.log == nil {
		l.log = zap.NewNop()
	}
	if l.now == nil {
		l.now = time.Now
	}
	l.live.Store(1)
	requests, err := metric.Register(o.Metrics, newLeaseRequests())
	if err != nil {
		l.log.Error("rate lease metrics not registered", zap.Error(err))
		requests = newLeaseRequests()
	}
	l.m = leaseMetricsFor(requests, "rate")
	return l
}

// params returns the N and emission interval T of r as ratelimit.Limiter
// computes them, with the period bounded by maxRatePer. r.N must be > 0.
func params(r ratelimit.Rate) (n, t int64) {
	n = min(r.N, 1_000_000_000)
	t = max(int64(min(max(r.Per, 0), maxRatePer))/n, 1)
	return n, t
}

// leaseSize is the most tokens a replica leases at once for a limit of n.
func leaseSize(n int64) int64 { return max(n*leasePercent/100, 1) }

// Allow takes one request from key's bucket under rate r at now, from the
// local token lease when it has one, else from Redis (one script call,
// which leases up to 5% of N). A zero Rate always allows. It does not
// allocate when the lease covers the request.
func (l *Limiter) Allow(key string, r ratelimit.Rate, now time.Time) ratelimit.Decision {
	if r.N <= 0 {
		return ratelimit.Decision{OK: true}
	}
	n, t := params(r)
	ns := now.UnixNano()
	b := l.bucket(key)
	b.mu.Lock()
	for b.removed {
		b.mu.Unlock()
		b = l.bucket(key)
		b.mu.Lock()
	}
	defer b.mu.Unlock()
	if b.rate != r {
		// New key, or its limit changed: tokens leased under the old rate
		// stay spent in Redis (the safe side) and the local view restarts.
		b.rate, b.t, b.tokens, b.tat, b.refusedUntil, b.retryAt = r, t, 0, 0, 0, 0
	}
	b.lastUse = ns
	if b.tokens > 0 {
		b.tokens--
		return b.allowed(ns, n)
	}
	if ns < b.refusedUntil {
		return b.refused(ns)
	}
	want := leaseSize(n)
	g, ahead, err := l.lease(b, ns, n, want)
	if err != nil {
		// Redis down: this replica's share, from the local buckets.
		share := ratelimit.Rate{N: max(n/l.liveReplicas(), 1), Per: r.Per}
		d := l.local.Allow(key, share, now)
		d.Limit = r.N
		return d
	}
	if g < want {
		b.contendedUntil = ns + int64(contendedFor)
	}
	if g == 0 {
		b.tat = ns + ahead
		b.retryAt = ns + max(ahead-(n-1)*t, 1)
		b.refusedUntil = min(b.retryAt, ns+int64(maxRefusalWait))
		return b.refused(ns)
	}
	b.tat = ns + ahead
	b.tokens = g - 1
	b.leasedAt = ns
	b.refusedUntil = 0
	return b.allowed(ns, n)
}

// liveReplicas returns the number of live replicas, at least 1.
func (l *Limiter) liveReplicas() int64 {
	if l.o.Live != nil {
		return max(l.o.Live(), 1)
	}
	return l.live.Load()
}

// bucket returns key's bucket, making it on first use.
func (l *Limiter) bucket(key string) *bucket {
	if b := l.buckets.get(key); b != nil {
		return b
	}
	return l.buckets.add(key, &bucket{key: key, rlKey: l.c.Key("rl", key), mark: "rl:" + key})
}

// allowed is the Decision for an allowed request: Remaining counts the
// tokens leased here and those Redis had left at the last lease, refilled
// since.
func (b *bucket) allowed(ns, n int64) ratelimit.Decision {
	ahead := max(b.tat-ns, 0)
	remaining := min(b.tokens+(n*b.t-ahead)/b.t, n)
	return ratelimit.Decision{OK: true, Limit: b.rate.N, Remaining: max(remaining, 0), Reset: time.Duration(ahead)}
}

// refused is the Decision for a refused request.
func (b *bucket) refused(ns int64) ratelimit.Decision {
	return ratelimit.Decision{
		Limit:      b.rate.N,
		Reset:      time.Duration(max(b.tat-ns, 0)),
		RetryAfter: time.Duration(max(b.retryAt-ns, 1)),
	}
}

// lease asks Redis for up to want tokens of b's bucket at ns. It returns
// the tokens granted and the bucket's tat − ns after the grant (or, when
// none was granted, as it stands). The caller holds b.mu.
func (l *Limiter) lease(b *bucket, ns, n, want int64) (g, ahead int64, err error) {
	var res []int64
	keys := []string{b.rlKey, l.kReplicas, l.kContend}
	err = l.c.Call(context.Background(), "rate_lease", func(ctx context.Context, r *redis.Client) error {
		var err error
		res, err = rateScript.Run(ctx, r, keys,
			strconv.FormatInt(ns, 10), b.t, n, want, l.o.ReplicaID, liveWindow.Milliseconds(),
			b.key, contendedFor.Milliseconds()).Int64Slice()
		return err
	})
	if err == nil && len(res) != 3 {
		err = fmt.Errorf("rate script: %d values, want 3", len(res))
	}
	if err != nil {
		l.m.failed.Inc()
		return 0, 0, err
	}
	l.live.Store(max(res[2], 1))
	if res[0] == 0 {
		l.m.refused.Inc()
	} else {
		l.m.granted.Inc()
	}
	return res[0], res[1], nil
}

// Run returns the unused tokens of contended keys' leases older than
// returnAfter, and of keys unused for keepIdle, every returnEvery, until
// ctx is done; then it returns nil.
func (l *Limiter) Run(ctx context.Context) error {
	t := time.NewTicker(returnEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			if err := l.returnUnused(l.now()); err != nil {
				l.log.Debug("token return", zap.Error(err))
			}
		}
	}
}

// returnUnused gives back the tokens of contended keys' leases taken at
// least returnAfter before now and of keys unused for keepIdle, and
// forgets keys idle for a minute. While it holds tokens it asks Redis,
// every pollEvery, which keys are contended (the same call), and gives
// back at once what that makes returnable. Tokens whose return fails stay
// spent in Redis: the safe side.
func (l *Limiter) returnUnused(now time.Time) error {
	ns := now.UnixNano()
	keys, args, held := l.returnable(ns, l.contended.Load())
	l.local.Sweep(now)
	if len(keys) == 1 && (!held || ns-l.lastPoll.Load() < int64(pollEvery)) {
		return nil
	}
	marks, err := l.giveBack(keys, args)
	if err != nil {
		return err
	}
	l.lastPoll.Store(ns)
	l.contended.Store(&marks)
	if len(marks) == 0 {
		return nil
	}
	if keys, args, _ = l.returnable(ns, &marks); len(keys) == 1 {
		return nil
	}
	_, err = l.giveBack(keys, args)
	return err
}

// returnable takes the tokens to give back at ns out of the buckets and
// returns rateReturnScript's keys (the contended ZSET first) and
// arguments for them, and whether any bucket still holds tokens. It drops
// buckets idle for forgetBucketAfter.
func (l *Limiter) returnable(ns int64, marks *map[string]struct{}) (keys []string, args []any, held bool) {
	keys = []string{l.kContend}
	args = []any{strconv.FormatInt(ns, 10)}
	for _, b := range l.buckets.all() {
		b.mu.Lock()
		if b.tokens > 0 {
			contended := ns < b.contendedUntil
			if !contended && marks != nil {
				_, contended = (*marks)[b.mark]
			}
			if ns-b.lastUse >= int64(keepIdle) || contended && ns-b.leasedAt >= int64(returnAfter) {
				keys = append(keys, b.rlKey)
				args = append(args, b.tokens*b.t)
				b.tokens = 0
			} else {
				held = true
			}
		}
		idle := b.tokens == 0 && ns-b.lastUse >= int64(forgetBucketAfter)
		b.mu.Unlock()
		if idle {
			l.buckets.removeIf(b.key, b, func(b *bucket) bool {
				b.mu.Lock()
				defer b.mu.Unlock()
				if b.tokens != 0 || ns-b.lastUse < int64(forgetBucketAfter) {
					return false
				}
				b.removed = true
				return true
			})
		}
	}
	return keys, args, held
}

// giveBack runs rateReturnScript and returns the contention marks.
func (l *Limiter) giveBack(keys []string, args []any) (map[string]struct{}, error) {
	var res []any
	err := l.c.Call(context.Background(), "rate_return", func(ctx context.Context, r *redis.Client) error {
		var err error
		res, err = rateReturnScript.Run(ctx, r, keys, args...).Slice()
		return err
	})
	if err != nil {
		return nil, err
	}
	return markSet(res)
}
