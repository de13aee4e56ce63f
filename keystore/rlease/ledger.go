package rlease

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/money"
	"github.com/keygate/keygate/keystore/rconn"
)

// Errors returned by Spend, besides keystore.ErrInsufficientBalance and
// keystore.ErrSpendCap.
var (
	// ErrBillingUnavailable is returned when a spend needs Redis, Redis does
	// not answer, and the outage policy does not allow it locally.
	ErrBillingUnavailable = errors.New("billing is temporarily unavailable")
	// ErrClosed is returned by Spend after Close.
	ErrClosed = errors.New("the ledger is closed")

	// errBadPrice is prebuilt so that Spend never allocates.
	errBadPrice = fmt.Errorf("%w: negative or too large price", keystore.ErrInvalid)
)

// OutagePolicy says what Spend does when it needs Redis and Redis does not
// answer.
type OutagePolicy uint8

const (
	// FailClosed refuses the spend with ErrBillingUnavailable (a lease held
	// may still be spent). The default: balances and caps hold exactly.
	FailClosed OutagePolicy = iota
	// AllowLocal allows each key up to LedgerOptions.OutageAllowance per
	// outage beyond its lease, and charges it when Redis is back: a
	// balance may then end below zero, or a key past its cap, by at most
	// the allowance per key and replica.
	AllowLocal
)

func (p OutagePolicy) String() string {
	if p == AllowLocal {
		return "allow_local"
	}
	return "fail_closed"
}

// Tuning of the ledger. The windows are the design's; see the README's
// "Scale-out" for the bounds they give.
const (
	reportEvery = time.Second // a report and a heartbeat per replica
	// idleAfter is how long a lease of a contended account or key (see
	// contendedFor) may sit unused before it is returned: a replica
	// refused because another holds the rest of a balance gets it within
	// about a second.
	idleAfter = time.Second
	// keepIdle is how long a lease of an uncontended account and key may
	// sit unused before it is returned. Keeping it spares a Redis call
	// per Check on keys used every few seconds; it still counts as leased
	// in Redis, so balances and caps hold exactly, and it is spent only
	// within leaseValidFor of Redis's last answer.
	keepIdle = 30 * time.Second
	// contendedFor is how long a contention mark lasts: a lease call that
	// granted less than it wanted, or refused, marks what limited it (the
	// account or the key) contended this long, and every replica's
	// heartbeat learns the marks.
	contendedFor = 2 * time.Second
	liveWindow   = 5 * time.Second  // a replica heard from within this is live
	deadAfter    = 30 * time.Second // a replica silent this long loses its leases
	forgetAfter  = time.Minute      // an empty key state idle this long is dropped
	closeRetry   = 100 * time.Millisecond
	leaseFactor  = 64  // a lease covers this many prices, far from exhaustion
	unsureRounds = 3   // reports that check a key after a lease reply was lost
	maxBatch     = 256 // keys per report call, bounding how long Redis is busy
)

const (
	// leaseValidFor is how long after Redis last heard from this replica it
	// still spends the leases it holds. Well under deadAfter, so that
	// another replica can never reclaim a lease this one still spends, even
	// if the clocks run at somewhat different rates.
	leaseValidFor = 15 * time.Second
)

// LedgerOptions configure a Ledger. The zero value is usable: ReplicaID
// then defaults to the host name and a random suffix.
type LedgerOptions struct {
	// ReplicaID names this replica in Redis: its leases, its report
	// sequence and its heartbeat. Unique per running process.
	ReplicaID string
	// Outage is what Spend does when it needs Redis and Redis is down.
	Outage OutagePolicy
	// OutageAllowance is what each key may spend beyond its lease per
	// outage on this replica, with Outage AllowLocal.
	OutageAllowance money.Micros
	// Journal keeps outage spends until Redis has them; nil: memory only
	// (lost if the replica stops before Redis is back).
	Journal Journal
	// Thresholds are the fractions of a key's spend cap whose crossing
	// raises a key_spend alert; nil means keystore.DefaultAlertThresholds,
	// empty means none.
	Thresholds []float64
	// Alerts, if not nil, is given the alerts that each report round
	// crossed: the key thresholds its charges reached and the accounts
	// they took below their alert level. Redis applies each report once,
	// so across all replicas each crossing reaches one replica's Alerts
	// once. It runs in Run and Close (never in Spend), outside the
	// ledger's locks, and should not block: hand the alerts on.
	Alerts  func([]keystore.Alert)
	Log     *zap.Logger
	Metrics prometheus.Registerer
	// Now is the clock of leases, reports, cap periods and alerts; nil:
	// time.Now. Tests inject theirs.
	Now func() time.Time
}

