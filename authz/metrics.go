package authz

import (
	"strconv"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keygate/keygate/keystore/money"
)

// reasons are every value of the reason label; their counters are resolved
// once so that a Check never builds a label set.
var reasons = []struct {
	reason string
	status int
}{
	{"no_key", 401}, {"invalid_key", 401}, {"bad_path", 400}, {"no_route", 403},
	{"scope", 403}, {"rate_limit", 429}, {"balance", 429}, {"spend_cap", 429},
	{"malformed", 400}, {"internal", 503},
}

type metrics struct {
	allowed prometheus.Counter
	denied  map[string]prometheus.Counter // by reason
	latency prometheus.Observer
	// Debits are plain atomics read by CounterFuncs: a float counter's Add
	// is a compare-and-swap loop that Checks on every core would contend on.
	debits, debited atomic.Int64
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	checks := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "keygate_checks_total",
		Help: "ext_authz Checks answered, by result (allow or deny), HTTP status and reason.",
	}, []string{"result", "status", "reason"})
	latency := prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "keygate_check_duration_seconds",
		Help:    "Time to decide a Check, inside keygate (gRPC transport excluded).",
		Buckets: []float64{1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 1e-3, 1e-2},
	})
	m := &metrics{
		allowed: checks.WithLabelValues("allow", "200", ""),
		denied:  map[string]prometheus.Counter{},
		latency: latency,
	}
	debits := prometheus.NewCounterFunc(prometheus.CounterOpts{
		Name: "keygate_debits_total",
		Help: "Priced requests debited from account balances.",
	}, func() float64 { return float64(m.debits.Load()) })
	debited := prometheus.NewCounterFunc(prometheus.CounterOpts{
		Name: "keygate_debited_micros_total",
		Help: "Amount debited from account balances, in micro-USD.",
	}, func() float64 { return float64(m.debited.Load()) })
	if reg != nil {
		for _, c := range []prometheus.Collector{checks, latency, debits, debited} {
			if err := reg.Register(c); err != nil {
				return nil, err
			}
		}
	}
	for _, r := range reasons {
		m.denied[r.reason] = checks.WithLabelValues("deny", strconv.Itoa(r.status), r.reason)
	}
	return m, nil
}

func (m *metrics) observe(d *Denial, took time.Duration) {
	m.latency.Observe(took.Seconds())
	if d == nil {
		m.allowed.Inc()
		return
	}
	if c, ok := m.denied[d.Reason]; ok {
		c.Inc()
	}
}

func (m *metrics) debit(price money.Micros) {
	m.debits.Add(1)
	m.debited.Add(int64(price))
}
