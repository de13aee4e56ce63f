package keystore

import (
	"bytes"
	"encoding/binary"
	"errors"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/keygate/keygate/authz/ratelimit"
	"github.com/keygate/keygate/keystore/money"
)

func TestKeyRecordRoundTrip(t *testing.T) {
	tests := []keyRecord{
		{Account: "a", Scopes: []string{"x"}},
		{
			Hash: [hashSize]byte{1, 2, 3, 31: 9}, Account: "acme", Name: "prod — ünïcode", Scopes: []string{"chat:write", "chat:read"},
			RateLimit: ratelimit.Rate{N: 500, Per: time.Minute}, SpendCap: money.Max,
			CreatedAt: 1, ExpiresAt: maxNanos, RevokedAt: -5, RotatedTo: "key_0123456789abcdef",
		},
	}
	for _, rec := range tests {
		v, err := decodeKey(rec.appendTo(nil))
		if err != nil {
			t.Fatalf("decode %+v: %v", rec, err)
		}
		got := keyRecord{
			Hash: v.hash, Account: string(v.account), Name: string(v.name), Scopes: v.scopeList(),
			RateLimit: v.rate, SpendCap: v.spendCap, CreatedAt: v.createdAt, ExpiresAt: v.expiresAt,
			RevokedAt: v.revokedAt, RotatedTo: string(v.rotatedTo),
		}
		if diff := cmp.Diff(rec, got); diff != "" {
			t.Errorf("round trip (-want +got):\n%s", diff)
		}
		if !bytes.Equal(v.scopes, appendScopes(nil, rec.Scopes)) {
			t.Errorf("encoded scopes %x are not the interning key %x", v.scopes, appendScopes(nil, rec.Scopes))
		}
	}
}

func TestDecodeKeyRefuses(t *testing.T) {
	good := (&keyRecord{Account: "a", Scopes: []string{"x"}, SpendCap: 5}).appendTo(nil)
	tests := []struct {
		name string
		b    []byte
	}{
		{"empty", nil},
		{"version 2", append([]byte{2}, good[1:]...)},
		{"truncated", good[:len(good)-1]},
		{"trailing byte", append(bytes.Clone(good), 0)},
		{"negative cap", (&keyRecord{Account: "a", SpendCap: -1}).appendTo(nil)},
		{"cap past money.Max", (&keyRecord{Account: "a", SpendCap: money.Max + 1}).appendTo(nil)},
		{"negative rate", (&keyRecord{Account: "a", RateLimit: ratelimit.Rate{N: -1}}).appendTo(nil)},
		{"too many scopes", (&keyRecord{Account: "a", Scopes: make([]string, maxScopes+1)}).appendTo(nil)},
		{"huge length", append([]byte{1}, append(make([]byte, hashSize), 0xff, 0xff, 0xff, 0xff, 0x0f)...)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := decodeKey(tt.b); !errors.Is(err, errRecord) {
				t.Errorf("decodeKey = %v, want errRecord", err)
			}
		})
	}
}

// FuzzDecodeKey: any bytes decode or fail without a panic, and what decodes
// encodes back to a record that decodes the same.
func FuzzDecodeKey(f *testing.F) {
	f.Add((&keyRecord{Account: "acme", Name: "n", Scopes: []string{"a", "b"}, RateLimit: ratelimit.Rate{N: 5, Per: time.Second},
		SpendCap: 7, CreatedAt: 1, ExpiresAt: 2, RevokedAt: 3, RotatedTo: "key_x"}).appendTo(nil))
	f.Add([]byte{})
	f.Add([]byte{1})
	f.Fuzz(func(t *testing.T, b []byte) {
		v, err := decodeKey(b)
		if err != nil {
			return
		}
		rec := keyRecord{
			Hash: v.hash, Account: string(v.account), Name: string(v.name), Scopes: v.scopeList(),
			RateLimit: v.rate, SpendCap: v.spendCap, CreatedAt: v.createdAt, ExpiresAt: v.expiresAt,
			RevokedAt: v.revokedAt, RotatedTo: string(v.rotatedTo), CapPeriod: v.capPeriod,
		}
		if len(rec.Scopes) != v.nScopes {
			t.Fatalf("%d scopes decoded, header says %d", len(rec.Scopes), v.nScopes)
		}
		again, err := decodeKey(rec.appendTo(nil))
		if err != nil {
			t.Fatalf("re-encoded record does not decode: %v", err)
		}
		if diff := cmp.Diff(v, again, cmp.AllowUnexported(keyView{}), cmp.Comparer(func(a, b []byte) bool { return bytes.Equal(a, b) })); diff != "" {
			t.Fatalf("round trip (-first +second):\n%s", diff)
		}
	})
}

func FuzzDecodeAccount(f *testing.F) {
	f.Add((&accountRecord{Tier: "free", CreatedAt: 1767322000000000000}).appendTo(nil))
	f.Add([]byte{1, 0, 0})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		v, err := decodeAccount(b)
		if err != nil {
			return
		}
		again, err := decodeAccount((&accountRecord{Tier: string(v.tier), CreatedAt: v.createdAt, AlertBelow: v.alertBelow}).appendTo(nil))
		if err != nil || !bytes.Equal(again.tier, v.tier) || again.createdAt != v.createdAt || again.alertBelow != v.alertBelow {
			t.Fatalf("round trip: %+v, %v; want %+v", again, err, v)
		}
	})
}

func FuzzGetMicros(f *testing.F) {
	f.Add([]byte{0, 0, 0, 0, 0, 0, 0, 1})
	f.Add([]byte{0x80, 0, 0, 0, 0, 0, 0, 0})
	f.Add([]byte{1})
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := getMicros(b)
		if err != nil {
			return
		}
		if m < 0 || m > money.Max || !bytes.Equal(microsValue(m), b) {
			t.Fatalf("getMicros(%x) = %d", b, m)
		}
	})
}

// Schema 2's encoders of a balance and a spend, which getBalance and
// getSpend still read (from an old file being upgraded, and from ledger
// slots): the tests build what they decode with them.

// microsValue returns the 8-byte encoding of m.
func microsValue(m money.Micros) []byte { return binary.BigEndian.AppendUint64(nil, uint64(m)) }

// putSpend encodes a key's spend, with the number of its cap period when
// it has one, into b (12 bytes) and returns the used part.
func putSpend(b []byte, m money.Micros, period int32) []byte {
	binary.BigEndian.PutUint64(b, uint64(m))
	if period == 0 {
		return b[:8]
	}
	binary.BigEndian.PutUint32(b[8:], uint32(period))
	return b[:12]
}
