package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/keygate/keygate/authz"
	"github.com/keygate/keygate/authz/settle"
	"github.com/keygate/keygate/cmd/keygate/config"
	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/admin"
	"github.com/keygate/keygate/keystore/rconn"
	"github.com/keygate/keygate/keystore/redisstore"
	"github.com/keygate/keygate/keystore/rlease"
)

// backend is where a keygate process keeps accounts, keys and money: the
// bbolt store alone (store: bbolt), or Redis shared by every replica, with
// the bbolt file as this replica's last known key records (store: redis).
type backend struct {
	local   *keystore.Store // the bbolt file; in Redis mode, the mirror
	keys    authz.Keys
	admin   admin.Store
	limiter authz.RateLimiter // nil: the keys' own buckets (bbolt)
	settler settle.Ledger     // where the access log settles reservations
	// loops run until their context is done; close runs after they all
	// returned: it writes what is still in memory (the last flush, the last
	// spend report) and releases the files and connections.
	loops []func(ctx context.Context) error
	close func() error
}

// openBackend opens the store that cfg names. o configures the bbolt file.
func openBackend(cfg *config.Config, o keystore.Options, log *zap.Logger, reg prometheus.Registerer) (*backend, error) {
	local, err := keystore.Open(cfg.DB, o)
	if err != nil {
		return nil, err
	}
	if cfg.Store != config.StoreRedis {
		// A replica's cache of key records holds no balances worth serving:
		// using it as a store would charge against stale numbers.
		if mirror, err := redisstore.IsMirror(local); err != nil || mirror {
			local.Close() //nolint:errcheck // refusing anyway
			if err != nil {
				return nil, err
			}
			return nil, fmt.Errorf("%s is the local cache of a store: redis replica, not a store of its own: run keygate with its store: redis config (--config), and administer through a replica (--server)", cfg.DB)
		}
		// No limiter: each key's bucket lives in its store entry.
		return &backend{
			local: local, keys: local, admin: local, settler: local,
			loops: []func(context.Context) error{local.Run},
			close: local.Close,
		}, nil
	}
	// The reverse: a bbolt store's file, with accounts of its own, would
	// silently become this replica's cache, its balances never reaching
	// Redis.
	mirror, err := redisstore.IsMirror(local)
	if err == nil && !mirror && len(local.Accounts()) > 0 {
		err = fmt.Errorf("%s is a store: bbolt store with accounts of its own; in store: redis, --db is the replica's cache: give this replica a new file, and to move this store into Redis, stop its server and run keygate migrate --db %s --config <this config>", cfg.DB, cfg.DB)
	}
	if err != nil {
		local.Close() //nolint:errcheck // refusing anyway
		return nil, err
	}
	b, err := openRedis(cfg, local, log, reg)
	if err != nil {
		local.Close() //nolint:errcheck // the open error matters more
		return nil, err
	}
	return b, nil
}

// openRedis builds the Redis-mode backend over the opened mirror.
func openRedis(cfg *config.Config, local *keystore.Store, log *zap.Logger, reg prometheus.Registerer) (*backend, error) {
	r := cfg.Redis
	rc := rconn.Config{Addr: r.Addr, Password: r.Password, DB: r.DB, KeyPrefix: r.KeyPrefix, Timeout: cfg.RedisTimeout}
	if r.TLS != nil {
		rc.TLS = &rconn.TLS{CAFile: r.TLS.CAFile, ServerName: r.TLS.ServerName}
	}
	// go-redis logs dial failures through a process-wide logger; they go to
	// ours, at debug: the breaker already reports an outage once.
	redis.SetLogger(redisLog{log.Named("redis").Sugar()})
	conn, err := rconn.Dial(rc, rconn.Options{Log: log.Named("redis"), Metrics: reg})
	if err != nil {
		return nil, fmt.Errorf("redis: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	for _, w := range conn.CheckPersistence(ctx) {
		log.Warn("redis persistence: " + w)
	}
	cancel()
	replica := replicaID()
	outage := rlease.FailClosed
	if cfg.RedisOutage != nil && cfg.RedisOutage.Spend == config.OutageLocalAllowance {
		outage = rlease.AllowLocal
	}
	// Crossings are found by the replica whose script applied the charge,
	// once across all replicas; the local store's outbox and the notifier
	// deliver them as in bbolt mode.
	raise := func(alerts []keystore.Alert) {
		if err := local.RaiseAlerts(alerts); err != nil {
			log.Error("alerts lost: the local outbox refused them", zap.Int("alerts", len(alerts)), zap.Error(err))
		}
	}
	// Outage spends are journaled in the local file until Redis has them,
	// so that a replica restarted during an outage still charges them. The
	// journal is used whatever the policy: a replica restarted with
	// fail_closed still reports what an earlier local_allowance run owes.
	journal, err := local.OutageJournal(reg)
	if err != nil {
		conn.Close() //nolint:errcheck // the error above matters more
		return nil, err
	}
	ledger, err := rlease.NewLedger(conn, rlease.LedgerOptions{
		ReplicaID: replica, Outage: outage, OutageAllowance: cfg.OutageAllowance,
		Journal:    journal,
		Thresholds: cfg.Alerts.Thresholds, Alerts: raise,
		Log: log.Named("lease"), Metrics: reg,
	})
	if err != nil {
		conn.Close() //nolint:errcheck // the error above matters more
		return nil, err
	}
	limiter := rlease.NewLimiter(conn, rlease.LimiterOptions{
		ReplicaID: replica, Live: ledger.LiveReplicas, Log: log.Named("ratelimit"), Metrics: reg,
	})
	rs, err := redisstore.Open(conn, local, redisstore.Options{
		ReplicaID: replica, Ledger: ledger, Thresholds: cfg.Alerts.Thresholds, Alerts: raise,
		Log: log.Named("redisstore"), Metrics: reg,
	})
	if err != nil {
		conn.Close() //nolint:errcheck // the error above matters more
		return nil, err
	}
	return &backend{
		local: local, keys: rs, admin: rs, limiter: limiter, settler: rs,
		loops: []func(context.Context) error{conn.Run, ledger.Run, limiter.Run, rs.Run, journal.Run, local.Run},
		close: func() error {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			// The breaker's prober stopped with the loops; it runs again
			// while the last report waits, so that a breaker left open by a
			// passing slowness closes as soon as Redis answers.
			go conn.Run(ctx)         //nolint:errcheck // returns nil when ctx ends
			err := ledger.Close(ctx) // the last spend report, and every lease back
			// The tokens spent, and every token held back. If Redis does not
			// take them nothing is lost: it counts this replica's held tokens
			// as spent once it is silent for 30s.
			if lerr := limiter.Close(ctx); lerr != nil {
				log.Warn("rate tokens not handed back; Redis counts them spent once this replica is silent for 30s", zap.Error(lerr))
			}
			// Then the journal: what the last report sealed or Redis
			// applied, and, if Redis is down, what it could not send.
			return errors.Join(err, journal.Close(), conn.Close(), local.Close())
		},
	}, nil
}

// replicaID names this process among the replicas sharing a Redis: the
// host name (a pod's name) and the process ID, so that two processes on
// one host never share leases.
func replicaID() string {
	host, err := os.Hostname()
	if err != nil || host == "" {
		host = "keygate"
	}
	return fmt.Sprintf("%s-%d", host, os.Getpid())
}

// redisLog hands go-redis's messages to zap.
type redisLog struct{ s *zap.SugaredLogger }

func (l redisLog) Printf(_ context.Context, format string, v ...any) { l.s.Debugf(format, v...) }
