package config

import (
	"errors"
	"fmt"
	"math"
	"strings"
	"time"
)

// ParseDuration parses a non-negative Go duration ("2s", "1h30m", "2160h") in
// which days may also be written with a d unit ("90d", "1d12h", "1.5d"), since
// key lifetimes and rotation periods are naturally counted in days. A day is
// always 24 hours. Negative durations are refused: no flag that takes one
// (--expires-in, --grace) has a meaning for them.
func ParseDuration(s string) (time.Duration, error) {
	if strings.HasPrefix(s, "-") {
		return 0, fmt.Errorf("duration %q: negative durations are not allowed", s)
	}
	rest := strings.TrimPrefix(s, "+") // as time.ParseDuration allows
	if rest == "0" {
		return 0, nil
	}
	if rest == "" {
		return 0, fmt.Errorf("duration %q: %w", s, errDurationSyntax)
	}
	var total time.Duration
	for rest != "" {
		num := rest[:prefixLen(rest, isNumByte)]
		rest = rest[len(num):]
		unit := rest[:prefixLen(rest, func(c byte) bool { return !isNumByte(c) })]
		rest = rest[len(unit):]
		if num == "" || unit == "" {
			return 0, fmt.Errorf("duration %q: %w", s, errDurationSyntax)
		}
		d, err := component(num, unit)
		if err != nil {
			return 0, fmt.Errorf("duration %q: %w", s, err)
		}
		if d > math.MaxInt64-total {
			return 0, fmt.Errorf("duration %q: %w", s, errDurationTooLarge)
		}
		total += d
	}
	return total, nil
}

var (
	errDurationSyntax   = errors.New("want a number and a unit (ns, us, ms, s, m, h or d), like 30s, 1h30m, 2160h or 90d")
	errDurationTooLarge = errors.New("too large (the longest is 2562047h47m16.854775807s, about 106751 days)")
)

// component parses one number and its unit, days included.
func component(num, unit string) (time.Duration, error) {
	days := unit == "d"
	if days {
		unit = "h"
	}
	d, err := time.ParseDuration(num + unit)
	if err != nil {
		if _, unitErr := time.ParseDuration("1" + unit); unitErr == nil && validNumber(num) {
			return 0, errDurationTooLarge // time.ParseDuration's error for an overflow
		}
		return 0, errDurationSyntax
	}
	if days {
		if d > math.MaxInt64/24 {
			return 0, errDurationTooLarge
		}
		d *= 24
	}
	return d, nil
}

// validNumber reports whether num is digits with at most one '.' and at least
// one digit, the number syntax of time.ParseDuration.
func validNumber(num string) bool {
	return strings.Count(num, ".") <= 1 && strings.Trim(num, ".") != ""
}

func isNumByte(c byte) bool { return '0' <= c && c <= '9' || c == '.' }

// prefixLen returns the length of the longest prefix of s whose bytes satisfy ok.
func prefixLen(s string, ok func(byte) bool) int {
	i := 0
	for i < len(s) && ok(s[i]) {
		i++
	}
	return i
}
