package keystore

import (
	"errors"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/keygate/keygate/keystore/money"
)

func TestOutageReportRoundTrip(t *testing.T) {
	tests := []OutageReport{
		{},
		{Replica: "host-1234", Seq: 1<<53 - 1, Spends: []OutageSpend{
			{KeyID: "key_a", Account: "acme", Price: 1},
			{KeyID: "key_a", Account: "zeta", Price: money.Max},
			{KeyID: "key_b", Account: "acme", Price: 100},
		}},
		{Spends: []OutageSpend{{KeyID: "k", Account: "a", Price: 5}}},
	}
	for _, tt := range tests {
		got, err := decodeOutageReport(tt.appendTo(nil))
		if err != nil {
			t.Errorf("decode(%+v): %v", tt, err)
			continue
		}
		if diff := cmp.Diff(tt, got, cmpopts.EquateEmpty()); diff != "" {
			t.Errorf("round trip (-want +got):\n%s", diff)
		}
	}
}

func TestDecodeOutageReportRejects(t *testing.T) {
	enc := func(r OutageReport) []byte { return r.appendTo(nil) }
	one := func(sp ...OutageSpend) OutageReport { return OutageReport{Replica: "r", Seq: 1, Spends: sp} }
	valid := enc(one(OutageSpend{KeyID: "key_a", Account: "acme", Price: 1}))
	tests := []struct {
		name string
		b    []byte
	}{
		{"empty", nil},
		{"version 2", append([]byte{2}, valid[1:]...)},
		{"truncated", valid[:len(valid)-1]},
		{"trailing", append(valid, 0)},
		{"seq without replica", enc(OutageReport{Seq: 1})},
		{"replica without seq", enc(OutageReport{Replica: "r"})},
		{"price 0", enc(one(OutageSpend{KeyID: "key_a", Account: "acme"}))},
		{"price negative", enc(one(OutageSpend{KeyID: "key_a", Account: "acme", Price: -1}))},
		{"price too large", enc(one(OutageSpend{KeyID: "key_a", Account: "acme", Price: money.Max + 1}))},
		{"bad key id", enc(one(OutageSpend{KeyID: "key a", Account: "acme", Price: 1}))},
		{"no account", enc(one(OutageSpend{KeyID: "key_a", Price: 1}))},
		{"duplicate", enc(one(OutageSpend{KeyID: "key_a", Account: "acme", Price: 1}, OutageSpend{KeyID: "key_a", Account: "acme", Price: 1}))},
		{"out of order", enc(one(OutageSpend{KeyID: "key_b", Account: "acme", Price: 1}, OutageSpend{KeyID: "key_a", Account: "acme", Price: 1}))},
		{"count beyond the bytes", []byte{1, 1, 'r', 1, 0x80, 0x80, 0x80, 0x80, 0x08}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if r, err := decodeOutageReport(tt.b); !errors.Is(err, errRecord) {
				t.Errorf("decodeOutageReport = %+v, %v; want errRecord", r, err)
			}
		})
	}
}

// FuzzDecodeOutageReport: any bytes decode or fail without a panic; what
// decodes is a report the journal could have written (IDs valid, prices
// in range, spends sorted and unique), and encodes back to a record that
// decodes the same.
func FuzzDecodeOutageReport(f *testing.F) {
	f.Add((&OutageReport{Replica: "host-1", Seq: 9, Spends: []OutageSpend{
		{KeyID: "key_a", Account: "acme", Price: 100}, {KeyID: "key_b", Account: "acme", Price: money.Max}}}).appendTo(nil))
	f.Add((&OutageReport{Spends: []OutageSpend{{KeyID: "k", Account: "a", Price: 1}}}).appendTo(nil))
	f.Add([]byte{})
	f.Add([]byte{1, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := decodeOutageReport(b)
		if err != nil {
			return
		}
		if (r.Seq == 0) != (r.Replica == "") {
			t.Fatalf("report %d of replica %q decoded", r.Seq, r.Replica)
		}
		for i, sp := range r.Spends {
			if sp.Price <= 0 || sp.Price > money.Max || validateName(sp.KeyID) != nil || validateAccountID(sp.Account) != nil {
				t.Fatalf("spend %d decoded: %+v", i, sp)
			}
			if i > 0 && compareSpends(r.Spends[i-1], sp) >= 0 {
				t.Fatalf("spends %d and %d out of order: %+v", i-1, i, r.Spends)
			}
		}
		again, err := decodeOutageReport(r.appendTo(nil))
		if err != nil {
			t.Fatalf("re-encoded report does not decode: %v", err)
		}
		if diff := cmp.Diff(r, again, cmpopts.EquateEmpty()); diff != "" {
			t.Fatalf("round trip (-first +second):\n%s", diff)
		}
	})
}
