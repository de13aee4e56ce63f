package rlease

import (
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/keygate/keygate/authz/ratelimit"
	"github.com/keygate/keygate/keystore/rconn/rconntest"
)

// TestMetrics: a Ledger and a Limiter on one registry share
// keygate_lease_requests_total, each with its kind.
func TestMetrics(t *testing.T) {
	srv := rconntest.Start(t)
	c := dial(t, srv)
	a := newAdmin(t, c)
	a.account("a", 1000)
	k := a.key("k", "a", 0)
	reg := prometheus.NewRegistry()
	l := ledger(t, c, LedgerOptions{ReplicaID: "r", Metrics: reg})
	lim := NewLimiter(c, LimiterOptions{ReplicaID: "r", Metrics: reg})

	_ = l.Spend(k, 600)                    // granted
	_ = l.Spend(k, 600)                    // refused: 400 left
	_ = l.Spend(a.key("k2", "none", 0), 1) // refused: no account none in Redis
	r := ratelimit.Rate{N: 1, Per: time.Hour}
	now := time.Unix(1_800_000_000, 0)
	lim.Allow("k", r, now)                       // granted
	lim.Allow("k", r, now.Add(2*maxRefusalWait)) // refused

	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, f := range families {
		if f.GetName() != metricLeaseRequests {
			continue
		}
		for _, m := range f.GetMetric() {
			var kind, result string
			for _, lp := range m.GetLabel() {
				switch lp.GetName() {
				case "kind":
					kind = lp.GetValue()
				case "result":
					result = lp.GetValue()
				}
			}
			got[kind+"/"+result] = m.GetCounter().GetValue()
		}
	}
	want := map[string]float64{
		"money/granted": 1, "money/refused": 2, "money/error": 0,
		"rate/granted": 1, "rate/refused": 1, "rate/error": 0,
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("%s (-want +got):\n%s", metricLeaseRequests, diff)
	}
}
