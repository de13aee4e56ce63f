// Package rconn is keygate's connection to Redis in store: redis mode: a
// lazily connected client, the deployment's key prefix, a time bound on
// every call made on the Check path, and a circuit breaker so that a
// failing Redis costs the Check path nothing once it is known to fail.
//
// The client never dials in Dial: a replica must start, and authenticate
// keys from its local file, while Redis is down. Every socket wait of the
// client (dial, read, write, pool) is bounded by the configured timeout, so
// a Redis that black-holes packets costs a call at most that long, and the
// first such timeout opens the breaker: later calls are refused at once
// until a background probe (Run) sees Redis answer again.
package rconn

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"
	"go.uber.org/zap"
)

// Defaults of the redis: block.
const (
	DefaultKeyPrefix = "keygate:"
	DefaultTimeout   = 50 * time.Millisecond
)

// TLS configures a TLS connection to Redis.
type TLS struct {
	CAFile     string // PEM bundle of the CAs to trust; "" trusts the system's roots
	ServerName string // name the server's certificate must carry; "" means the host of Addr
}

// Config is the redis: block of keygate's configuration.
type Config struct {
	Addr      string // host:port
	Password  string
	DB        int
	TLS       *TLS          // nil: plain TCP
	KeyPrefix string        // "" means "keygate:"
	Timeout   time.Duration // 0 means 50ms; bounds every call made with Call
}

// String describes c without its password, so that a Config logged by
// mistake (zap.Any, %v) does not leak it.
func (c Config) String() string {
	pw := "none"
	if c.Password != "" {
		pw = "set"
	}
	tlsDesc := "off"
	if c.TLS != nil {
		tlsDesc = fmt.Sprintf("{ca_file:%q server_name:%q}", c.TLS.CAFile, c.TLS.ServerName)
	}
	return fmt.Sprintf("{addr:%s db:%d password:%s tls:%s key_prefix:%q timeout:%s}",
		c.Addr, c.DB, pw, tlsDesc, c.KeyPrefix, c.Timeout)
}

// Options are what Dial needs besides the Config.
type Options struct {
	Log     *zap.Logger           // nil: no logs
	Metrics prometheus.Registerer // nil: metrics kept but not exported
	Now     func() time.Time      // nil: time.Now
}

// ErrUnavailable is returned (wrapped with the call's op) by Call when the
// breaker is open: Redis was found failing and has not answered a probe
// since.
var ErrUnavailable = errors.New("redis is unavailable")

// ErrDataLost is returned for spends and admin writes refused because
// Redis has lost keygate's data: its marker is missing or belongs to
// another epoch (see Marker). Defined here, with the marker, so that every
// layer can recognise it.
var ErrDataLost = errors.New("redis has lost keygate's data (its marker is missing or changed): spending and admin writes are refused until an operator recovers it (README: Scale-out)")

// Breaker tuning. A timeout opens the breaker at once: it has already cost
// one Check the whole timeout, and the next ones would pay it too.
const (
	failuresToOpen     = 3
	probeEvery         = 250 * time.Millisecond
	persistenceTimeout = time.Second
)

// Conn is a connection to Redis. Safe for concurrent use.
type Conn struct {
	client  *redis.Client
	prefix  string
	timeout time.Duration
	log     *zap.Logger
	now     func() time.Time
	m       *metrics
	ops     sync.Map // op name → *opMetrics
	// views holds the clients with longer socket timeouts that CallFor
	// uses (time.Duration → *redis.Client), made once per timeout: a
	// view costs a dozen allocations, and a Settle calls it per request.
	views sync.Map

	open     atomic.Bool   // the breaker: true refuses every Call
	failures atomic.Int32  // consecutive failed Calls
	openedAt atomic.Int64  // unix nanos of the last opening, for the log
	wake     chan struct{} // cap 1: tells Run the breaker opened
	calls    atomic.Uint64 // Calls that reached Redis

	initMarker *redis.Script
}