// conn is what the ledger and the limiter use of an *rconn.Conn.
type conn interface {
	Call(ctx context.Context, op string, fn func(ctx context.Context, r *redis.Client) error) error
	Key(parts ...string) string
}

var _ conn = (*rconn.Conn)(nil)

// Ledger spends money from per-key leases taken from the balances and caps
// in Redis. Spend works in memory while the key's lease covers the price
// and asks Redis (one script call) when it does not; Run reports what was
// spent every second and gives idle leases back. Across every replica the
// balance never goes below zero and no key spends past its cap (with
// FailClosed).
//
// A Ledger is safe for concurrent use; use NewLedger to make one.
type Ledger struct {
	c    conn
	o    LedgerOptions
	log  *zap.Logger
	m    *ledgerMetrics
	now  func() time.Time
	keys *shards[keyState]

	kReplicas, kLease, kReports string // this replica's keys
	kContended                  string // the contention marks
	pAcct, pKey, pLease         string // prefixes for the heartbeat script

	// lastSeen is when (local unix ns) the last call that Redis answered
	// and that heartbeated this replica was sent. Leases are spent only
	// until lastSeen + leaseValidFor.
	lastSeen    atomic.Int64
	live        atomic.Int64  // live replicas at the last answer, at least 1
	down        atomic.Bool   // the last call failed
	outageEpoch atomic.Uint64 // counts outages that ended: resets allowances
	closed      atomic.Bool
	// contended holds the contention marks (acct:{a}, key:{k}) the last
	// heartbeat found: their idle leases go back after idleAfter, the
	// others' after keepIdle.
	contended atomic.Pointer[map[string]struct{}]

	// jmu orders journal Appends (read-locked by Spend, with the spend's
	// effect on its key) before the report that moves and seals them
	// (write-locked).
	jmu sync.RWMutex

	rmu   sync.Mutex // serialises report rounds; guards the fields below
	seq   uint64     // last report sequence number used
	queue []*batch   // built, not yet applied, in order
}

// keyState is one key's local lease and what it spent since the last report.
type keyState struct {
	mu sync.Mutex
	// lease is what this replica may still spend; Redis counts it leased.
	lease money.Micros
	// used was spent from leases: the next report charges it and releases
	// it from the lease.
	used money.Micros
	// extra was spent without a lease (outage allowance, or a lease Redis
	// reclaimed): the next report charges it, releasing nothing.
	extra money.Micros
	// outageUsed is what the current outage's allowance has given; it
	// belongs to outage number outageEpoch.
	outageUsed  money.Micros
	outageEpoch uint64
	lastUse     int64  // unix ns of the last spend
	epoch       uint64 // lease calls started: a report adopts only if none started since it was built
	unsure      int    // reports still to check what Redis holds (a lease reply was lost)
	// contendedUntil (unix ns) is set when this replica's own lease call
	// was short or refused: the key's idle lease goes back after idleAfter
	// until then, before the heartbeat learns the mark.
	contendedUntil int64
	removed        bool // dropped from the map: look the key up again
	// The key's cap and cap period as last spent with: reports roll the
	// key's spend into the current period and check alerts against them.
	cap    money.Micros
	period keystore.Period

	// Immutable. acctMark and keyMark are the members of the contended
	// ZSET that name the key's account and the key.
	id, account, acctKey, keyKey string
	acctMark, keyMark            string
}

