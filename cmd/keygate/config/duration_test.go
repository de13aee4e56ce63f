package config

import (
	"math"
	"strings"
	"testing"
	"time"
)

func TestParseDuration(t *testing.T) {
	const day = 24 * time.Hour
	tests := []struct {
		give string
		want time.Duration
	}{
		{"0", 0},
		{"+0", 0},
		{"0s", 0},
		{"0d", 0},
		{"2s", 2 * time.Second},
		{"1h30m", 90 * time.Minute},
		{"2160h", 90 * day},
		{"90d", 90 * day},
		{"1d12h", 36 * time.Hour},
		{"12h1d", 36 * time.Hour}, // any order, as Go's
		{"1.5d", 36 * time.Hour},
		{".5d", 12 * time.Hour},
		{"1d1d", 2 * day},
		{"1d0.5h", 24*time.Hour + 30*time.Minute},
		{"300ms", 300 * time.Millisecond},
		{"1µs", time.Microsecond},
		{"1us", time.Microsecond},
		{"1ns", 1},
		{"+5s", 5 * time.Second},
		{"106751d", 106751 * day},
		{"2562047h47m16.854775807s", math.MaxInt64},
		{"106751d23h47m16.854775807s", math.MaxInt64},
	}
	for _, tt := range tests {
		t.Run(tt.give, func(t *testing.T) {
			got, err := ParseDuration(tt.give)
			if err != nil {
				t.Fatalf("ParseDuration(%q): %v", tt.give, err)
			}
			if got != tt.want {
				t.Errorf("ParseDuration(%q) = %v, want %v", tt.give, got, tt.want)
			}
		})
	}
}

func TestParseDurationErrors(t *testing.T) {
	const (
		syntax   = "want a number and a unit (ns, us, ms, s, m, h or d), like 30s, 1h30m, 2160h or 90d"
		tooLarge = "too large (the longest is 2562047h47m16.854775807s, about 106751 days)"
	)
	tests := []struct {
		give    string
		wantErr string
	}{
		{"-1h", `duration "-1h": negative durations are not allowed`},
		{"-0", `duration "-0": negative durations are not allowed`},
		{"-90d", `duration "-90d": negative durations are not allowed`},
		{"abc", `duration "abc": ` + syntax},
		{"", `duration "": ` + syntax},
		{"+", `duration "+": ` + syntax},
		{"90", `duration "90": ` + syntax},
		{"d", `duration "d": ` + syntax},
		{"1d2", `duration "1d2": ` + syntax},
		{"1w", `duration "1w": ` + syntax},
		{"1D", `duration "1D": ` + syntax},
		{"1 d", `duration "1 d": ` + syntax},
		{" 1d", `duration " 1d": ` + syntax},
		{"1..5d", `duration "1..5d": ` + syntax},
		{".d", `duration ".d": ` + syntax},
		{"1h-1m", `duration "1h-1m": ` + syntax},
		{"1d+1h", `duration "1d+1h": ` + syntax},
		{"++1h", `duration "++1h": ` + syntax},
		{"106752d", `duration "106752d": ` + tooLarge},
		{"2562048h", `duration "2562048h": ` + tooLarge},
		{"99999999999999999999s", `duration "99999999999999999999s": ` + tooLarge},
		{"106751d24h", `duration "106751d24h": ` + tooLarge},
		{"2562047h47m16.854775808s", `duration "2562047h47m16.854775808s": ` + tooLarge},
	}
	for _, tt := range tests {
		t.Run(tt.give, func(t *testing.T) {
			got, err := ParseDuration(tt.give)
			if err == nil {
				t.Fatalf("ParseDuration(%q) = %v, want error %q", tt.give, got, tt.wantErr)
			}
			if err.Error() != tt.wantErr {
				t.Errorf("ParseDuration(%q) error:\n got %s\nwant %s", tt.give, err, tt.wantErr)
			}
		})
	}
}

func TestErrDurationTooLargeNamesMax(t *testing.T) {
	if want := time.Duration(math.MaxInt64).String(); !strings.Contains(errDurationTooLarge.Error(), want) {
		t.Errorf("errDurationTooLarge = %q, want it to name %s", errDurationTooLarge, want)
	}
}

// FuzzParseDuration checks that ParseDuration never panics, never returns a
// negative duration, agrees with time.ParseDuration wherever no day unit is
// involved, and reads back what time.Duration.String writes.
// The seeds are in testdata/fuzz/FuzzParseDuration.
func FuzzParseDuration(f *testing.F) {
	f.Fuzz(func(t *testing.T, s string) {
		d, err := ParseDuration(s)
		if err == nil && d < 0 {
			t.Fatalf("ParseDuration(%q) = %v, negative", s, d)
		}
		if err != nil && d != 0 {
			t.Fatalf("ParseDuration(%q) = %v with error %v", s, d, err)
		}
		if err == nil {
			back, err := ParseDuration(d.String())
			if err != nil || back != d {
				t.Fatalf("ParseDuration(%q) = %v, but ParseDuration(%q) = %v, %v", s, d, d.String(), back, err)
			}
		}
		if strings.Contains(s, "d") || strings.HasPrefix(s, "-") {
			return
		}
		want, wantErr := time.ParseDuration(s)
		if (err == nil) != (wantErr == nil) || d != want {
			t.Fatalf("ParseDuration(%q) = %v, %v; time.ParseDuration says %v, %v", s, d, err, want, wantErr)
		}
	})
}
