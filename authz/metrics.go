package authz

import (
	"strconv"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keygate/keygate/keystore"
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
	{"malformed", 400}, {"internal", 503}, {"duplicate_request", 400}, {"billing_unavailable", 503}, {"bad_request_id", 400},
}

type metrics struct {
	allowed prometheus.Counter
	denied  map[string]prometheus.Counter // by reason
	latency prometheus.Observer
	// Debits are striped atomics read by CounterFuncs: one shared counter
	// (let alone a float counter's compare-and-swap loop) would bounce its
	// cache line between the cores of every priced Check.
	debits [16]debitStripe
	// noRequestID counts priced Checks that had to be debited at once in
	// on_response mode: with no request ID, no log entry could settle them.
	noRequestID prometheus.Counter
}

type debitStripe struct {
	n, micros         atomic.Int64
	reserved, rmicros atomic.Int64
	_                 [48]byte // a cache line each
}

func (m *metrics) sum(f func(*debitStripe) int64) float64 {
	var t int64
	for i := range m.debits {
		t += f(&m.debits[i])
	}
	return float64(t)
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
	}, func() float64 { return m.sum(func(d *debitStripe) int64 { return d.n.Load() }) })
	debited := prometheus.NewCounterFunc(prometheus.CounterOpts{
		Name: "keygate_debited_micros_total",
		Help: "Amount debited from account balances, in micro-USD.",
	}, func() float64 { return m.sum(func(d *debitStripe) int64 { return d.micros.Load() }) })
	reserved := prometheus.NewCounterFunc(prometheus.CounterOpts{
		Name: "keygate_reservations_total",
		Help: "Priced requests whose price was reserved at the Check, to be settled from the access log (settle: on_response).",
	}, func() float64 { return m.sum(func(d *debitStripe) int64 { return d.reserved.Load() }) })
	reservedMicros := prometheus.NewCounterFunc(prometheus.CounterOpts{
		Name: "keygate_reserved_micros_total",
		Help: "Amount reserved at Checks, in micro-USD (what settlement then commits or releases).",
	}, func() float64 { return m.sum(func(d *debitStripe) int64 { return d.rmicros.Load() }) })
	m.noRequestID = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "keygate_settle_no_request_id_total",
		Help: "Priced Checks debited at once in on_response mode because they carried no request id to settle by.",
	})
	if reg != nil {
		for _, c := range []prometheus.Collector{checks, latency, debits, debited, reserved, reservedMicros, m.noRequestID} {
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

// debit counts a debit in the stripe of the key it was made with, so that
// Checks for different keys touch different cache lines.
func (m *metrics) reserve(k *keystore.Key, price money.Micros) {
	d := &m.debits[(uintptr(unsafe.Pointer(k))>>7)%uintptr(len(m.debits))]
	d.reserved.Add(1)
	d.rmicros.Add(int64(price))
}

func (m *metrics) debit(k *keystore.Key, price money.Micros) {
	d := &m.debits[(uintptr(unsafe.Pointer(k))>>7)%uintptr(len(m.debits))]
	d.n.Add(1)
	d.micros.Add(int64(price))
}
