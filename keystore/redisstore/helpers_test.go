package redisstore_test

import (
	"context"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/money"
	"github.com/keygate/keygate/keystore/rconn"
	"github.com/keygate/keygate/keystore/rconn/rconntest"
	"github.com/keygate/keygate/keystore/redisstore"
)

// replica is one keygate replica: its local bbolt file, its connection and
// its Redis store, with Run (and the connection's breaker prober) running.
type replica struct {
	t      testing.TB
	name   string
	path   string
	local  *keystore.Store
	conn   *rconn.Conn
	store  *redisstore.Store
	reg    *prometheus.Registry
	ledger *fakeLedger

	cancelConn context.CancelFunc
	cancelRun  context.CancelFunc
	wg         sync.WaitGroup
	runWG      sync.WaitGroup
}

// startReplica opens a replica on srv with its local file at path ("" for
// a new one), and starts Run. It is stopped when the test ends.
func startReplica(t testing.TB, srv *rconntest.Server, name, path string) *replica {
	t.Helper()
	return startReplicaWith(t, srv, name, path, redisstore.Options{})
}

// startReplicaWith is startReplica with the store's Now, Thresholds and
// Alerts taken from o (the rest is the helper's).
func startReplicaWith(t testing.TB, srv *rconntest.Server, name, path string, o redisstore.Options) *replica {
	t.Helper()
	if path == "" {
		path = filepath.Join(t.TempDir(), name+".db")
	}
	r := &replica{t: t, name: name, path: path, reg: prometheus.NewRegistry(), ledger: new(fakeLedger)}
	log := zap.NewNop()
	if _, bench := t.(*testing.B); !bench {
		log = zaptest.NewLogger(t).Named(name)
	}
	local, err := keystore.Open(path, keystore.Options{Log: log})
	if err != nil {
		t.Fatal(err)
	}
	// A generous timeout: the race detector on a shared machine is slow,
	// and a Call that times out opens the breaker.
	conn, err := rconn.Dial(rconn.Config{Addr: srv.Addr(), Timeout: 2 * time.Second}, rconn.Options{Log: log})
	if err != nil {
		t.Fatal(err)
	}
	st, err := redisstore.Open(conn, local, redisstore.Options{
		Log: log, Metrics: r.reg, Ledger: r.ledger, ReplicaID: name, Timeout: 5 * time.Second,
		Now: o.Now, Thresholds: o.Thresholds, Alerts: o.Alerts,
	})
	if err != nil {
		t.Fatal(err)
	}
	r.local, r.conn, r.store = local, conn, st
	ctx, cancel := context.WithCancel(context.Background())
	r.cancelConn = cancel
	r.wg.Go(func() { conn.Run(ctx) })
	r.startRun()
	t.Cleanup(r.stop)
	return r
}

// startRun starts the store's Run.
func (r *replica) startRun() {
	ctx, cancel := context.WithCancel(context.Background())
	r.cancelRun = cancel
	r.runWG.Go(func() {
		if err := r.store.Run(ctx); err != nil {
			r.t.Errorf("%s: Run: %v", r.name, err)
		}
	})
}

// stopRun stops the store's Run and waits for it to return.
func (r *replica) stopRun() {
	r.cancelRun()
	r.runWG.Wait()
}

// stop stops the replica; it may be called more than once.
func (r *replica) stop() {
	if r.local == nil {
		return
	}
	r.stopRun()
	r.cancelConn()
	r.wg.Wait()
	if err := r.local.Close(); err != nil {
		r.t.Errorf("%s: close the local store: %v", r.name, err)
	}
	r.conn.Close()
	r.local = nil
}

// restart stops the replica and starts it again on the same local file.
func (r *replica) restart(srv *rconntest.Server) *replica {
	r.t.Helper()
	r.stop()
	return startReplica(r.t, srv, r.name, r.path)
}

// accepts reports whether the replica's Lookup accepts secret at now.
func (r *replica) accepts(secret string, now time.Time) bool {
	_, ok := r.store.Lookup(secret, now)
	return ok
}

// syncs returns how many full syncs the replica did for reason.
func (r *replica) syncs(reason string) float64 {
	r.t.Helper()
	return metricValue(r.t, r.reg, "keygate_redis_mirror_syncs_total", reason)
}

func metricValue(t testing.TB, reg *prometheus.Registry, name, reason string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			match := reason == ""
			for _, lp := range m.GetLabel() {
				match = match || (lp.GetName() == "reason" && lp.GetValue() == reason)
			}
			if !match {
				continue
			}
			if m.GetGauge() != nil {
				return m.GetGauge().GetValue()
			}
			return m.GetCounter().GetValue()
		}
	}
	t.Fatalf("no metric %s{reason=%q}", name, reason)
	return 0
}

// within is the generous bound of every wait for propagation: the
// contract is one second (five for a repair); this only keeps a broken
// build from hanging.
const within = 20 * time.Second

// eventually waits until cond holds, failing the test after within.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s", what, within)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// rawClient is a plain client on srv, for what a test does behind the
// stores' backs.
func rawClient(t testing.TB, srv *rconntest.Server) *redis.Client {
	t.Helper()
	c := redis.NewClient(&redis.Options{Addr: srv.Addr()})
	t.Cleanup(func() { c.Close() })
	return c
}

// fakeLedger records spends; rlease.Ledger does the real thing.
type fakeLedger struct {
	mu     sync.Mutex
	spends []money.Micros
}

func (l *fakeLedger) Spend(_ *keystore.Key, price money.Micros) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.spends = append(l.spends, price)
	return nil
}

func (l *fakeLedger) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.spends)
}

func mustAccount(t testing.TB, r *replica, id string, balance money.Micros) keystore.Account {
	t.Helper()
	a, err := r.store.CreateAccount(id, "free", balance, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func mustKey(t testing.TB, r *replica, account string) (keystore.KeyInfo, string) {
	t.Helper()
	k, secret, err := r.store.CreateKey(keystore.NewKey{Account: account, Name: "k", Scopes: []string{"chat:write"}}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return k, secret
}
