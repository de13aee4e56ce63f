package rlease

import (
	"context"
	"errors"
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
	// key's N (and at least one token).
	leasePercent = 5
	// returnAfter is how long a token lease of a contended key (one whose
	// bucket could not grant a full lease, to any replica, within
	// contendedFor) is kept before what is left of it goes back to Redis;
	// with returnEvery and pollEvery it bounds how long a token can sit
	// unused on one replica while another is refused: about a second.
	returnAfter = 750 * time.Millisecond
	returnEvery = 250 * time.Millisecond
	// pollEvery is how often a replica holding or having spent tokens
	// reports to Redis: what it spent moves from held into the key's
	// bucket, and the same call returns the contention marks.
	pollEvery = time.Second
	// A token lease of an uncontended key is kept until the key has been
	// unused for keepIdle (the Ledger's), so that a key used every few
	// seconds does not cost a Redis call per Check. Held tokens count
	// against the bucket in Redis however long they are kept, so keeping
	// them never lets more through.
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
	// ReplicaID names this replica in Redis: the tokens it holds are
	// counted under it, and its heartbeat keeps them counted. Unique per
	// running process; empty: a random one.
	ReplicaID string
	// Live, when set, returns the number of live replicas (for instance
	// Ledger.LiveReplicas, which heartbeats every second); nil: the count
	// learned from the last token lease.
	Live    func() int64
	Log     *zap.Logger
	Metrics prometheus.Registerer
	Now     func() time.Time // Run's clock; Allow takes its own. nil: time.Now
}

// Limiter enforces each key's rate limit across replicas. The key's token
// bucket is a GCRA in Redis (P rl:{key}, its theoretical arrival time),
// and each replica leases a few tokens at a time from it and spends them
// locally. Tokens leased are held, not spent: Redis counts each replica's
// held tokens (P rlh:{key}) against the bucket until the replica reports
// them spent, which moves them into the arrival time (as if spent at the
// report, a little later than they were: the safe side), or returns them.
// A held token therefore never refills, however long it is kept, and
// across all replicas a key gets at most what one exact bucket gives.
//
// While Redis does not answer, the tokens held are spent for up to
// leaseValidFor after its last answer, then each replica enforces its
// share, N / live replicas, locally.
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
	kSeq      string
	live      atomic.Int64 // live replicas at the last answer, at least 1
	// lastOK is when Redis last answered this limiter (unix ns): held
	// tokens are spent only within leaseValidFor of it, so that they are
	// never spent after Redis could have reclaimed them from a replica it
	// thought dead.
	lastOK atomic.Int64
	// contended holds the rl:{key} contention marks the last report found,
	// and lastPoll (unix ns, Run's clock) when it was made.
	contended atomic.Pointer[map[string]struct{}]
	lastPoll  atomic.Int64

	rmu   sync.Mutex   // one report round at a time
	seq   uint64       // the last report's sequence number; guarded by rmu
	queue []*rateBatch // reports built, not yet applied; guarded by rmu
}

// bucket is one key's token lease.
type bucket struct {
	mu     sync.Mutex
	rate   ratelimit.Rate // the rate tokens and tat are for
	t      int64          // emission interval of rate (ns per token)
	tokens int64          // held here, not yet spent
	// used counts the tokens spent since the last report, and giveBack
	// those to return with the next one: both are still held in Redis.
	used, giveBack int64
	leasedAt       int64 // unix ns of the lease tokens came from
	lastUse        int64 // unix ns of the last Allow
	// tat is the bucket's theoretical arrival time known at the last
	// lease, the tokens every replica held then counted as spent (unix
	// ns): the source of Remaining and Reset.
	tat int64
	// A refusal from Redis is remembered until refusedUntil, so a refused
	// key does not cost a call per Check; retryAt is when Redis said one
	// token would be free.
	refusedUntil, retryAt int64
	// contendedUntil (unix ns) is set when a lease here was short: the key
	// is contended, so its tokens go back after returnAfter until then.
	contendedUntil int64
	// epoch counts the lease calls made: a report's view of what Redis
	// holds is applied only when none started since the report was built.
	epoch uint64
	// unsure counts the reports still to check this key against Redis
	// after a lease call whose reply was lost (Redis may have granted).
	unsure  int
	removed bool

	key, rlKey, heldKey, mark string // immutable; mark is the key's contention mark
}

