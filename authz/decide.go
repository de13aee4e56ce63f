package authz

import (
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/keygate/keygate/authz/ratelimit"
	"github.com/keygate/keygate/authz/route"
	"github.com/keygate/keygate/keystore"
)

// A grant is what an allowed request gets: the key and its rate-limit state.
// On a rate-limit denial it carries the state for the response headers.
type grant struct {
	key  *keystore.Key
	rate ratelimit.Rate
	lim  ratelimit.Decision
}

// decide applies the steps of the decision in the order the design gives
// them: a grant, or the first denial. It reads only memory and allocates
// nothing on the allow path.
func (s *Server) decide(r *request, now time.Time) (grant, *Denial) {
	// 1. Authenticate.
	if r.authCount != 1 {
		return grant{}, denyNoKey
	}
	secret, ok := bearer(r.auth)
	if !ok {
		return grant{}, denyNoKey
	}
	key, ok := s.keys.Lookup(secret, now)
	if !ok {
		return grant{}, denyBadKey // unknown, revoked, expired and malformed read the same
	}

	// 2. Refuse paths that an upstream could read differently than the table.
	path, ok := route.CleanPath(r.path)
	if !ok {
		return grant{}, denyBadPath
	}

	// 3. Authorize.
	rt, ok := s.routes.Match(r.method, path)
	if !ok {
		return grant{}, &Denial{Status: 403, Type: typePermission, Reason: "no_route",
			Message: fmt.Sprintf("No route matches %s %s, so no scope allows it", printable(r.method), printable(path))}
	}
	if !key.HasScope(rt.Scope) {
		return grant{}, s.denyScope[rt.Scope]
	}

	// 4. Rate limit.
	g := grant{key: key, rate: s.rateFor(key)}
	if s.limiter != nil {
		g.lim = s.limiter.Allow(key.ID, g.rate, now)
	} else {
		g.lim = key.RateBucket().Take(g.rate, now)
	}
	if !g.lim.OK {
		return g, s.rateDenial(g.rate)
	}

	// 5. Spend: debit now, or reserve until the access log says how the
	// request ended.
	if rt.Price > 0 && s.onResponse {
		if id := r.settleID(); id != "" {
			err := s.keys.Reserve(key, id, rt.Price, rt.MaxPrice, now.Add(s.settleTimeout))
			if err != nil {
				return g, spendDenial(err)
			}
			s.m.reserve(key, rt.Price)
			return g, nil
		}
		s.m.noRequestID.Inc() // nothing could settle it: charged now
	}
	if rt.Price == 0 {
		return g, nil // a free route needs no ledger
	}
	if err := s.keys.Debit(key, rt.Price); err != nil {
		return g, spendDenial(err)
	}
	s.m.debit(key, rt.Price)
	return g, nil
}

// spendDenial answers a failed debit or reservation.
func spendDenial(err error) *Denial {
	switch {
	case errors.Is(err, keystore.ErrInsufficientBalance):
		return denyBalance
	case errors.Is(err, keystore.ErrSpendCap):
		return denySpendCap
	case errors.Is(err, keystore.ErrDuplicateRequest):
		return denyDuplicate
	case errors.Is(err, keystore.ErrInvalid):
		return denyRequestID // the only argument a client controls: its request id
	}
	// The ledger could not say (a shared store that is unreachable, or
	// has lost its data): refused, never allowed unpaid, and not blamed on
	// the customer's balance.
	return denyBilling
}

// rateDenial returns the 429 for keys limited to r. Its body is built once
// per distinct rate; the retry-after and rate headers come from the grant.
func (s *Server) rateDenial(r ratelimit.Rate) *Denial {
	if d, ok := (*s.rateDenials.Load())[r]; ok {
		return d
	}
	d := &Denial{Status: 429, Type: typeRateLimit, Reason: "rate_limit", rateLimited: true,
		Message: fmt.Sprintf("Rate limit of %s exceeded for this API key; retry after the seconds in retry-after", r)}
	d.encoded = d.body()
	for { // copy on write: Checks read the map without a lock
		old := s.rateDenials.Load()
		next := make(map[ratelimit.Rate]*Denial, len(*old)+1)
		for k, v := range *old {
			next[k] = v
		}
		next[r] = d
		if s.rateDenials.CompareAndSwap(old, &next) {
			return d
		}
	}
}

// rateFor returns the key's own limit, else its account tier's.
func (s *Server) rateFor(k *keystore.Key) ratelimit.Rate {
	if !k.RateLimit.IsZero() {
		return k.RateLimit
	}
	r, _ := s.tierRate(k.Tier())
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