// NewLedger returns a Ledger using c. It does not wait for Redis. With a
// Journal, it takes the journal's pending outage spends, to report them
// first.
func NewLedger(c *rconn.Conn, o LedgerOptions) (*Ledger, error) {
	return newLedger(c, o)
}

func newLedger(c conn, o LedgerOptions) (*Ledger, error) {
	if o.OutageAllowance < 0 || o.OutageAllowance > money.Max {
		return nil, fmt.Errorf("%w: outage allowance %d", keystore.ErrInvalid, o.OutageAllowance)
	}
	if o.Outage != FailClosed && o.Outage != AllowLocal {
		return nil, fmt.Errorf("%w: outage policy %d", keystore.ErrInvalid, o.Outage)
	}
	if o.ReplicaID == "" {
		id, err := defaultReplicaID()
		if err != nil {
			return nil, err
		}
		o.ReplicaID = id
	}
	m, err := newLedgerMetrics(o.Metrics)
	if err != nil {
		return nil, err
	}
	l := &Ledger{
		c: c, o: o, m: m, log: o.Log, now: o.Now,
		keys:       newShards[keyState](),
		kReplicas:  c.Key("replicas"),
		kLease:     c.Key("lease", o.ReplicaID),
		kReports:   c.Key("reports", o.ReplicaID),
		kContended: c.Key("contended"),
		pAcct:      c.Key("acct", ""),
		pKey:       c.Key("key", ""),
		pLease:     c.Key("lease", ""),
	}
	if l.log == nil {
		l.log = zap.NewNop()
	}
	l.log = l.log.With(zap.String("replica", o.ReplicaID))
	if l.now == nil {
		l.now = time.Now
	}
	if l.o.Thresholds == nil {
		l.o.Thresholds = keystore.DefaultAlertThresholds
	}
	l.o.Thresholds = slices.Sorted(slices.Values(l.o.Thresholds))
	l.live.Store(1)
	// Sequence numbers grow across restarts under the same ReplicaID: a
	// process starting a millisecond later starts 1000 numbers higher, and
	// makes one report a second. Below 2^53, as the scripts need.
	l.seq = uint64(l.now().UnixMilli()) * 1000
	if o.Journal != nil {
		if err := l.replay(); err != nil {
			return nil, err
		}
	}
	return l, nil
}

// defaultReplicaID returns the host name and a random suffix.
func defaultReplicaID() (string, error) {
	host, err := os.Hostname()
	if err != nil || host == "" {
		host = "keygate"
	}
	var b [4]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("replica id: %w", err)
	}
	return host + "-" + hex.EncodeToString(b[:]), nil
}

// ReplicaID returns the name this replica uses in Redis.
func (l *Ledger) ReplicaID() string { return l.o.ReplicaID }

// LiveReplicas returns the number of live replicas (heartbeat within 5s)
// at Redis's last answer, at least 1: what a Limiter divides a key's limit
// by while Redis is down (LimiterOptions.Live).
func (l *Ledger) LiveReplicas() int64 { return l.live.Load() }

// Spend charges price to key k (its account's balance and its own cap,
// k.SpendCap, 0 meaning none) from the key's local lease, leasing from
// Redis when the lease is short. A price of 0 always passes. Errors:
// keystore.ErrInsufficientBalance, keystore.ErrSpendCap (nothing changes),
// ErrBillingUnavailable (Redis down, the lease short, and the outage policy
// says no), ErrClosed. It does not allocate when the lease covers the
// price.
func (l *Ledger) Spend(k *keystore.Key, price money.Micros) error {
	if price == 0 {
		return nil
	}
	if price < 0 || price > money.Max {
		return errBadPrice
	}
	now := l.now().UnixNano()
	s := l.state(k)
	s.mu.Lock()
	for s.removed {
		s.mu.Unlock()
		s = l.state(k)
		s.mu.Lock()
	}
	if l.closed.Load() {
		s.mu.Unlock()
		return ErrClosed
	}
	// A cap period needs a cap, so CapPeriod is read only for a capped key
	// (a Key built by hand, as other packages' tests do, has none to read).
	s.cap, s.period = k.SpendCap, keystore.PeriodNone
	if k.SpendCap > 0 {
		s.period = k.CapPeriod()
	}
	if s.lease >= price && l.leaseFresh(now) {
		s.lease -= price
		s.used += price
		s.lastUse = now
		s.mu.Unlock()
		return nil
	}
	err := l.spendSlow(s, k, price, now)
	s.mu.Unlock()
	return err
}

