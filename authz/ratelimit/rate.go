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

// unitPer returns the period a unit letter names.
func unitPer(unit string) (time.Duration, bool) {
	switch unit {
	case "s":
		return time.Second, true
	case "m":
		return time.Minute, true
	case "h":
		return time.Hour, true
	case "d":
		return 24 * time.Hour, true
	}
	return 0, false
}

// perUnit is unitPer's inverse.
func perUnit(per time.Duration) (string, bool) {
	switch per {
	case time.Second:
		return "s", true
	case time.Minute:
		return "m", true
	case time.Hour:
		return "h", true
	case 24 * time.Hour:
		return "d", true
	}
	return "", false
}

var errRateSyntax = errors.New("want N/s, N/m, N/h or N/d with N a positive whole number, like 500/m")

// maxN bounds N so that token arithmetic in nanoseconds cannot overflow.
const maxN = 1_000_000_000

// ParseRate parses "N/s", "N/m", "N/h" or "N/d".
func ParseRate(s string) (Rate, error) {
	n, unit, ok := strings.Cut(s, "/")
	per, known := unitPer(unit)
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
	if u, ok := perUnit(r.Per); ok {
		return strconv.FormatInt(r.N, 10) + "/" + u
	}
	return strconv.FormatInt(r.N, 10) + "/" + r.Per.String()
}