// Dial returns a Conn without waiting for Redis: the client connects on
// its first call. It fails only on a configuration error (address, TLS
// CA file, negative timeout or DB) or when metrics cannot be registered.
func Dial(c Config, o Options) (*Conn, error) {
	if err := checkAddr(c.Addr); err != nil {
		return nil, err
	}
	if c.DB < 0 {
		return nil, fmt.Errorf("redis db %d: must not be negative", c.DB)
	}
	if c.Timeout < 0 {
		return nil, fmt.Errorf("redis timeout %s: must not be negative", c.Timeout)
	}
	timeout := c.Timeout
	if timeout == 0 {
		timeout = DefaultTimeout
	}
	prefix := c.KeyPrefix
	if prefix == "" {
		prefix = DefaultKeyPrefix
	}
	var tlsConf *tls.Config
	if c.TLS != nil {
		var err error
		if tlsConf, err = tlsConfig(c.Addr, c.TLS); err != nil {
			return nil, err
		}
	}
	m, err := newMetrics(o.Metrics)
	if err != nil {
		return nil, err
	}
	if o.Log == nil {
		o.Log = zap.NewNop()
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	client := redis.NewClient(&redis.Options{
		Addr:       c.Addr,
		ClientName: "keygate", // sent with HELLO: no extra round trip
		Password:   c.Password,
		DB:         c.DB,
		TLSConfig:  tlsConf,
		// Every wait is bounded by the timeout. The socket deadline of a
		// command is the earlier of the context's deadline and now+ReadTimeout,
		// so Call's context bounds it, and a caller of Client() with no
		// deadline is bounded too (see Client for longer operations).
		ContextTimeoutEnabled: true,
		DialTimeout:           timeout,
		ReadTimeout:           timeout,
		WriteTimeout:          timeout,
		PoolTimeout:           timeout,
		// No retries anywhere: a retry would multiply the wait, and the
		// breaker, not the client, decides when to try again.
		MaxRetries:    -1,
		DialerRetries: 1,
		// Fewer round trips when a connection is made (inside a Check's
		// timeout): no CLIENT SETINFO, no CLIENT MAINT_NOTIFICATIONS.
		DisableIdentity:          true,
		MaintNotificationsConfig: &maintnotifications.Config{Mode: maintnotifications.ModeDisabled},
	})
	conn := &Conn{
		client:  client,
		prefix:  prefix,
		timeout: timeout,
		log:     o.Log,
		now:     o.Now,
		m:       m,
		wake:    make(chan struct{}, 1),

		initMarker: redis.NewScript(initMarkerScript),
	}
	m.open.Set(0)
	m.up.Set(1)
	return conn, nil
}

// checkAddr accepts host:port with a non-empty host and a port in 1..65535.
func checkAddr(addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("redis addr %q: want host:port: %w", addr, err)
	}
	if host == "" {
		return fmt.Errorf("redis addr %q: want host:port: missing host", addr)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return fmt.Errorf("redis addr %q: want host:port: port %q is not a number in 1..65535", addr, port)
	}
	return nil
}

// tlsConfig reads the CA file now, so that a missing or wrong file is a
// start-up error rather than a failure of every later call.
func tlsConfig(addr string, t *TLS) (*tls.Config, error) {
	conf := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: t.ServerName}
	if conf.ServerName == "" {
		conf.ServerName, _, _ = net.SplitHostPort(addr) // checked by checkAddr
	}
	if t.CAFile != "" {
		pem, err := os.ReadFile(t.CAFile)
		if err != nil {
			return nil, fmt.Errorf("redis tls ca_file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("redis tls ca_file %s: no PEM certificate in it", t.CAFile)
		}
		conf.RootCAs = pool
	}
	return conf, nil
}

// Key returns the prefix and parts joined by ":": Key("acct", id) is
// "keygate:acct:" + id with the default prefix.
func (c *Conn) Key(parts ...string) string {
	if len(parts) == 1 {
		return c.prefix + parts[0]
	}
	return c.prefix + strings.Join(parts, ":")
}

// Prefix returns the key prefix (for scripts that build keys themselves).
func (c *Conn) Prefix() string { return c.prefix }

// Timeout returns the bound of every Call.
func (c *Conn) Timeout() time.Duration { return c.timeout }

// Client returns the underlying client, for blocking reads (XREAD BLOCK)
// and admin calls with their own contexts. Its calls do not go through the
// breaker and are not counted. Each socket read or write is bounded by the
// earlier of the context's deadline and Timeout, except blocking commands
// (XREAD BLOCK d waits up to d plus 10s). For an operation that may take
// longer than Timeout (a big Lua script, a large reply), use
// Client().WithTimeout(d): a view with longer socket timeouts sharing the
// same connection pool.
func (c *Conn) Client() *redis.Client { return c.client }

// Commands returns how many Calls reached Redis (refused Calls and breaker
// probes are not counted): the benchmark's Redis commands per Check.
func (c *Conn) Commands() uint64 { return c.calls.Load() }

// Close closes the client; later calls fail.
func (c *Conn) Close() error { return c.client.Close() }