// state returns k's state, making it on first use.
func (l *Ledger) state(k *keystore.Key) *keyState {
	if s := l.keys.get(k.ID); s != nil {
		return s
	}
	return l.keys.add(k.ID, l.newState(k.ID, k.Account()))
}

func (l *Ledger) newState(keyID, account string) *keyState {
	return &keyState{id: keyID, account: account, acctKey: l.c.Key("acct", account), keyKey: l.c.Key("key", keyID),
		acctMark: "acct:" + account, keyMark: "key:" + keyID}
}

// periodIndex is the number of the cap period p that holds now, as the
// scripts take it: 0 for PeriodNone, whose spend never rolls.
func periodIndex(p keystore.Period, now time.Time) int64 {
	if p == keystore.PeriodNone {
		return 0
	}
	return int64(p.Index(now))
}

// leaseFresh reports whether leases may be spent at now: Redis heard from
// this replica recently enough that no other replica can have reclaimed
// them.
func (l *Ledger) leaseFresh(now int64) bool {
	return now-l.lastSeen.Load() < int64(leaseValidFor)
}

// spendSlow spends price when the lease does not cover it: it leases what
// is missing, holding s.mu, so that one Check per key and replica asks
// Redis while the others wait for its lease. The caller holds s.mu.
func (l *Ledger) spendSlow(s *keyState, k *keystore.Key, price money.Micros, now int64) error {
	// Twice at most: a lease can shrink when Redis says it holds less for
	// this replica than it thought (after a reclaim), and then once more
	// decides.
	for range 2 {
		var have money.Micros
		if l.leaseFresh(now) {
			have = s.lease
		}
		if have >= price {
			break
		}
		g, held, code, err := l.lease(s, k, price, price-have)
		if err != nil {
			return l.spendOutage(s, k, price, now)
		}
		if code != 0 || g < leaseWant(price) {
			s.contendedUntil = now + int64(contendedFor)
		}
		switch code {
		case refusedBalance:
			l.m.lease.refused.Inc()
			return keystore.ErrInsufficientBalance
		case refusedCap:
			l.m.lease.refused.Inc()
			return keystore.ErrSpendCap
		}
		l.m.lease.granted.Inc()
		s.lease += g
		l.shrink(s, held)
	}
	if s.lease < price || !l.leaseFresh(now) {
		return ErrBillingUnavailable
	}
	s.lease -= price
	s.used += price
	s.lastUse = now
	return nil
}

// Refusals of the lease script.
const (
	refusedBalance = -1
	refusedCap     = -2
)

// leaseWant is the lease asked for far from exhaustion: leaseFactor prices.
func leaseWant(price money.Micros) money.Micros {
	if price > money.Max/leaseFactor {
		return price
	}
	return price * leaseFactor
}

