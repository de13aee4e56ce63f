package authz

import (
	"math"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/protobuf/proto"

	"github.com/keygate/keygate/authz/ratelimit"
	"github.com/keygate/keygate/authz/wire"
	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/keystoretest"
	"github.com/keygate/keygate/keystore/money"
)

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

// The served path encodes its allow response straight to bytes; Check
// builds the generated message. Both must say the same thing to Envoy.
func TestEncodeAllowMatchesMessage(t *testing.T) {
	k := newKey(t)
	limited := ratelimit.Rate{N: 60, Per: time.Minute}
	for _, g := range []grant{
		{key: k}, // no rate limit: no x-ratelimit-* headers
		{key: k, rate: limited, lim: ratelimit.Decision{OK: true, Limit: 60, Remaining: 59, Reset: 1500 * time.Millisecond}},
		{key: k, rate: limited, lim: ratelimit.Decision{OK: true, Limit: 60, Remaining: 0}},
		{key: k, rate: limited, lim: ratelimit.Decision{OK: true, Limit: math.MaxInt64, Remaining: math.MaxInt64, Reset: math.MaxInt64}},
	} {
		served := decodeFrozen(t, encodeAllow(g))
		if want := allowResponse(g); !proto.Equal(served, want) {
			t.Errorf("grant %+v: served\n%v\nCheck says\n%v", g.lim, served, want)
		}
		if n := len(served.GetOkResponse().GetResponseHeadersToAdd()); g.rate.IsZero() != (n == 0) {
			t.Errorf("grant %+v: %d rate-limit headers", g.lim, n)
		}
	}
}

// decodeFrozen is what Envoy reads from f.
func decodeFrozen(t *testing.T, f *wire.Frozen) *authv3.CheckResponse {
	t.Helper()
	out, err := wire.Codec{}.Marshal(f)
	if err != nil {
		t.Fatal(err)
	}
	var resp authv3.CheckResponse
	if err := proto.Unmarshal(out.Materialize(), &resp); err != nil {
		t.Fatalf("decoding a served response: %v", err)
	}
	return &resp
}

// Every denial the served path encodes says what Check's says.
func TestEncodeDenialMatchesResponse(t *testing.T) {
	k := newKey(t)
	s := &Server{}
	s.rateDenials.Store(&map[ratelimit.Rate]*Denial{})
	limited := ratelimit.Rate{N: 60, Per: time.Minute}
	rateDenied := grant{key: k, rate: limited, lim: ratelimit.Decision{Limit: 60, RetryAfter: 2500 * time.Millisecond, Reset: time.Minute}}
	for _, c := range []struct {
		d *Denial
		g grant
	}{
		{denyNoKey, grant{}}, {denyBadKey, grant{}}, {denyBadPath, grant{}}, {denyBalance, grant{}},
		{denySpendCap, grant{}}, {denyDuplicate, grant{}}, {denyRequestID, grant{}}, {denyMalformed, grant{}},
		{denyBilling, grant{}}, {denyInternal, grant{}}, {scopeDenial("chat:write"), grant{}},
		{&Denial{Status: 403, Type: typePermission, Reason: "no_route", Message: "No route matches GET /x, so no scope allows it"}, grant{}},
		{s.rateDenial(limited), rateDenied},
	} {
		served, want := decodeFrozen(t, c.d.encode(c.g)), c.d.response(c.g)
		if !proto.Equal(served, want) {
			t.Errorf("%s: served\n%v\nCheck says\n%v", c.d.Reason, served, want)
		}
		if served.GetDeniedResponse().GetStatus().GetCode() != typev3.StatusCode(c.d.Status) || served.GetDeniedResponse().GetBody() == "" {
			t.Errorf("%s: served %v for a %d denial", c.d.Reason, served, c.d.Status)
		}
	}
	h := map[string]string{}
	for _, o := range decodeFrozen(t, s.rateDenial(limited).encode(rateDenied)).GetDeniedResponse().GetHeaders() {
		h[o.GetHeader().GetKey()] = o.GetHeader().GetValue()
	}
	if h["retry-after"] != "3" || h["x-ratelimit-limit-requests"] != "60" || h["x-ratelimit-remaining-requests"] != "0" || h["x-ratelimit-reset-requests"] != "60s" {
		t.Errorf("429 headers %v", h)
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
