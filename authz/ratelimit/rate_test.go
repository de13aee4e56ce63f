package ratelimit

import (
	"strings"
	"testing"
	"time"
)

func TestParseRate(t *testing.T) {
	tests := []struct {
		give string
		want Rate
	}{
		{"500/m", Rate{N: 500, Per: time.Minute}},
		{"1/s", Rate{N: 1, Per: time.Second}},
		{"20/h", Rate{N: 20, Per: time.Hour}},
		{"1/d", Rate{N: 1, Per: 24 * time.Hour}},
		{"1000000000/s", Rate{N: 1_000_000_000, Per: time.Second}},
		{"007/m", Rate{N: 7, Per: time.Minute}},
	}
	for _, tt := range tests {
		t.Run(tt.give, func(t *testing.T) {
			got, err := ParseRate(tt.give)
			if err != nil {
				t.Fatalf("ParseRate(%q): %v", tt.give, err)
			}
			if got != tt.want {
				t.Errorf("ParseRate(%q) = %+v, want %+v", tt.give, got, tt.want)
			}
		})
	}
}

func TestParseRateErrors(t *testing.T) {
	const syntax = "want N/s, N/m, N/h or N/d with N a positive whole number, like 500/m"
	tests := []struct {
		give    string
		wantErr string
	}{
		{"", `rate limit "": ` + syntax},
		{"500", `rate limit "500": ` + syntax},
		{"500/", `rate limit "500/": ` + syntax},
		{"/m", `rate limit "/m": ` + syntax},
		{"500/M", `rate limit "500/M": ` + syntax},
		{"500/min", `rate limit "500/min": ` + syntax},
		{"500/w", `rate limit "500/w": ` + syntax},
		{"500/m/s", `rate limit "500/m/s": ` + syntax},
		{"-5/m", `rate limit "-5/m": ` + syntax},
		{"+5/m", `rate limit "+5/m": ` + syntax},
		{"5.5/m", `rate limit "5.5/m": ` + syntax},
		{"1e3/m", `rate limit "1e3/m": ` + syntax},
		{" 5/m", `rate limit " 5/m": ` + syntax},
		{"5 /m", `rate limit "5 /m": ` + syntax},
		{"5/m ", `rate limit "5/m ": ` + syntax},
		{"1_000/m", `rate limit "1_000/m": ` + syntax},
		{"0/m", `rate limit "0/m": N must be between 1 and 1000000000`},
		{"000/s", `rate limit "000/s": N must be between 1 and 1000000000`},
		{"1000000001/s", `rate limit "1000000001/s": N must be between 1 and 1000000000`},
		{"99999999999999999999999/s", `rate limit "99999999999999999999999/s": N must be between 1 and 1000000000`},
	}
	for _, tt := range tests {
		t.Run(tt.give, func(t *testing.T) {
			got, err := ParseRate(tt.give)
			if err == nil {
				t.Fatalf("ParseRate(%q) = %+v, want error %q", tt.give, got, tt.wantErr)
			}
			if err.Error() != tt.wantErr {
				t.Errorf("ParseRate(%q) error:\n got %q\nwant %q", tt.give, err, tt.wantErr)
			}
		})
	}
}

func TestRateString(t *testing.T) {
	tests := []struct {
		give Rate
		want string
	}{
		{Rate{}, ""},
		{Rate{N: 500, Per: time.Minute}, "500/m"},
		{Rate{N: 1, Per: time.Second}, "1/s"},
		{Rate{N: 3, Per: time.Hour}, "3/h"},
		{Rate{N: 2, Per: 24 * time.Hour}, "2/d"},
		{Rate{N: 5, Per: 90 * time.Second}, "5/1m30s"}, // not a ParseRate form; still readable
	}
	for _, tt := range tests {
		t.Run(tt.want, func(t *testing.T) {
			if got := tt.give.String(); got != tt.want {
				t.Errorf("%+v.String() = %q, want %q", tt.give, got, tt.want)
			}
		})
	}
}

func TestRateIsZero(t *testing.T) {
	if !(Rate{}).IsZero() {
		t.Error("Rate{}.IsZero() = false")
	}
	if (Rate{N: 1, Per: time.Second}).IsZero() {
		t.Error("Rate{1/s}.IsZero() = true")
	}
}

// FuzzParseRate checks that ParseRate never panics, that whatever it accepts is
// a valid limit, and that String gives back text ParseRate reads as the same
// Rate.
// The seeds are in testdata/fuzz/FuzzParseRate.
func FuzzParseRate(f *testing.F) {
	f.Fuzz(func(t *testing.T, s string) {
		r, err := ParseRate(s)
		if err != nil {
			if !strings.HasPrefix(err.Error(), "rate limit ") {
				t.Fatalf("ParseRate(%q) error %q does not say what it parsed", s, err)
			}
			return
		}
		if r.N < 1 || r.N > maxN {
			t.Fatalf("ParseRate(%q).N = %d, out of range", s, r.N)
		}
		if _, ok := perUnit(r.Per); !ok {
			t.Fatalf("ParseRate(%q).Per = %v, not a unit", s, r.Per)
		}
		back, err := ParseRate(r.String())
		if err != nil {
			t.Fatalf("ParseRate(%q) = %+v, whose String %q does not parse: %v", s, r, r.String(), err)
		}
		if back != r {
			t.Fatalf("round trip of %q: %+v → %q → %+v", s, r, r.String(), back)
		}
	})
}