// lease asks Redis for at least need (what the lease lacks for price) and
// at most leaseWant(price), in whole prices, for s. It returns the grant
// and what Redis then holds for this replica and key, or the refusal code.
// The caller holds s.mu.
func (l *Ledger) lease(s *keyState, k *keystore.Key, price, need money.Micros) (g, held money.Micros, code int64, err error) {
	s.epoch++
	now := l.now()
	sent := now.UnixNano()
	keys := []string{s.acctKey, s.keyKey, l.kLease, l.kReplicas, l.kContended}
	var res []int64
	err = l.c.Call(context.Background(), "lease", func(ctx context.Context, r *redis.Client) error {
		var err error
		res, err = leaseScript.Run(ctx, r, keys,
			s.id, int64(need), int64(leaseWant(price)), int64(max(k.SpendCap, 0)), l.o.ReplicaID,
			liveWindow.Milliseconds(), int64(price), periodIndex(s.period, now),
			s.account, contendedFor.Milliseconds()).Int64Slice()
		return err
	})
	if err == nil && len(res) != 3 {
		err = fmt.Errorf("lease script: %d values, want 3", len(res))
	}
	if err != nil {
		// Redis may have granted it all the same: the next reports ask.
		s.unsure = unsureRounds
		l.m.lease.failed.Inc()
		l.markDown(err)
		return 0, 0, 0, err
	}
	l.markUp(sent, res[1])
	if res[0] < 0 {
		return 0, 0, res[0], nil
	}
	return money.Micros(res[0]), money.Micros(res[2]), 0, nil
}

// shrink makes s agree with Redis when Redis holds less for this replica
// than s expects (lease + used): another replica reclaimed the lease while
// this one was cut off. The lease goes first; spends beyond it stay
// charged but release nothing. Redis holding more is left to the report,
// which knows whether a lease call overlapped. The caller holds s.mu.
func (l *Ledger) shrink(s *keyState, held money.Micros) {
	short := s.lease + s.used - held
	if short <= 0 {
		return
	}
	cut := min(s.lease, short)
	s.lease -= cut
	if rest := short - cut; rest > 0 {
		s.used -= rest
		s.extra += rest
	}
	l.log.Warn("redis holds less lease than this replica spent from: it was reclaimed while the replica was cut off",
		zap.String("key_id", s.id), zap.Int64("short_micros", int64(short)))
}

// spendOutage decides a spend that needed Redis while Redis did not
// answer. The caller holds s.mu.
func (l *Ledger) spendOutage(s *keyState, k *keystore.Key, price money.Micros, now int64) error {
	if l.o.Outage != AllowLocal {
		l.m.outageDenied.Inc()
		return ErrBillingUnavailable
	}
	if e := l.outageEpoch.Load(); s.outageEpoch != e {
		s.outageEpoch, s.outageUsed = e, 0
	}
	if price > l.o.OutageAllowance-s.outageUsed {
		l.m.outageDenied.Inc()
		return ErrBillingUnavailable
	}
	if j := l.o.Journal; j != nil {
		l.jmu.RLock()
		defer l.jmu.RUnlock()
		if err := j.Append(OutageSpend{Account: k.Account(), KeyID: k.ID, Price: price}); err != nil {
			l.log.Error("outage journal append; spend refused", zap.String("key_id", k.ID), zap.Error(err))
			l.m.outageDenied.Inc()
			return ErrBillingUnavailable
		}
	}
	s.outageUsed += price
	s.extra += price
	s.lastUse = now
	l.m.outageAllowed.Inc()
	return nil
}

// markUp records that Redis answered a call, sent at sent (local unix ns),
// that heartbeated this replica, and how many replicas are live.
func (l *Ledger) markUp(sent int64, live int64) {
	for {
		old := l.lastSeen.Load()
		if sent <= old || l.lastSeen.CompareAndSwap(old, sent) {
			break
		}
	}
	l.live.Store(max(live, 1))
	if l.down.CompareAndSwap(true, false) {
		l.outageEpoch.Add(1)
		l.log.Info("redis answers again; spends go through leases")
	}
}

// markDown records that a call failed.
func (l *Ledger) markDown(err error) {
	if l.down.CompareAndSwap(false, true) {
		l.log.Warn("redis did not answer; spends beyond leases follow the outage policy",
			zap.Stringer("outage", l.o.Outage), zap.Error(err))
	}
}

