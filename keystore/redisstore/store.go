// Package redisstore is keygate's store in store: redis mode: accounts and
// keys live in Redis, shared by every replica, and each replica mirrors the
// key records into its own *keystore.Store (its --db file), so that the
// hot path's Lookup never waits on Redis and keeps working while Redis is
// down, across a restart too.
//
// Redis holds, under the deployment's prefix P:
//
//	P acct:{id}      HASH tier, created_at (unix nanos), alert_below, bal, leased, reserved
//	P key:{id}       HASH rec (keystore.KeyRecord's encoding), account, spent, period, leased, reserved
//	P accounts       SET of account IDs
//	P keys           SET of key IDs
//	P acctkeys:{id}  SET of the account's key IDs (keys get --account)
//	P version        INCR'd by every change of an account or key record
//	P changes        STREAM, one entry per change: kind (acct|key), id, v (the version), by
//	P marker         the data-loss marker (package rconn)
//	P res:{request}  HASH an open reservation (settle: on_response; see settle.go)
//	P resdue         ZSET request IDs of open reservations by deadline (unix ms)
//
// Admin commands write to Redis first, in one Lua script each, then mirror
// what they wrote before returning: the replica that served a command
// reflects it at once, and the others within a second through Run, which
// follows the change stream. Reads (Account, Key and the lists) come from
// Redis, with the balance and spend that rlease keeps there.
//
// Balances, spend and leases belong to package rlease: this package
// creates an account's opening balance and adds credits, and keeps the
// reservations of settle: on_response (Reserve, Settle and their expiry),
// whose charges it applies and whose alerts it detects.
package redisstore

