// Package money holds keygate's one representation of an amount of money:
// integer micro-dollars. Floats never carry money, so a price, a balance and
// a spend add up exactly however many requests there are.
package money

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
)

// Micros is an amount in millionths of a US dollar.
type Micros int64

// PerUSD is the number of Micros in one dollar.
const PerUSD Micros = 1_000_000

// Max is the largest amount keygate accepts: about 9.2 trillion dollars, so
// that adding two accepted amounts can be checked for overflow cheaply.
const Max Micros = math.MaxInt64 / 2

var (
	errEmpty     = errors.New("empty amount")
	errNegative  = errors.New("negative amounts are not allowed")
	errPrecision = errors.New("more than 6 decimal places (the smallest unit is 0.000001)")
	errTooLarge  = errors.New("amount too large (the largest is 4611686018427.387903)")
	errSyntax    = errors.New("want digits with at most one '.', like 0.002")
)

// ParseUSD parses a non-negative decimal dollar amount with at most six
// decimal places ("10", "0.5", "0.000150", also ".5") into Micros. Signs,
// exponents, spaces, thousands separators and currency symbols are refused:
// an operator typing a price should get exactly what they typed or an error
// that says why. Zeros past the sixth decimal place change nothing and are
// accepted ("0.1000000"); other digits there are refused, never rounded.
func ParseUSD(s string) (Micros, error) {
	if s == "" {
		return 0, errEmpty
	}
	if s[0] == '-' {
		return 0, fmt.Errorf("%q: %w", s, errNegative)
	}
	whole, frac, hasDot := strings.Cut(s, ".")
	if problem := syntaxProblem(whole, frac); problem != "" {
		return 0, fmt.Errorf("%q: %s; %w", s, problem, errSyntax)
	}
	switch {
	case whole == "" && frac == "":
		return 0, fmt.Errorf("%q: no digits; %w", s, errSyntax)
	case hasDot && frac == "":
		return 0, fmt.Errorf("%q: nothing after the decimal point; %w", s, errSyntax)
	}
	frac = strings.TrimRight(frac, "0")
	if len(frac) > 6 {
		return 0, fmt.Errorf("%q: %w", s, errPrecision)
	}
	var w int64
	if whole != "" {
		var err error
		w, err = strconv.ParseInt(whole, 10, 64)
		if err != nil || w > int64(Max/PerUSD) {
			return 0, fmt.Errorf("%q: %w", s, errTooLarge)
		}
	}
	var f int64
	if frac != "" {
		f, _ = strconv.ParseInt(frac+strings.Repeat("0", 6-len(frac)), 10, 64) // 1 to 6 digits
	}
	m := Micros(w)*PerUSD + Micros(f)
	if m > Max {
		return 0, fmt.Errorf("%q: %w", s, errTooLarge)
	}
	return m, nil
}

// syntaxProblem names what keeps whole and frac (the parts around the first
// '.') from being digits, or returns "".
func syntaxProblem(whole, frac string) string {
	for _, part := range [2]string{whole, frac} {
		for i := 0; i < len(part); i++ {
			switch c := part[i]; {
			case '0' <= c && c <= '9':
			case c == '.':
				return "more than one '.'"
			case c == ',' || c == '_' || c == '\'':
				return "no thousands separators"
			case c == ' ' || c == '\t' || c == '\n' || c == '\r':
				return "no spaces"
			case c == 'e' || c == 'E':
				return "no exponents"
			case c == '+':
				return "no signs"
			case c == '$':
				return "no currency symbols (amounts are in US dollars)"
			default:
				return "not a decimal number"
			}
		}
	}
	return ""
}

// USD formats m as a decimal dollar string with no trailing zeros beyond the
// cents: 2000 → "0.002", 1_500_000 → "1.50", -250 → "-0.00025".
// ParseUSD(m.USD()) == m for every m from 0 to Max.
func (m Micros) USD() string {
	neg := m < 0
	u := uint64(m)
	if neg {
		u = uint64(-(m + 1)) + 1 // -MinInt64 overflows; this does not
	}
	whole, frac := u/uint64(PerUSD), u%uint64(PerUSD)
	fs := strconv.FormatUint(frac+uint64(PerUSD), 10)[1:] // six digits, zero-padded
	fs = strings.TrimRight(fs, "0")
	for len(fs) < 2 {
		fs += "0"
	}
	sign := ""
	if neg {
		sign = "-"
	}
	return sign + strconv.FormatUint(whole, 10) + "." + fs
}

// String implements fmt.Stringer as "$" + USD.
func (m Micros) String() string { return "$" + m.USD() }
