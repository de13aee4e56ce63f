package authz

import (
	"errors"
	"fmt"
	"strconv"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"

	"github.com/keygate/keygate/authz/ratelimit"
	"github.com/keygate/keygate/authz/route"
	"github.com/keygate/keygate/keystore"
)

// decide applies the steps of the decision in the order the design gives
// them and returns the response with the denial it carries (nil when allowed).
func (s *Server) decide(req *authv3.CheckRequest, now time.Time) (*authv3.CheckResponse, *Denial) {
	h := req.GetAttributes().GetRequest().GetHttp() // nil-safe: an empty request is unauthenticated

	// 1. Authenticate.
	auth, ok := header(h, "authorization")
	if !ok {
		return s.respNoKey, denyNoKey
	}
	secret, ok := bearer(auth)
	if !ok {
		return s.respNoKey, denyNoKey
	}
	key, ok := s.keys.Lookup(secret, now)
	if !ok {
		return s.respBadKey, denyBadKey // unknown, revoked, expired and malformed read the same
	}

	// 2. Refuse paths that could read differently upstream.
	path, ok := route.CleanPath(h.GetPath())
	if !ok {
		return s.respBadPath, denyBadPath
	}

	// 3. Authorize.
	rt, ok := s.routes.Match(h.GetMethod(), path)
	if !ok {
		d := &Denial{Status: 403, Type: typePermission, Reason: "no_route",
			Message: fmt.Sprintf("No route matches %s %s, so no scope allows it", printable(h.GetMethod()), printable(path))}
		return d.response(), d
	}
	if !key.HasScope(rt.Scope) {
		return s.respScope[rt.Scope], scopeDenial(rt.Scope)
	}

	// 4. Rate limit.
	rate := s.rateFor(key)
	lim := s.limiter.Allow(key.ID, rate, now)
	if !lim.OK {
		d := &Denial{Status: 429, Type: typeRateLimit, Reason: "rate_limit",
			Message: fmt.Sprintf("Rate limit of %s exceeded for this API key; retry after %ds", rate, retrySeconds(lim.RetryAfter))}
		extra := append(rateHeaders(rate, lim), hv("retry-after", strconv.FormatInt(retrySeconds(lim.RetryAfter), 10)))
		return d.response(extra...), d
	}

	// 5. Spend.
	if err := s.keys.Debit(key, rt.Price); err != nil {
		switch {
		case errors.Is(err, keystore.ErrSpendCap):
			return s.respSpendCap, denySpendCap
		default: // ErrInsufficientBalance, or any ledger failure: never allow unpaid
			return s.respBalance, denyBalance
		}
	}
	if rt.Price > 0 {
		s.m.debit(rt.Price)
	}

	// 6. Allow.
	var rh = noRateHeaders
	if !rate.IsZero() {
		rh = rateHeaders(rate, lim)
	}
	return allowResponse(key.ID, key.Account, rh), nil
}

var noRateHeaders []*corev3.HeaderValueOption

// rateFor returns the key's own limit, else its account tier's.
func (s *Server) rateFor(k *keystore.Key) ratelimit.Rate {
	if !k.RateLimit.IsZero() {
		return k.RateLimit
	}
	r, _ := s.tierRate(k.Tier)
	return r
}

// printable caps and quotes client input before it goes into a message.
func printable(s string) string {
	if len(s) > 200 {
		s = s[:200] + "..."
	}
	q := strconv.Quote(s)
	return q[1 : len(q)-1]
}
