package money

import (
	"math"
	"math/big"
	"regexp"
	"strings"
	"testing"
)

func TestParseUSD(t *testing.T) {
	tests := []struct {
		give string
		want Micros
	}{
		{"10", 10_000_000},
		{"0", 0},
		{"0.0", 0},
		{"0.5", 500_000},
		{".5", 500_000}, // accepted on purpose: what an operator means is clear
		{".000001", 1},
		{"0.000150", 150},
		{"0.002", 2000},
		{"0.0001", 100},
		{"0.04", 40_000},
		{"1.50", 1_500_000},
		{"1.234567", 1_234_567},
		{"007.10", 7_100_000},
		{"0.1000000000", 100_000}, // zeros past the sixth place change nothing
		{"0.000001", 1},
		{"4611686018427", 4_611_686_018_427_000_000},
		{"4611686018427.387903", Max},
		{"00000000000000000000000000001", PerUSD},
	}
	for _, tt := range tests {
		t.Run(tt.give, func(t *testing.T) {
			got, err := ParseUSD(tt.give)
			if err != nil {
				t.Fatalf("ParseUSD(%q): %v", tt.give, err)
			}
			if got != tt.want {
				t.Errorf("ParseUSD(%q) = %d, want %d", tt.give, got, tt.want)
			}
		})
	}
}

func TestParseUSDErrors(t *testing.T) {
	const syntax = "want digits with at most one '.', like 0.002"
	tests := []struct {
		give    string
		wantErr string
	}{
		{"", "empty amount"},
		{"-1", `"-1": negative amounts are not allowed`},
		{"-0.5", `"-0.5": negative amounts are not allowed`},
		{"0.0000001", `"0.0000001": more than 6 decimal places (the smallest unit is 0.000001)`},
		{"1.1234567", `"1.1234567": more than 6 decimal places (the smallest unit is 0.000001)`},
		{"4611686018427.387904", `"4611686018427.387904": amount too large (the largest is 4611686018427.387903)`},
		{"4611686018428", `"4611686018428": amount too large (the largest is 4611686018427.387903)`},
		{"9223372036854775808", `"9223372036854775808": amount too large (the largest is 4611686018427.387903)`},
		{"99999999999999999999999999", `"99999999999999999999999999": amount too large (the largest is 4611686018427.387903)`},
		{".", `".": no digits; ` + syntax},
		{"1.", `"1.": nothing after the decimal point; ` + syntax},
		{"1.2.3", `"1.2.3": more than one '.'; ` + syntax},
		{"..5", `"..5": more than one '.'; ` + syntax},
		{"1e3", `"1e3": no exponents; ` + syntax},
		{"1E-3", `"1E-3": no exponents; ` + syntax},
		{"1,000", `"1,000": no thousands separators; ` + syntax},
		{"1_000", `"1_000": no thousands separators; ` + syntax},
		{"1'000", `"1'000": no thousands separators; ` + syntax},
		{"$1", `"$1": no currency symbols (amounts are in US dollars); ` + syntax},
		{"1$", `"1$": no currency symbols (amounts are in US dollars); ` + syntax},
		{" 1", `" 1": no spaces; ` + syntax},
		{"1 ", `"1 ": no spaces; ` + syntax},
		{"1\n", `"1\n": no spaces; ` + syntax},
		{"+1", `"+1": no signs; ` + syntax},
		{"abc", `"abc": not a decimal number; ` + syntax},
		{"0x10", `"0x10": not a decimal number; ` + syntax},
		{"1/2", `"1/2": not a decimal number; ` + syntax},
		{"NaN", `"NaN": not a decimal number; ` + syntax},
		{"€1", `"€1": not a decimal number; ` + syntax},
		{"１", `"１": not a decimal number; ` + syntax}, // a full-width digit
	}
	for _, tt := range tests {
		t.Run(tt.give, func(t *testing.T) {
			got, err := ParseUSD(tt.give)
			if err == nil {
				t.Fatalf("ParseUSD(%q) = %d, want error %q", tt.give, got, tt.wantErr)
			}
			if err.Error() != tt.wantErr {
				t.Errorf("ParseUSD(%q) error:\n got %s\nwant %s", tt.give, err, tt.wantErr)
			}
		})
	}
}

