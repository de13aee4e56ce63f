package authz

import (
	"math"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/protobuf/proto"

	"github.com/keygate/keygate/authz/ratelimit"
	"github.com/keygate/keygate/authz/wire"
	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/keystoretest"
	"github.com/keygate/keygate/keystore/money"
)

// The served path encodes its allow response straight to bytes; Check
// builds the generated message. Both must say the same thing to Envoy.
// newKey is a key of a new store's one account, as Lookup returns it.
func newKey(t *testing.T) *keystore.Key {
	st := keystoretest.Open(t)
	now := time.Now()
	if _, err := st.CreateAccount("acct-1", "free", money.PerUSD, now); err != nil {
		t.Fatal(err)
	}
	_, secret, err := st.CreateKey(keystore.NewKey{Account: "acct-1", Scopes: []string{"chat:write"}}, now)
	if err != nil {
		t.Fatal(err)
	}
	k, ok := st.Lookup(secret, now)
	if !ok {
		t.Fatal("Lookup of a new key failed")
	}
	return k
}

func TestEncodeAllowMatchesMessage(t *testing.T) {
	k := newKey(t)
	limited := ratelimit.Rate{N: 60, Per: time.Minute}
	for _, g := range []grant{
		{key: k}, // no rate limit: no x-ratelimit-* headers
		{key: k, rate: limited, lim: ratelimit.Decision{OK: true, Limit: 60, Remaining: 59, Reset: 1500 * time.Millisecond}},
		{key: k, rate: limited, lim: ratelimit.Decision{OK: true, Limit: 60, Remaining: 0}},
		{key: k, rate: limited, lim: ratelimit.Decision{OK: true, Limit: math.MaxInt64, Remaining: math.MaxInt64, Reset: math.MaxInt64}},
	} {
		out, err := wire.Codec{}.Marshal(encodeAllow(g))
		if err != nil {
			t.Fatal(err)
		}
		var served authv3.CheckResponse
		if err := proto.Unmarshal(out.Materialize(), &served); err != nil {
			t.Fatalf("decoding the served allow: %v", err)
		}
		out.Free()
		if want := allowResponse(g); !proto.Equal(&served, want) {
			t.Errorf("grant %+v: served\n%v\nCheck says\n%v", g.lim, &served, want)
		}
		if n := len(served.GetOkResponse().GetResponseHeadersToAdd()); g.rate.IsZero() != (n == 0) {
			t.Errorf("grant %+v: %d rate-limit headers", g.lim, n)
		}
	}
}

func TestEncodeAllowAllocs(t *testing.T) {
	k := newKey(t)
	g := grant{key: k, rate: ratelimit.Rate{N: 60, Per: time.Minute}, lim: ratelimit.Decision{OK: true, Limit: 60, Remaining: 59, Reset: time.Second}}
	var sink *wire.Frozen
	if n := testing.AllocsPerRun(100, func() { sink = encodeAllow(g) }); n > 2 {
		t.Errorf("an encoded allow costs %v allocations, want 2: its bytes and their wire.Frozen", n)
	}
	_ = sink
}
