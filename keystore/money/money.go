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
	errTooLarge  = errors.New("amount too large")
)

// ParseUSD parses a non-negative decimal dollar amount with at most six
// decimal places ("10", "0.5", "0.000150") into Micros. Signs, exponents,
// thousands separators and currency symbols are refused: an operator typing a
// price should get exactly what they typed or an error that says why.
func ParseUSD(s string) (Micros, error) {
	if s == "" {
		return 0, errEmpty
	}
	if s[0] == '-' {
		return 0, fmt.Errorf("%q: %w", s, errNegative)
	}
	whole, frac, hasDot := strings.Cut(s, ".")
	if whole == "" && (!hasDot || frac == "") {
		return 0, fmt.Errorf("%q: not a decimal number", s)
	}
	if hasDot && frac == "" {
		return 0, fmt.Errorf("%q: nothing after the decimal point", s)
	}
	if !digits(whole) || !digits(frac) {
		return 0, fmt.Errorf("%q: not a decimal number (use digits and one '.', like 0.002)", s)
	}
	if len(strings.TrimRight(frac, "0")) > 6 {
		return 0, fmt.Errorf("%q: %w", s, errPrecision)
	}
	frac = strings.TrimRight(frac, "0")
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
		f, _ = strconv.ParseInt(frac+strings.Repeat("0", 6-len(frac)), 10, 64)
	}
	m := Micros(w)*PerUSD + Micros(f)
	if m > Max {
		return 0, fmt.Errorf("%q: %w", s, errTooLarge)
	}
	return m, nil
}

func digits(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// USD formats m as a decimal dollar string with no trailing zeros beyond the
// cents: 2000 → "0.002", 1_500_000 → "1.50", -250 → "-0.00025".
// ParseUSD(m.USD()) == m for every non-negative m.
func (m Micros) USD() string {
	neg := m < 0
	u := uint64(m)
	if neg {
		u = uint64(-(m + 1)) + 1 // -MinInt64 overflows; this does not
	}
	whole, frac := u/1_000_000, u%1_000_000
	fs := fmt.Sprintf("%06d", frac)
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