func TestErrTooLargeNamesMax(t *testing.T) {
	if want := "(the largest is " + Max.USD() + ")"; !strings.Contains(errTooLarge.Error(), want) {
		t.Errorf("errTooLarge = %q, want it to contain %q", errTooLarge, want)
	}
}

func TestUSD(t *testing.T) {
	tests := []struct {
		give Micros
		want string
	}{
		{0, "0.00"},
		{1, "0.000001"},
		{150, "0.00015"},
		{2000, "0.002"},
		{10_000, "0.01"},
		{500_000, "0.50"},
		{1_500_000, "1.50"},
		{1_230_000, "1.23"},
		{1_234_567, "1.234567"},
		{10_000_000, "10.00"},
		{-250, "-0.00025"},
		{-1_000_000, "-1.00"},
		{Max, "4611686018427.387903"},
		{math.MaxInt64, "9223372036854.775807"},
		{math.MinInt64, "-9223372036854.775808"},
	}
	for _, tt := range tests {
		t.Run(tt.want, func(t *testing.T) {
			if got := tt.give.USD(); got != tt.want {
				t.Errorf("Micros(%d).USD() = %q, want %q", tt.give, got, tt.want)
			}
		})
	}
}

func TestString(t *testing.T) {
	if got, want := Micros(2000).String(), "$0.002"; got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
}

func TestUSDRoundTrip(t *testing.T) {
	for _, m := range []Micros{0, 1, 9, 10, 99, 100, 999_999, PerUSD, PerUSD + 1, 123_456_789_012, Max - 1, Max} {
		got, err := ParseUSD(m.USD())
		if err != nil || got != m {
			t.Errorf("ParseUSD(%q) = %d, %v; want %d", m.USD(), got, err, m)
		}
	}
}

// plainDecimal is the syntax ParseUSD accepts, written independently of it.
var plainDecimal = regexp.MustCompile(`^([0-9]+(\.[0-9]+)?|\.[0-9]+)$`)

// FuzzParseUSD checks ParseUSD against exact rational arithmetic: it accepts
// exactly the plain decimals of at most six significant places from 0 to Max,
// returns their exact value in Micros, and USD formats that value back into
// text ParseUSD reads as the same amount. And it never panics.
// The seeds are in testdata/fuzz/FuzzParseUSD.
func FuzzParseUSD(f *testing.F) {
	million := big.NewRat(int64(PerUSD), 1)
	maxRat := new(big.Rat).SetInt64(int64(Max))
	f.Fuzz(func(t *testing.T, s string) {
		m, err := ParseUSD(s)

		// The reference: the exact value in micros, if s is a plain decimal.
		var want *big.Rat
		if plainDecimal.MatchString(s) {
			r, ok := new(big.Rat).SetString(s)
			if !ok {
				t.Fatalf("big.Rat cannot read %q", s)
			}
			want = r.Mul(r, million)
		}
		wantOK := want != nil && want.IsInt() && want.Cmp(maxRat) <= 0

		if err != nil {
			if wantOK {
				t.Fatalf("ParseUSD(%q) refused a valid amount (%s micros): %v", s, want.RatString(), err)
			}
			if m != 0 {
				t.Fatalf("ParseUSD(%q) = %d with error %v", s, m, err)
			}
			return
		}
		if !wantOK {
			t.Fatalf("ParseUSD(%q) = %d, want an error", s, m)
		}
		if got := new(big.Rat).SetInt64(int64(m)); got.Cmp(want) != 0 {
			t.Fatalf("ParseUSD(%q) = %d, want %s", s, m, want.RatString())
		}
		back, err := ParseUSD(m.USD())
		if err != nil || back != m {
			t.Fatalf("ParseUSD(%q) = %d, but ParseUSD(%q) = %d, %v", s, m, m.USD(), back, err)
		}
	})
}

func BenchmarkParseUSD(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		if _, err := ParseUSD("0.000150"); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkUSD(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		_ = Micros(1_234_567).USD()
	}
}