// Run heartbeats, reclaims dead replicas' leases, reports spends and
// returns idle leases every second until ctx is done, then returns nil.
// Failures are counted and retried the next second. It does not report on
// the way out: the caller drains the Checks that may still spend, then
// calls Close.
func (l *Ledger) Run(ctx context.Context) error {
	t := time.NewTicker(reportEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			l.tick()
		}
	}
}

// tick is one second of Run. After Close it does nothing: the final report
// took this replica out of the live set.
func (l *Ledger) tick() {
	if l.closed.Load() {
		return
	}
	if err := l.heartbeat(); err != nil {
		l.log.Debug("heartbeat", zap.Error(err))
	}
	if err := l.report(false); err != nil {
		l.log.Debug("report; retrying with the next one", zap.Error(err))
	}
}

// heartbeat marks this replica live, learns how many are and which
// accounts and keys are contended, and reclaims the leases of replicas
// silent for deadAfter.
func (l *Ledger) heartbeat() error {
	sent := l.now().UnixNano()
	var res []any
	err := l.c.Call(context.Background(), "heartbeat", func(ctx context.Context, r *redis.Client) error {
		var err error
		res, err = heartbeatScript.Run(ctx, r, []string{l.kReplicas, l.kContended},
			l.o.ReplicaID, l.pAcct, l.pKey, l.pLease, liveWindow.Milliseconds(), deadAfter.Milliseconds()).Slice()
		return err
	})
	var live, reclaimed int64
	var marks map[string]struct{}
	if err == nil {
		live, reclaimed, marks, err = parseHeartbeat(res)
	}
	if err != nil {
		l.markDown(err)
		return err
	}
	l.markUp(sent, live)
	l.contended.Store(&marks)
	if reclaimed > 0 {
		l.log.Info("reclaimed the leases of replicas silent for 30s", zap.Int64("replicas", reclaimed))
	}
	return nil
}

// parseHeartbeat reads heartbeatScript's reply.
func parseHeartbeat(res []any) (live, reclaimed int64, marks map[string]struct{}, err error) {
	if len(res) < 2 {
		return 0, 0, nil, fmt.Errorf("heartbeat script: %d values, want at least 2", len(res))
	}
	live, ok1 := res[0].(int64)
	reclaimed, ok2 := res[1].(int64)
	if !ok1 || !ok2 {
		return 0, 0, nil, fmt.Errorf("heartbeat script: values %T %T, want integers", res[0], res[1])
	}
	marks, err = markSet(res[2:])
	return live, reclaimed, marks, err
}

// markSet makes a set of the contention marks in res.
func markSet(res []any) (map[string]struct{}, error) {
	if len(res) == 0 {
		return nil, nil
	}
	marks := make(map[string]struct{}, len(res))
	for _, v := range res {
		m, ok := v.(string)
		if !ok {
			return nil, fmt.Errorf("contention mark %T, want a string", v)
		}
		marks[m] = struct{}{}
	}
	return marks, nil
}

// isContended reports whether s's account or key was marked contended at
// the last heartbeat, or by this replica's own lease call until recently.
// The caller holds s.mu.
func (l *Ledger) isContended(s *keyState, now int64) bool {
	if now < s.contendedUntil {
		return true
	}
	p := l.contended.Load()
	if p == nil || len(*p) == 0 {
		return false
	}
	_, a := (*p)[s.acctMark]
	_, k := (*p)[s.keyMark]
	return a || k
}

// Close stops spending (Spend returns ErrClosed), reports what was spent
// and returns every lease, retrying until ctx is done. The caller drains
// the Checks first.
func (l *Ledger) Close(ctx context.Context) error {
	l.closed.Store(true)
	for {
		err := l.report(true)
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			if l.o.Journal != nil && l.unkept() == 0 {
				// Nothing is lost: the journal has every charge, and the
				// next start on this file reports it. The leases come back
				// when Redis counts this replica dead.
				l.log.Warn("redis did not take the last report; what this replica spent is kept in its --db file and reported at its next start",
					zap.Error(err))
				return nil
			}
			return fmt.Errorf("final report: %w", err)
		case <-time.After(closeRetry):
		}
	}
}