import (
	"context"
	"errors"
	"fmt"
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

// Errors of the Check path.
var (
	// ErrDataLost is returned by Debit, and by admin writes, once Redis was
	// found to have lost keygate's data (its marker is gone, or is another
	// one): balances there would be fresh, so nothing is spent or written
	// until an operator recovers.
	ErrDataLost = rconn.ErrDataLost
	// ErrNoLedger is returned by Debit when Options.Ledger is nil.
	ErrNoLedger = errors.New("redisstore: no ledger to spend with")
)

// Spender charges a price to a key in Redis: rlease.Ledger.
type Spender interface {
	Spend(k *keystore.Key, price money.Micros) error
}

// Options configures Open. The zero value is usable, but Debit needs a
// Ledger.
type Options struct {
	Log     *zap.Logger           // nil: no logs
	Metrics prometheus.Registerer // nil: metrics kept but not exported
	// Now is the clock of reads (a key's cap period); nil means time.Now.
	Now func() time.Time
	// Ledger spends in Redis; Debit refuses without one.
	Ledger Spender
	// ReplicaID names this replica in the change stream and the logs.
	ReplicaID string
	// Timeout bounds each admin command and read of one record; 0 means
	// 5s. Lists and full syncs get ten times as long.
	Timeout time.Duration
	// Thresholds are the fractions of a key's spend cap whose crossing by a
	// settled or expired reservation raises a key_spend alert; nil means
	// keystore.DefaultAlertThresholds, empty none.
	Thresholds []float64
	// Alerts, if not nil, is given the alerts that each charge of this
	// replica's Settle and expiry crossed (an account's low balance too),
	// without IDs: keystore.Store.RaiseAlerts gives them one. It is called
	// on the caller's goroutine (an access-log stream, or Run), so it
	// should not wait for long. nil: no alerts.
	Alerts func([]keystore.Alert)
}

// Timeouts and intervals.
const (
	defaultTimeout = 5 * time.Second
	blockFor       = time.Second     // XREAD BLOCK: how long a replica waits for a change
	repairEvery    = 2 * time.Second // how often it checks P version and the marker
	retryEvery     = time.Second     // how long it waits after a failure
	streamMaxLen   = 100_000         // XADD MAXLEN ~: entries kept for replicas that lag
	chunk          = 1000            // records per pipeline in a sync or a list
)

// metaEpoch is where the local store keeps the marker's epoch.
const metaEpoch = "redis_epoch"

// Store is the Redis-mode store of one replica. Its admin methods have the
// signatures and error semantics of *keystore.Store's (the same sentinel
// errors, wrapped), plus rconn.ErrUnavailable when Redis cannot serve:
// admin writes are refused while Redis is down. Lookup, Debit and Reserve
// make it an authz.Keys, Settle a settle.Ledger. Safe for concurrent use.
type Store struct {
	conn    *rconn.Conn
	local   *keystore.Store
	ledger  Spender
	log     *zap.Logger
	now     func() time.Time
	replica string
	timeout time.Duration
	m       *metrics

	thresholds []float64
	alerts     func([]keystore.Alert)

	// Set while Redis fails Settle or the expiry: only the first failure
	// of a run is logged as such.
	settleFailing, expireFailing atomic.Bool

	// apply serialises every fetch-then-Mirror (Run's, and each admin
	// command's after its write): each one's fetch sees Redis at least as
	// new as the previous one's, so the mirror never goes back to an older
	// record.
	apply sync.Mutex

	lost    atomic.Bool
	running atomic.Bool

	// The marker's state, guarded by markerMu.
	markerMu     sync.Mutex
	epochKnown   bool   // the marker was checked since Open
	epoch        string // the epoch the local file remembers
	lostReported bool   // the loss was logged, with this marker: once per loss
	lostMarker   string

	// Run's position in the change stream: Run's goroutine only.
	pos position
}

// position is where the mirror stands in the change stream.
type position struct {
	synced  bool   // a full sync has completed
	resync  string // why the next round must sync again ("" : it need not)
	lastID  string // the last stream entry applied
	applied int64  // the version of that entry (or of the sync)
}

// Open returns the store of a replica that mirrors Redis into local. It
// does not wait for Redis beyond one bounded call (rconn's timeout): when
// Redis answers, it checks the data-loss marker at once (see DataLost);
// when it does not, Run checks it as soon as Redis answers. Keys
// authenticate from local meanwhile. Run must run for the mirror to
// follow Redis; stop it before closing local.
func Open(conn *rconn.Conn, local *keystore.Store, o Options) (*Store, error) {
	if conn == nil || local == nil {
		return nil, errors.New("redisstore: Open needs a Redis connection and a local store")
	}
	if o.Log == nil {
		o.Log = zap.NewNop()
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Timeout <= 0 {
		o.Timeout = defaultTimeout
	}
	if o.Thresholds == nil {
		o.Thresholds = keystore.DefaultAlertThresholds
	}
	m, err := newMetrics(o.Metrics)
	if err != nil {
		return nil, err
	}
	s := &Store{
		conn: conn, local: local, ledger: o.Ledger, log: o.Log, now: o.Now,
		replica: o.ReplicaID, timeout: o.Timeout, m: m,
		thresholds: slices.Clone(o.Thresholds), alerts: o.Alerts,
	}
	ctx, cancel := context.WithTimeout(context.Background(), o.Timeout)
	defer cancel()
	if err := s.checkMarker(ctx); err != nil {
		s.log.Warn("redis marker not checked at start: Redis did not answer; keys authenticate from the local file meanwhile",
			zap.Error(err))
	}
	return s, nil
}

// Lookup returns the key whose secret this is, if it is active at now,
// from the local mirror: no Redis call.
func (s *Store) Lookup(secret string, now time.Time) (*keystore.Key, bool) {
	return s.local.Lookup(secret, now)
}

// Debit spends price through the ledger; a price of 0 always passes. Once
// Redis has lost its data (DataLost) it fails with ErrDataLost.
func (s *Store) Debit(k *keystore.Key, price money.Micros) error {
	if price == 0 {
		return nil
	}
	if s.lost.Load() {
		return ErrDataLost
	}
	if s.ledger == nil {
		return ErrNoLedger
	}
	return s.ledger.Spend(k, price)
}

// DataLost reports whether Redis was found to have lost keygate's data: it
// has no marker, or another one than the epoch this replica's local file
// remembers. It turns false again if the remembered marker comes back (the
// operator restored Redis, or set the marker back after accepting the
// loss).
func (s *Store) DataLost() bool { return s.lost.Load() }

// checkMarker compares Redis's marker with the epoch the local file
// remembers, writing the marker when neither has one (a new deployment)
// and remembering Redis's when the local file has none (a new replica).
func (s *Store) checkMarker(ctx context.Context) error {
	s.markerMu.Lock()
	defer s.markerMu.Unlock()
	remembered := s.epoch
	if !s.epochKnown {
		var err error
		if remembered, err = s.local.Meta(metaEpoch); err != nil {
			return fmt.Errorf("read the remembered redis epoch: %w", err)
		}
	}
	marker, err := s.conn.Marker(ctx)
	if err != nil {
		return err
	}
	if remembered == "" {
		if marker == "" {
			if marker, _, err = s.conn.InitMarker(ctx); err != nil {
				return err
			}
		}
		if err := s.local.SetMeta(metaEpoch, marker); err != nil {
			return fmt.Errorf("remember the redis epoch: %w", err)
		}
		s.log.Info("redis epoch remembered", zap.String("epoch", marker))
		remembered = marker
	}
	s.epochKnown, s.epoch = true, remembered
	if marker == remembered {
		if s.lost.Swap(false) {
			s.log.Warn("redis has keygate's marker again: spending resumes", zap.String("epoch", marker))
		}
		s.lostReported = false
		s.m.dataLost.Set(0)
		return nil
	}
	s.lost.Store(true)
	s.m.dataLost.Set(1)
	if !s.lostReported || s.lostMarker != marker {
		s.lostReported, s.lostMarker = true, marker
		s.log.Error("redis has lost keygate's data: its marker is missing or belongs to another epoch; spending fails closed. "+
			"Restore Redis from its AOF or a backup; or, to start over with what Redis holds now, "+
			"set the marker key to the remembered epoch (replicas resume within seconds), or remove each replica's --db file (a cache in this mode) and restart it",
			zap.String("remembered_epoch", remembered), zap.String("redis_marker", marker),
			zap.String("marker_key", s.conn.Key("marker")))
	}
	return nil
}

// markerChecked reports whether the marker was checked since Open.
func (s *Store) markerChecked() bool {
	s.markerMu.Lock()
	defer s.markerMu.Unlock()
	return s.epochKnown
}

// ready refuses at once while the breaker is open.
func (s *Store) ready(op string) error {
	if !s.conn.Available() {
		return fmt.Errorf("%s: %w: admin commands and reads are refused until it answers again", op, rconn.ErrUnavailable)
	}
	return nil
}

// writable is ready for an admin write, which is also refused while Redis
// has lost keygate's data: a write then would mix new records into what a
// restore from a backup is about to replace.
func (s *Store) writable(op string) error {
	if err := s.ready(op); err != nil {
		return err
	}
	if s.lost.Load() {
		return fmt.Errorf("%s: %w", op, ErrDataLost)
	}
	return nil
}

// redisErr wraps an error of Redis for op, marking those that say Redis
// could not serve with rconn.ErrUnavailable.
func redisErr(op string, err error) error {
	if rconn.IsUnavailable(err) && !errors.Is(err, rconn.ErrUnavailable) {
		return fmt.Errorf("%s: %w: %w", op, rconn.ErrUnavailable, err)
	}
	return fmt.Errorf("%s: %w", op, err)
}

// client returns the client with socket timeouts of d, and a context
// bounded by d.
func (s *Store) client(d time.Duration) (*redis.Client, context.Context, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	return s.conn.Client().WithTimeout(d), ctx, cancel
}

// Redis keys.
func (s *Store) acctKey(id string) string     { return s.conn.Key("acct", id) }
func (s *Store) keyKey(id string) string      { return s.conn.Key("key", id) }
func (s *Store) acctKeysKey(id string) string { return s.conn.Key("acctkeys", id) }
func (s *Store) accountsKey() string          { return s.conn.Key("accounts") }
func (s *Store) keysKey() string              { return s.conn.Key("keys") }
func (s *Store) versionKey() string           { return s.conn.Key("version") }
func (s *Store) changesKey() string           { return s.conn.Key("changes") }
