package settle_test

import (
	"strings"
	"testing"

	"github.com/keygate/keygate/authz/settle"
	"github.com/keygate/keygate/keystore/money"
)

func TestParseCost(t *testing.T) {
	tests := []struct {
		give   string
		want   money.Micros
		wantOK bool
	}{
		{give: "0.0042", want: 4200, wantOK: true},
		{give: "1", want: 1_000_000, wantOK: true},
		{give: "0", want: 0, wantOK: true},
		{give: ".5", want: 500_000, wantOK: true},
		{give: "0.000001", want: 1, wantOK: true},
		{give: "0.1000000", want: 100_000, wantOK: true}, // zeros past the sixth place are exact
		{give: " 0.25\t", want: 250_000, wantOK: true},   // optional whitespace around a field value
		{give: "4611686018427.387903", want: money.Max, wantOK: true},
		{give: ""},
		{give: " "},
		{give: "-0.01"},
		{give: "+0.01"},
		{give: "0.0000001"}, // a seventh significant decimal: never rounded
		{give: "1e-3"},
		{give: "$0.01"},
		{give: "0,01"},
		{give: "0.01,0.02"}, // Envoy joins a repeated header with ","
		{give: "0.01 USD"},
		{give: "0x10"},
		{give: "1."},
		{give: "."},
		{give: "1..2"},
		{give: "NaN"},
		{give: "4611686018427.387904"},
		{give: "99999999999999999999"},
		{give: "0\n"},
	}
	for _, tt := range tests {
		t.Run(tt.give, func(t *testing.T) {
			got, ok := settle.ParseCost(tt.give)
			if got != tt.want || ok != tt.wantOK {
				t.Errorf("ParseCost(%q) = %d, %v; want %d, %v", tt.give, got, ok, tt.want, tt.wantOK)
			}
		})
	}
}

// FuzzParseCost: no input panics, and an accepted cost is exactly the
// decimal the upstream wrote: digits and at most one '.', the same number
// as the amount's canonical form, within money's range.
func FuzzParseCost(f *testing.F) {
	for _, s := range []string{"0.0042", "1", ".5", "0.1000000", "-1", "1e3", "0.0000001", " 2 "} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, v string) {
		m, ok := settle.ParseCost(v)
		if !ok {
			if m != 0 {
				t.Fatalf("ParseCost(%q) refused it but returned %d", v, m)
			}
			return
		}
		if m < 0 || m > money.Max {
			t.Fatalf("ParseCost(%q) = %d: out of range", v, m)
		}
		d := strings.Trim(v, " \t")
		if strings.Trim(d, "0123456789.") != "" || strings.Count(d, ".") > 1 {
			t.Fatalf("ParseCost(%q) accepted a value that is not a plain decimal", v)
		}
		if canonical(d) != canonical(m.USD()) {
			t.Fatalf("ParseCost(%q) = %d (%s): not the same amount", v, m, m.USD())
		}
	})
}

// canonical writes a plain decimal without leading zeros in its whole part
// or trailing zeros in its fraction, so that equal amounts compare equal.
func canonical(d string) string {
	whole, frac, _ := strings.Cut(d, ".")
	whole = strings.TrimLeft(whole, "0")
	frac = strings.TrimRight(frac, "0")
	if whole == "" {
		whole = "0"
	}
	return whole + "." + frac
}
