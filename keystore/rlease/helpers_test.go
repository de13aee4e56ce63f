package rlease

import (
	"context"
	"errors"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/redis/go-redis/v9"

	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/keystoretest"
	"github.com/keygate/keygate/keystore/money"
	"github.com/keygate/keygate/keystore/rconn"
	"github.com/keygate/keygate/keystore/rconn/rconntest"
)

// testTimeout bounds Redis calls in tests: generous, so that a loaded
// machine running -race does not look like a Redis outage.
const testTimeout = 5 * time.Second

// dial returns a Conn to srv, closed when the test ends. Its breaker
// prober runs until then too.
func dial(t testing.TB, srv *rconntest.Server) *rconn.Conn {
	t.Helper()
	c, err := rconn.Dial(rconn.Config{Addr: srv.Addr(), Timeout: testTimeout}, rconn.Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = c.Run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
		c.Close()
	})
	return c
}

// admin is a direct client for setting up and reading what redisstore
// would write, and what the scripts leave.
type admin struct {
	t     testing.TB
	c     *rconn.Conn
	r     *redis.Client
	local *keystore.Store // the replica's mirror that keys are looked up in; opened on first use
}

func newAdmin(t testing.TB, c *rconn.Conn) *admin {
	return &admin{t: t, c: c, r: c.Client()}
}

// account creates an account with balance bal, as redisstore would.
func (a *admin) account(id string, bal money.Micros) {
	a.t.Helper()
	if err := a.r.HSet(context.Background(), a.c.Key("acct", id), "bal", int64(bal)).Err(); err != nil {
		a.t.Fatal(err)
	}
}

// key creates key id of account acct with spend cap capM, as redisstore
// would, and returns it as a Check sees it.
func (a *admin) key(id, acct string, capM money.Micros) *keystore.Key {
	a.t.Helper()
	return a.periodKey(id, acct, capM, keystore.PeriodNone)
}

// periodKey is key with a cap period. The key is looked up in a local
// store that mirrors its record, as a replica's Check finds it.
func (a *admin) periodKey(id, acct string, capM money.Micros, p keystore.Period) *keystore.Key {
	a.t.Helper()
	if err := a.r.HSet(context.Background(), a.c.Key("key", id), "account", acct).Err(); err != nil {
		a.t.Fatal(err)
	}
	if a.local == nil {
		a.local = keystoretest.Open(a.t)
	}
	secret, hash, err := keystore.NewSecret()
	if err != nil {
		a.t.Fatal(err)
	}
	created := time.Unix(1_700_000_000, 0)
	err = a.local.Mirror([]keystore.AccountRecord{{ID: acct, CreatedAt: created}},
		[]keystore.KeyRecord{{ID: id, Hash: hash, Account: acct, Scopes: []string{"test"},
			SpendCap: capM, CapPeriod: p, CreatedAt: created}})
	if err != nil {
		a.t.Fatal(err)
	}
	k, ok := a.local.Lookup(secret, created)
	if !ok {
		a.t.Fatalf("key %s not found in the mirror", id)
	}
	return k
}

// set writes hash fields directly, as redisstore (reservations, alert
// levels) or an earlier period would have left them.
func (a *admin) set(key string, fieldValues ...any) {
	a.t.Helper()
	if err := a.r.HSet(context.Background(), key, fieldValues...).Err(); err != nil {
		a.t.Fatal(err)
	}
}

// field reads an integer hash field (0 when missing).
func (a *admin) field(key, field string) money.Micros {
	a.t.Helper()
	v, err := a.r.HGet(context.Background(), key, field).Result()
	if errors.Is(err, redis.Nil) {
		return 0
	}
	if err != nil {
		a.t.Fatal(err)
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		a.t.Fatal(err)
	}
	return money.Micros(n)
}

// acctState and keyState read the money fields.
func (a *admin) acct(id string) (bal, leased money.Micros) {
	return a.field(a.c.Key("acct", id), "bal"), a.field(a.c.Key("acct", id), "leased")
}

func (a *admin) keyMoney(id string) (spent, leased money.Micros) {
	return a.field(a.c.Key("key", id), "spent"), a.field(a.c.Key("key", id), "leased")
}

// leaseHash returns what Redis says replica holds, per key.
func (a *admin) leaseHash(replica string) map[string]string {
	a.t.Helper()
	m, err := a.r.HGetAll(context.Background(), a.c.Key("lease", replica)).Result()
	if err != nil {
		a.t.Fatal(err)
	}
	return m
}

// clock is a test clock: it moves only when told.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *clock { return &clock{t: time.Unix(1_800_000_000, 0)} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Add(d time.Duration) time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
	return c.t
}

// errLostReply stands for a reply lost on the way back: Redis ran the call.
var errLostReply = errors.New("test: reply lost")

// faultConn wraps a conn and loses the reply of chosen calls after Redis
// ran them, as a timeout does.
type faultConn struct {
	conn
	mu   sync.Mutex
	lose map[string]int // op → replies still to lose
}

func newFaultConn(c conn) *faultConn { return &faultConn{conn: c, lose: map[string]int{}} }

// loseNext makes the next n calls named op lose their reply.
func (f *faultConn) loseNext(op string, n int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.lose[op] += n
}

func (f *faultConn) Call(ctx context.Context, op string, fn func(ctx context.Context, r *redis.Client) error) error {
	err := f.conn.Call(ctx, op, fn)
	f.mu.Lock()
	defer f.mu.Unlock()
	if err == nil && f.lose[op] > 0 {
		f.lose[op]--
		return errLostReply
	}
	return err
}

// ledger makes a Ledger on c for the test, closed (if not yet) when it ends.
func ledger(t testing.TB, c conn, o LedgerOptions) *Ledger {
	t.Helper()
	l, err := newLedger(c, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if !l.closed.Load() {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			_ = l.Close(ctx)
		}
	})
	return l
}

// closeAll closes ledgers, failing the test if one cannot report.
func closeAll(t testing.TB, ls ...*Ledger) {
	t.Helper()
	for _, l := range ls {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := l.Close(ctx)
		cancel()
		if err != nil {
			t.Fatalf("Close %s: %v", l.ReplicaID(), err)
		}
	}
}

// local returns what l holds for key id: lease, used, extra.
func (l *Ledger) local(id string) (lease, used, extra money.Micros) {
	s := l.keys.get(id)
	if s == nil {
		return 0, 0, 0
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lease, s.used, s.extra
}

// counterValue reads a counter.
func counterValue(t testing.TB, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

// markDead makes replica look silent for twice the dead window to Redis's
// clock, so that the next heartbeat reclaims its leases.
func (a *admin) markDead(replica string) {
	a.t.Helper()
	old := float64(time.Now().Add(-2 * deadAfter).UnixMilli())
	if err := a.r.ZAdd(context.Background(), a.c.Key("replicas"), redis.Z{Score: old, Member: replica}).Err(); err != nil {
		a.t.Fatal(err)
	}
}

// waitUp waits until c's breaker has closed after a Redis restart.
func waitUp(t testing.TB, c *rconn.Conn) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !c.Available() {
		if time.Now().After(deadline) {
			t.Fatal("the breaker stayed open 15s after Redis restarted")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// oneKey starts a redis-server holding account "a" with balance and its
// key "k" without a cap: the setup most ledger tests share.
func oneKey(t testing.TB, balance money.Micros) (*rconntest.Server, *rconn.Conn, *admin, *keystore.Key) {
	t.Helper()
	srv := rconntest.Start(t)
	c := dial(t, srv)
	a := newAdmin(t, c)
	a.account("a", balance)
	return srv, c, a, a.key("k", "a", 0)
}
