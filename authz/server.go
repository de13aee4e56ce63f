package authz

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/keygate/keygate/authz/ratelimit"
	"github.com/keygate/keygate/authz/route"
	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/money"
)

// Keys is what a Check needs from the key store: a lookup by secret, an
// atomic debit, and for settlement after the response an atomic
// reservation. *keystore.Store implements it.
type Keys interface {
	Lookup(secret string, now time.Time) (*keystore.Key, bool)
	Debit(k *keystore.Key, price money.Micros) error
	Reserve(k *keystore.Key, requestID string, price, maxPrice money.Micros, deadline time.Time) error
}

// RateLimiter is a per-key rate limit kept apart from the keys, such as the
// leases of a limit shared through Redis. Without one, a Check takes from
// the key's own bucket (keystore.Key.RateBucket): no map, no lock.
type RateLimiter interface {
	Allow(key string, r ratelimit.Rate, now time.Time) ratelimit.Decision
}

// Config is what New needs. Keys and Routes are required.
type Config struct {
	Keys    Keys
	Routes  *route.Table
	Limiter RateLimiter // nil: each key's own bucket in this process
	// TierRate returns the rate limit of an account tier; ok false means the
	// key is not rate limited. nil: no tier limits.
	TierRate func(tier string) (r ratelimit.Rate, ok bool)
	Log      *zap.Logger           // nil: no logs
	Metrics  prometheus.Registerer // nil: no metrics
	Now      func() time.Time      // nil: time.Now

	// OnResponse makes an allowed, priced Check reserve its price rather
	// than debit it: the access log settles it (package settle), or the
	// store commits it SettleTimeout after the Check.
	OnResponse    bool
	SettleTimeout time.Duration // > 0 when OnResponse
}

// Server implements Envoy's ext_authz v3 Authorization service.
type Server struct {
	authv3.UnimplementedAuthorizationServer

	keys     Keys
	routes   *route.Table
	limiter  RateLimiter
	tierRate func(string) (ratelimit.Rate, bool)
	log      *zap.Logger
	now      func() time.Time
	m        *metrics

	onResponse    bool
	settleTimeout time.Duration

	// denyScope holds one Denial per scope, responses included.
	denyScope map[string]*Denial
	// rateDenials holds one 429 per distinct rate, built on first use.
	rateDenials atomic.Pointer[map[ratelimit.Rate]*Denial]
}

var _ authv3.AuthorizationServer = (*Server)(nil)

// New builds a Server.
func New(c Config) (*Server, error) {
	if c.Keys == nil || c.Routes == nil {
		return nil, errors.New("authz: Keys and Routes are required")
	}
	s := &Server{
		keys: c.Keys, routes: c.Routes, limiter: c.Limiter, tierRate: c.TierRate,
		log: c.Log, now: c.Now, onResponse: c.OnResponse, settleTimeout: c.SettleTimeout,
	}
	if s.onResponse && s.settleTimeout <= 0 {
		return nil, errors.New("authz: settling on response needs a positive SettleTimeout")
	}
	if s.tierRate == nil {
		s.tierRate = func(string) (ratelimit.Rate, bool) { return ratelimit.Rate{}, false }
	}
	if s.log == nil {
		s.log = zap.NewNop()
	}
	if s.now == nil {
		s.now = time.Now
	}
	m, err := newMetrics(c.Metrics)
	if err != nil {
		return nil, err
	}
	s.m = m
	s.rateDenials.Store(&map[ratelimit.Rate]*Denial{})
	s.denyScope = map[string]*Denial{}
	for _, scope := range c.Routes.Scopes() {
		s.denyScope[scope] = scopeDenial(scope)
	}
	return s, nil
}

// Check answers one ext_authz request. It never returns an error: every
// request, malformed ones included, gets an allow or a denial. The served
// path (NewGRPCServer) decodes requests with package wire and calls check
// directly; Check is the same decision for callers holding a generated
// CheckRequest.
func (s *Server) Check(_ context.Context, req *authv3.CheckRequest) (*authv3.CheckResponse, error) {
	r := fromProto(req.GetAttributes().GetRequest().GetHttp())
	g, d := s.check(&r)
	if d != nil {
		return d.response(g), nil
	}
	return allowResponse(g), nil
}

// check decides r, counts and logs the outcome, and returns the grant and
// the denial (nil when allowed) for the caller to answer with.
func (s *Server) check(r *request) (grant, *Denial) {
	now := s.now()
	g, d := s.decide(r, now)
	if d != nil {
		if ce := s.log.Check(zap.DebugLevel, "denied"); ce != nil {
			ce.Write(zap.Int("status", d.Status), zap.String("reason", d.Reason),
				zap.String("method", r.method), zap.String("path", withoutQuery(r.path)),
				zap.String("request_id", r.id), zap.String("key_id", g.keyID()))
		}
	}
	s.m.observe(d, time.Since(now))
	return g, d
}

// withoutQuery drops the query string: some clients put credentials there.
func withoutQuery(path string) string {
	if i := strings.IndexByte(path, '?'); i >= 0 {
		return path[:i]
	}
	return path
}

func (g grant) keyID() string {
	if g.key == nil {
		return ""
	}
	return g.key.ID
}
