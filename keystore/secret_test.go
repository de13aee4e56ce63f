package keystore

import (
	"hash/crc32"
	"strings"
	"testing"
	"time"

	"github.com/keygate/keygate/keystore/money"
)

func TestNewSecret(t *testing.T) {
	seen := map[string]bool{}
	for range 1000 {
		s, h, err := newSecret()
		if err != nil {
			t.Fatal(err)
		}
		if len(s) != 41 || !strings.HasPrefix(s, "kg_") || !ValidSecretFormat(s) {
			t.Fatalf("newSecret = %q: not a valid secret", s)
		}
		if h != hashSecret(s) {
			t.Fatalf("hash mismatch for %q", s)
		}
		if seen[s] {
			t.Fatalf("secret %q twice", s)
		}
		seen[s] = true
	}
}

func TestChecksumIsCRC32(t *testing.T) {
	for _, s := range []string{"", "a", "0123456789abcdefghijABCDEFGHIJ01", strings.Repeat("z", 32)} {
		if got, want := checksum(s), crc32.ChecksumIEEE([]byte(s)); got != want {
			t.Errorf("checksum(%q) = %#x, want %#x", s, got, want)
		}
	}
}

func TestValidSecretFormat(t *testing.T) {
	const good = "kg_0123456789abcdefghijABCDEFGHIJ01"
	valid := string(appendChecksum([]byte(good), good[3:]))
	tests := []struct {
		name   string
		secret string
		want   bool
	}{
		{"valid", valid, true},
		{"empty", "", false},
		{"no prefix", "xx" + valid[2:], false},
		{"upper-case prefix", "KG_" + valid[3:], false},
		{"one short", valid[:40], false},
		{"one long", valid + "0", false},
		{"bad checksum", valid[:40] + string(rune(valid[40]^1)), false},
		{"non-base62 in the random part", valid[:5] + "-" + valid[6:], false},
		{"non-base62 in the checksum", valid[:38] + "_" + valid[39:], false},
		{"space", valid[:10] + " " + valid[11:], false},
		{"multi-byte", valid[:10] + "é" + valid[12:], false},
		{"checksum of another body", valid[:3] + "1" + valid[4:], false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := ValidSecretFormat(tt.secret); got != tt.want {
				t.Errorf("ValidSecretFormat(%q) = %v, want %v", tt.secret, got, tt.want)
			}
		})
	}
}

// FuzzValidSecretFormat: never panics; whatever it accepts has the shape;
// a secret built from any 32 base62 characters is accepted, and changing any
// one of its characters to another base62 character makes it refused (CRC32
// catches every single-character change).
func FuzzValidSecretFormat(f *testing.F) {
	f.Add("kg_0123456789abcdefghijABCDEFGHIJ01Xyz", uint8(3), uint8(7))
	f.Add("", uint8(0), uint8(0))
	f.Add("kg_", uint8(40), uint8(61))
	f.Add("Bearer kg_zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz000000", uint8(12), uint8(1))
	f.Fuzz(func(t *testing.T, in string, pos, sub uint8) {
		if ValidSecretFormat(in) {
			if len(in) != secretLen || !strings.HasPrefix(in, secretPrefix) {
				t.Fatalf("accepted %q", in)
			}
		}
		// Build a valid secret from the input's bytes.
		body := make([]byte, secretRandLen)
		for i := range body {
			var c byte
			if i < len(in) {
				c = in[i]
			}
			body[i] = base62Alphabet[int(c)%62]
		}
		s := append([]byte(secretPrefix), body...)
		s = appendChecksum(s, string(body))
		if !ValidSecretFormat(string(s)) {
			t.Fatalf("refused a built secret %q", s)
		}
		i := len(secretPrefix) + int(pos)%(secretRandLen+secretSumLen)
		c := base62Alphabet[int(sub)%62]
		if c == s[i] {
			return
		}
		s[i] = c
		if ValidSecretFormat(string(s)) {
			t.Fatalf("accepted %q with character %d changed", s, i)
		}
	})
}

func TestHotPathAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates")
	}
	s, err := Open(t.TempDir()+"/keygate.db", Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	if _, err := s.CreateAccount("acme", "free", money.Max, now); err != nil {
		t.Fatal(err)
	}
	_, secret, err := s.CreateKey(NewKey{Account: "acme", Scopes: []string{"a", "b"}}, now)
	if err != nil {
		t.Fatal(err)
	}
	var k *Key
	tests := []struct {
		name string
		f    func()
	}{
		{"ValidSecretFormat", func() { ValidSecretFormat(secret) }},
		{"Lookup", func() { k, _ = s.Lookup(secret, now) }},
		{"Lookup of garbage", func() { s.Lookup("kg_garbage", now) }},
		{"HasScope", func() { k.HasScope("b") }},
		{"Debit", func() { s.Debit(k, 1) }},
		{"Debit refused", func() { s.Debit(k, money.Max) }},
	}
	for _, tt := range tests {
		if got := testing.AllocsPerRun(100, tt.f); got != 0 {
			t.Errorf("%s: %v allocations per call, want 0", tt.name, got)
		}
	}
}