// NewLimiter returns a Limiter using c. It does not wait for Redis.
func NewLimiter(c *rconn.Conn, o LimiterOptions) *Limiter {
	return newLimiter(c, o)
}

func newLimiter(c conn, o LimiterOptions) *Limiter {
	if o.ReplicaID == "" {
		if id, err := defaultReplicaID(); err == nil {
			o.ReplicaID = id
		} else {
			o.ReplicaID = "keygate-limiter"
		}
	}
	l := &Limiter{
		c: c, o: o, log: o.Log, now: o.Now,
		buckets:   newShards[bucket](),
		local:     ratelimit.NewLimiter(),
		kReplicas: c.Key("replicas"),
		kContend:  c.Key("contended"),
		kSeq:      c.Key("rlseq", o.ReplicaID),
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
		// New key, or its limit changed: the tokens held under the old
		// rate go back, and the local view restarts.
		b.giveBack += b.tokens
		b.rate, b.t, b.tokens, b.tat, b.refusedUntil, b.retryAt = r, t, 0, 0, 0, 0
	}
	b.lastUse = ns
	if b.tokens > 0 {
		if ns-l.lastOK.Load() < int64(leaseValidFor) {
			b.tokens--
			b.used++
			return b.allowed(ns, n)
		}
		// Redis has been silent too long: it may count these tokens as a
		// dead replica's and have given them to others. They go back.
		b.giveBack += b.tokens
		b.tokens = 0
	}
	if ns < b.refusedUntil {
		return b.refused(ns)
	}
	want := leaseSize(n)
	b.epoch++
	g, ahead, err := l.lease(b, ns, n, want)
	if err != nil {
		if !errors.Is(err, rconn.ErrUnavailable) {
			// Sent, perhaps granted, its reply lost: the next reports ask
			// Redis what this replica holds for the key.
			b.unsure = unsureRounds
		}
		// Redis down: this replica's share, from the local buckets.
		share := ratelimit.Rate{N: max(n/l.liveReplicas(), 1), Per: r.Per}
		d := l.local.Allow(key, share, now)
		d.Limit = r.N
		return d
	}
	if g < want {
		b.contendedUntil = ns + int64(contendedFor)
	}
	b.tat = ns + ahead
	if g == 0 {
		b.retryAt = ns + max(ahead-(n-1)*t, 1)
		b.refusedUntil = min(b.retryAt, ns+int64(maxRefusalWait))
		return b.refused(ns)
	}
	b.tokens = g - 1
	b.used++
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
	return l.buckets.add(key, &bucket{
		key: key, rlKey: l.c.Key("rl", key), heldKey: l.c.Key("rlh", key), mark: "rl:" + key,
	})
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
// the tokens granted and the bucket's tat − ns counting every replica's
// held tokens as spent, after the grant (or, when none was granted, as it
// stands). The caller holds b.mu.
func (l *Limiter) lease(b *bucket, ns, n, want int64) (g, ahead int64, err error) {
	var res []int64
	keys := []string{b.rlKey, l.kReplicas, l.kContend, b.heldKey}
	err = l.c.Call(context.Background(), "rate_lease", func(ctx context.Context, r *redis.Client) error {
		var err error
		res, err = rateScript.Run(ctx, r, keys,
			strconv.FormatInt(ns, 10), b.t, n, want, l.o.ReplicaID, liveWindow.Milliseconds(),
			b.key, contendedFor.Milliseconds(), deadAfter.Milliseconds()).Int64Slice()
		return err
	})
	if err == nil && len(res) != 3 {
		err = fmt.Errorf("rate script: %d values, want 3", len(res))
	}
	if err != nil {
		l.m.failed.Inc()
		return 0, 0, err
	}
	l.lastOK.Store(ns)
	l.live.Store(max(res[2], 1))
	if res[0] == 0 {
		l.m.refused.Inc()
	} else {
		l.m.granted.Inc()
	}
	return res[0], res[1], nil
}

// Run reports every returnEvery until ctx is done, then returns nil: the
// tokens spent, and the unused tokens of contended keys' leases older
// than returnAfter and of keys unused for keepIdle. It does not return
// the tokens still held: Close does.
func (l *Limiter) Run(ctx context.Context) error {
	t := time.NewTicker(returnEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			if err := l.report(l.now(), false); err != nil {
				l.log.Debug("rate report", zap.Error(err))
			}
		}
	}
}

