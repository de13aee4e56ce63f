package authz

import (
	"strings"
	"testing"
)

func TestBearer(t *testing.T) {
	tests := []struct {
		give string
		want string
		ok   bool
	}{
		{"Bearer kg_abc", "kg_abc", true},
		{"bearer kg_abc", "kg_abc", true},
		{"BEARER kg_abc", "kg_abc", true},
		{"Bearer   kg_abc  ", "kg_abc", true},
		{"Bearer kg_abc\t", "kg_abc", true},
		{"Bearer", "", false},
		{"Bearer ", "", false},
		{"Bearer    ", "", false},
		{"Basic a2dfYWJj", "", false},
		{"Bearerkg_abc", "", false},
		{"Bearer kg_a kg_b", "", false},
		{"Bearer kg_a,Bearer kg_b", "", false}, // two headers folded into one
		{"Bearer kg_a\tkg_b", "", false},
		{"", "", false},
		{"kg_abc", "", false},
	}
	for _, tt := range tests {
		got, ok := bearer(tt.give)
		if got != tt.want || ok != tt.ok {
			t.Errorf("bearer(%q) = %q, %v; want %q, %v", tt.give, got, ok, tt.want, tt.ok)
		}
	}
}

// FuzzBearer: an accepted token is one word taken from the header, after a
// case-insensitive "Bearer " scheme; nothing panics.
func FuzzBearer(f *testing.F) {
	for _, s := range []string{"Bearer kg_abc", "bearer  x ", "Basic x", "Bearer a,b", "Bearer \x00", "Bearer é"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, v string) {
		tok, ok := bearer(v)
		if !ok {
			if tok != "" {
				t.Fatalf("bearer(%q) refused but returned %q", v, tok)
			}
			return
		}
		if tok == "" || strings.ContainsAny(tok, " \t,") || !strings.Contains(v, tok) {
			t.Fatalf("bearer(%q) accepted %q", v, tok)
		}
		if !strings.EqualFold(v[:7], "bearer ") {
			t.Fatalf("bearer(%q) accepted a scheme other than Bearer", v)
		}
	})
}
