package ratelimit

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// A Rate is a token-bucket limit: a burst of N requests, refilled at N per Per.
// The zero Rate means "no limit set" (a key without its own limit falls back to
// its account tier's).
type Rate struct {
	N   int64
	Per time.Duration
}

// IsZero reports whether no limit is set.
func (r Rate) IsZero() bool { return r.N == 0 }

var units = map[string]time.Duration{
	"s": time.Second,
	"m": time.Minute,
	"h": time.Hour,
	"d": 24 * time.Hour,
}

var errRateSyntax = errors.New("want N/s, N/m, N/h or N/d with N a positive whole number, like 500/m")

// maxN bounds N so that token arithmetic in nanoseconds cannot overflow.
const maxN = 1_000_000_000

// ParseRate parses "N/s", "N/m", "N/h" or "N/d".
func ParseRate(s string) (Rate, error) {
	n, unit, ok := strings.Cut(s, "/")
	per, known := units[unit]
	if !ok || !known || n == "" {
		return Rate{}, fmt.Errorf("rate limit %q: %w", s, errRateSyntax)
	}
	for i := 0; i < len(n); i++ {
		if n[i] < '0' || n[i] > '9' {
			return Rate{}, fmt.Errorf("rate limit %q: %w", s, errRateSyntax)
		}
	}
	v, err := strconv.ParseInt(n, 10, 64)
	if err != nil || v <= 0 || v > maxN {
		return Rate{}, fmt.Errorf("rate limit %q: N must be between 1 and %d", s, maxN)
	}
	return Rate{N: v, Per: per}, nil
}

// String returns the rate in the form ParseRate reads, or "" for the zero Rate.
func (r Rate) String() string {
	if r.IsZero() {
		return ""
	}
	for u, d := range units {
		if d == r.Per {
			return strconv.FormatInt(r.N, 10) + "/" + u
		}
	}
	return strconv.FormatInt(r.N, 10) + "/" + r.Per.String()
}