// Close reports what was spent and returns every token held, retrying
// until ctx is done. Allow may still be called: what it leases after
// Close stays held until Redis counts this replica dead.
func (l *Limiter) Close(ctx context.Context) error {
	for {
		err := l.report(l.now(), true)
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("rate limiter: last report: %w", err)
		case <-time.After(closeRetry):
		}
	}
}

// rateBatch is one report: one rateReportScript call with one sequence
// number, sent as is until Redis answers, so that a retry after a lost
// reply is applied once.
type rateBatch struct {
	seq     uint64
	entries []rateEntry
}

// rateEntry is one key's line of a report.
type rateEntry struct {
	b              *bucket
	used, returned int64  // tokens spent, and given back unspent
	t              int64  // the emission interval used is spent at
	epoch          uint64 // b.epoch when built
}

// report sends the queued reports, then one for what the buckets spent
// and what they give back at now (every token held when final). It
// reports at least every pollEvery while tokens are held, to learn which
// keys are contended, and gives back at once what the marks make
// returnable. A report Redis did not answer stays queued and goes first,
// unchanged, next time; no other is built before it is applied.
func (l *Limiter) report(now time.Time, final bool) error {
	l.rmu.Lock()
	defer l.rmu.Unlock()
	ns := now.UnixNano()
	if err := l.drain(ns); err != nil {
		return err
	}
	l.local.Sweep(now)
	entries, held := l.collect(ns, l.contended.Load(), final)
	if len(entries) == 0 && !final && (!held || ns-l.lastPoll.Load() < int64(pollEvery)) {
		return nil
	}
	l.enqueue(entries)
	if err := l.drain(ns); err != nil {
		return err
	}
	marks := l.contended.Load()
	if final || marks == nil || len(*marks) == 0 {
		return nil
	}
	if entries, _ = l.collect(ns, marks, false); len(entries) == 0 {
		return nil
	}
	l.enqueue(entries)
	return l.drain(ns)
}

// enqueue queues reports of entries, maxBatch keys each (bounding how long
// one script holds Redis), each under the next sequence number; at least
// one, which polls the contention marks. The caller holds rmu.
func (l *Limiter) enqueue(entries []rateEntry) {
	for {
		n := min(len(entries), maxBatch)
		l.seq++
		l.queue = append(l.queue, &rateBatch{seq: l.seq, entries: entries[:n:n]})
		if entries = entries[n:]; len(entries) == 0 {
			return
		}
	}
}

// drain sends the queued reports in order, stopping at the first failure.
// The caller holds rmu.
func (l *Limiter) drain(ns int64) error {
	for len(l.queue) > 0 {
		if err := l.send(l.queue[0], ns); err != nil {
			return err
		}
		l.queue[0] = nil
		l.queue = l.queue[1:]
	}
	return nil
}

