package authz

import (
	"strconv"
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
	debits  prometheus.Counter
	debited prometheus.Counter
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
	debits := prometheus.NewCounter(prometheus.CounterOpts{
		Name: "keygate_debits_total",
		Help: "Priced requests debited from account balances.",
	})
	debited := prometheus.NewCounter(prometheus.CounterOpts{
		Name: "keygate_debited_micros_total",
		Help: "Amount debited from account balances, in micro-USD.",
	})
	if reg != nil {
		for _, c := range []prometheus.Collector{checks, latency, debits, debited} {
			if err := reg.Register(c); err != nil {
				return nil, err
			}
		}
	}
	m := &metrics{
		allowed: checks.WithLabelValues("allow", "200", ""),
		denied:  map[string]prometheus.Counter{},
		latency: latency,
		debits:  debits,
		debited: debited,
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
	m.debits.Inc()
	m.debited.Add(float64(price))
}
