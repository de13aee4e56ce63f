package authz_test

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/genproto/googleapis/rpc/code"

	"github.com/keygate/keygate/authz"
	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/money"
)

func onResponse(reg prometheus.Registerer) func(*authz.Config) {
	return func(c *authz.Config) {
		c.OnResponse, c.SettleTimeout, c.Metrics = true, 5*time.Minute, reg
	}
}

func withID(secret, id string) map[string]string {
	h := map[string]string{"authorization": "Bearer " + secret}
	if id != "" {
		h["x-request-id"] = id
	}
	return h
}

// In on_response mode an allowed Check reserves the price under its request
// id: nothing is spent until the access log settles it.
func TestOnResponseReserves(t *testing.T) {
	reg := prometheus.NewRegistry()
	f := newFixture(t, onResponse(reg))
	f.account(t, "acme", "tier1", 10_000)
	k, secret := f.key(t, keystore.NewKey{Account: "acme", Scopes: []string{"chat:write"}})

	if o := f.check(t, req("POST", "/v1/chat/completions", withID(secret, "r-1"))); o.status != 200 {
		t.Fatalf("first Check: %+v", o)
	}
	a, _ := f.store.Account("acme")
	ki, _ := f.store.Key(k.ID)
	if a.Balance != 10_000 || a.Reserved != 2000 || ki.Spent != 0 || ki.Reserved != 2000 {
		t.Fatalf("after the Check: balance %d reserved %d, key spent %d reserved %d; want 10000 2000 0 2000",
			a.Balance, a.Reserved, ki.Spent, ki.Reserved)
	}

	// The same id while its reservation is open: 400, nothing reserved.
	o := f.check(t, req("POST", "/v1/chat/completions", withID(secret, "r-1")))
	if o.status != 400 || o.typ != "invalid_request_error" {
		t.Fatalf("duplicate id: %+v, want 400 invalid_request_error", o)
	}
	if a, _ := f.store.Account("acme"); a.Reserved != 2000 {
		t.Fatalf("duplicate id changed the reservation to %d", a.Reserved)
	}

	// Attributes' http.id wins over the header, as Envoy sends both.
	r := req("POST", "/v1/chat/completions", withID(secret, "r-1"))
	r.Attributes.Request.Http.Id = "stream-2"
	if o := f.check(t, r); o.status != 200 {
		t.Fatalf("Check with http.id: %+v", o)
	}
	if got, _ := f.store.Settle("stream-2", true, 0, false); got != keystore.SettleCommitted {
		t.Fatalf("settling by http.id: %v", got)
	}

	if got, charged := f.store.Settle("r-1", true, 3000, true); got != keystore.SettleCommitted || charged != 3000 {
		t.Fatalf("Settle = %v %d, want committed 3000", got, charged)
	}
	if a, _ := f.store.Account("acme"); a.Balance != 10_000-2000-3000 || a.Reserved != 0 {
		t.Fatalf("after settling: %+v", a)
	}
	// The id is free again once settled.
	if o := f.check(t, req("POST", "/v1/chat/completions", withID(secret, "r-1"))); o.status != 200 {
		t.Fatalf("id reused after settlement: %+v", o)
	}
	if n := counter(t, reg, "keygate_reservations_total"); n != 3 {
		t.Errorf("keygate_reservations_total = %v, want 3", n)
	}
}

// Without any request id nothing could settle the request: it is debited at
// once, and counted.
func TestOnResponseWithoutIDDebits(t *testing.T) {
	reg := prometheus.NewRegistry()
	f := newFixture(t, onResponse(reg))
	f.account(t, "acme", "tier1", 10_000)
	_, secret := f.key(t, keystore.NewKey{Account: "acme", Scopes: []string{"chat:write", "chat:read"}})

	if o := f.check(t, req("POST", "/v1/chat/completions", withID(secret, ""))); o.status != 200 {
		t.Fatalf("Check: %+v", o)
	}
	// A free route reserves nothing either way.
	if o := f.check(t, req("GET", "/v1/chat/completions/x", withID(secret, "free-1"))); o.status != 200 {
		t.Fatalf("free Check: %+v", o)
	}
	if a, _ := f.store.Account("acme"); a.Balance != 8000 || a.Reserved != 0 {
		t.Fatalf("account %+v, want balance 8000 and nothing reserved", a)
	}
	if n := counter(t, reg, "keygate_settle_no_request_id_total"); n != 1 {
		t.Errorf("keygate_settle_no_request_id_total = %v, want 1", n)
	}
}