// collect takes out of the buckets what a report at ns carries: the
// tokens spent, and those to give back (contended keys' leases taken at
// least returnAfter before, keys unused for keepIdle, all when final). It
// returns the entries and whether any bucket still holds tokens, and
// drops buckets idle for forgetBucketAfter.
func (l *Limiter) collect(ns int64, marks *map[string]struct{}, final bool) (entries []rateEntry, held bool) {
	for _, b := range l.buckets.all() {
		b.mu.Lock()
		contended := ns < b.contendedUntil
		if !contended && marks != nil {
			_, contended = (*marks)[b.mark]
		}
		unused := ns-b.lastUse >= int64(keepIdle)
		if b.tokens > 0 {
			if final || unused || contended && ns-b.leasedAt >= int64(returnAfter) {
				b.giveBack += b.tokens
				b.tokens = 0
			} else {
				held = true
			}
		}
		// Spent tokens stay held in Redis until reported, which costs Redis
		// work per key: they are reported when the room they take may be
		// needed (the key is contended), when a lease's worth has piled up,
		// or with the lease's return. So a replica holds at most about two
		// leases of a key, and a key far from its limit costs no report.
		var lease int64 = 1
		if b.rate.N > 0 {
			n, _ := params(b.rate)
			lease = leaseSize(n)
		}
		reported := b.unsure > 0 || b.giveBack > 0 ||
			b.used > 0 && (final || contended || unused || b.used >= lease)
		if reported {
			entries = append(entries, rateEntry{b: b, used: b.used, returned: b.giveBack, t: b.t, epoch: b.epoch})
			b.used, b.giveBack = 0, 0
		}
		idle := !reported && b.tokens == 0 && b.used == 0 && ns-b.lastUse >= int64(forgetBucketAfter)
		b.mu.Unlock()
		if idle {
			l.buckets.removeIf(b.key, b, func(b *bucket) bool {
				b.mu.Lock()
				defer b.mu.Unlock()
				if b.tokens != 0 || b.used != 0 || b.giveBack != 0 || b.unsure != 0 ||
					ns-b.lastUse < int64(forgetBucketAfter) {
					return false
				}
				b.removed = true
				return true
			})
		}
	}
	return entries, held
}

// send applies report rb in Redis, then makes each bucket agree with what
// Redis says this replica holds for its key, and keeps the contention
// marks Redis returned. The caller holds rmu.
func (l *Limiter) send(rb *rateBatch, ns int64) error {
	keys := make([]string, 0, 3+2*len(rb.entries))
	keys = append(keys, l.kSeq, l.kReplicas, l.kContend)
	args := make([]any, 0, 4+3*len(rb.entries))
	args = append(args, rb.seq, strconv.FormatInt(ns, 10), l.o.ReplicaID, int64(time.Hour/time.Second))
	for _, e := range rb.entries {
		keys = append(keys, e.b.rlKey, e.b.heldKey)
		args = append(args, e.used, e.returned, e.t)
	}
	var res []any
	err := l.c.Call(context.Background(), "rate_report", func(ctx context.Context, r *redis.Client) error {
		var err error
		res, err = rateReportScript.Run(ctx, r, keys, args...).Slice()
		return err
	})
	if err == nil && len(res) < len(rb.entries) {
		err = fmt.Errorf("rate report script: %d values, want at least %d", len(res), len(rb.entries))
	}
	if err != nil {
		return fmt.Errorf("rate report %d: %w", rb.seq, err)
	}
	l.lastOK.Store(ns)
	for i, e := range rb.entries {
		held, ok := res[i].(int64)
		if !ok {
			return fmt.Errorf("rate report %d: value %d is %T, want an integer", rb.seq, i, res[i])
		}
		l.reconcile(e, held)
	}
	marks, err := markSet(res[len(rb.entries):])
	if err != nil {
		return err
	}
	l.lastPoll.Store(ns)
	l.contended.Store(&marks)
	return nil
}

// reconcile makes e's bucket agree with held, what Redis holds for this
// replica and the key after the report, when no lease call started since
// the report was built. Redis holding more is a lease whose reply was
// lost: adopted. Redis holding less is a reclaim (Redis counted this
// replica dead): the tokens it no longer counts are dropped.
func (l *Limiter) reconcile(e rateEntry, held int64) {
	b := e.b
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.epoch != e.epoch {
		return
	}
	if b.unsure > 0 {
		b.unsure--
	}
	here := b.tokens + b.used + b.giveBack
	switch {
	case held > here:
		b.tokens += held - here
		l.log.Info("adopted rate tokens whose lease reply was lost", zap.String("key", b.key), zap.Int64("tokens", held-here))
	case held < here:
		b.tokens = max(b.tokens-(here-held), 0)
	}
}