// Reservations hold the balance and the cap under concurrency exactly as
// debits do: 300 concurrent Checks against a balance that covers 100 give
// 100 allows, and a key cap that covers 40 gives 40.
func TestOnResponseConcurrentExact(t *testing.T) {
	for _, tt := range []struct {
		name    string
		balance money.Micros
		cap     money.Micros
		want    int
	}{
		{"balance", 100 * 2000, 0, 100},
		{"cap", 1000 * 2000, 40 * 2000, 40},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t, onResponse(nil))
			f.account(t, "acme", "tier1", tt.balance)
			k, secret := f.key(t, keystore.NewKey{Account: "acme", Scopes: []string{"chat:write"}, SpendCap: tt.cap})
			var (
				wg      sync.WaitGroup
				mu      sync.Mutex
				allowed []string
			)
			for i := range 300 {
				wg.Go(func() {
					id := fmt.Sprintf("req-%d", i)
					if o := f.check(t, req("POST", "/v1/chat/completions", withID(secret, id))); o.status == 200 {
						mu.Lock()
						allowed = append(allowed, id)
						mu.Unlock()
					}
				})
			}
			wg.Wait()
			if len(allowed) != tt.want {
				t.Fatalf("%d allowed, want %d", len(allowed), tt.want)
			}
			for _, id := range allowed {
				if got, _ := f.store.Settle(id, true, 0, false); got != keystore.SettleCommitted {
					t.Fatalf("Settle(%s) = %v", id, got)
				}
			}
			a, _ := f.store.Account("acme")
			ki, _ := f.store.Key(k.ID)
			if want := tt.balance - money.Micros(tt.want)*2000; a.Balance != want || a.Reserved != 0 || ki.Spent != money.Micros(tt.want)*2000 {
				t.Fatalf("after settling all: balance %d (want %d), reserved %d, spent %d", a.Balance, want, a.Reserved, ki.Spent)
			}
		})
	}
}

// counter returns the value of a counter (summed over its labels).
func counter(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			var v float64
			for _, m := range mf.GetMetric() {
				v += m.GetCounter().GetValue()
			}
			return v
		}
	}
	t.Fatalf("metric %s not found", name)
	return 0
}

// failingLedger is a store whose ledger cannot answer (a shared store with
// Redis down).
type failingLedger struct{ *keystore.Store }

func (failingLedger) Debit(*keystore.Key, money.Micros) error {
	return errors.New("redis is unavailable")
}

// A spend the ledger cannot decide is refused with a 503 that tells the
// client to retry, never allowed and never blamed on the balance.
func TestBillingUnavailable(t *testing.T) {
	f := newFixture(t, func(c *authz.Config) { c.Keys = failingLedger{c.Keys.(*keystore.Store)} })
	f.account(t, "acme", "tier1", 10_000)
	_, secret := f.key(t, keystore.NewKey{Account: "acme", Scopes: []string{"chat:write", "chat:read"}})
	o := f.check(t, req("POST", "/v1/chat/completions", withID(secret, "u-1")))
	if o.status != 503 || o.typ != "service_unavailable" || o.headers["retry-after"] != "1" || o.code != code.Code_UNAVAILABLE {
		t.Fatalf("got %+v, want 503 service_unavailable with retry-after 1 and gRPC UNAVAILABLE", o)
	}
	// A free route needs no ledger.
	if o := f.check(t, req("GET", "/v1/chat/completions/x", withID(secret, "u-2"))); o.status != 200 {
		t.Fatalf("free route: %+v", o)
	}
}

// A request id the store cannot hold (client-chosen, too long) is the
// client's mistake: 400, not a 503 blamed on billing.
func TestOnResponseRequestIDTooLong(t *testing.T) {
	f := newFixture(t, onResponse(nil))
	f.account(t, "acme", "tier1", 10_000)
	_, secret := f.key(t, keystore.NewKey{Account: "acme", Scopes: []string{"chat:write"}})
	o := f.check(t, req("POST", "/v1/chat/completions", withID(secret, strings.Repeat("x", 129))))
	if o.status != 400 || o.typ != "invalid_request_error" {
		t.Fatalf("got %+v, want 400 invalid_request_error", o)
	}
	if a, _ := f.store.Account("acme"); a.Balance != 10_000 || a.Reserved != 0 {
		t.Fatalf("account %+v changed", a)
	}
}
