package rlease

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/keygate/keygate/keystore/metric"
)

// Metric names, declared once.
const (
	metricLeaseRequests = "keygate_lease_requests_total"
	metricReturned      = "keygate_lease_returned_micros_total"
	metricOutageSpends  = "keygate_outage_spends_total"
)

// Lease request results.
const (
	resultGranted = "granted" // Redis granted a lease
	resultRefused = "refused" // Redis refused: no balance, cap reached, or rate limit
	resultError   = "error"   // Redis did not answer (breaker open, timeout, error)
)

// leaseMetrics are the counters one lease kind ("money" or "rate")
// increments, resolved once so that counting allocates nothing.
type leaseMetrics struct {
	granted, refused, failed prometheus.Counter
}

// ledgerMetrics are the Ledger's counters.
type ledgerMetrics struct {
	lease         leaseMetrics
	returned      prometheus.Counter
	outageAllowed prometheus.Counter
	outageDenied  prometheus.Counter
}

func newLeaseRequests() *prometheus.CounterVec {
	return prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: metricLeaseRequests,
		Help: "Lease requests to Redis by kind (money, rate) and result (granted, refused, error).",
	}, []string{"kind", "result"})
}

func leaseMetricsFor(v *prometheus.CounterVec, kind string) leaseMetrics {
	return leaseMetrics{
		granted: v.WithLabelValues(kind, resultGranted),
		refused: v.WithLabelValues(kind, resultRefused),
		failed:  v.WithLabelValues(kind, resultError),
	}
}

func newLedgerMetrics(reg prometheus.Registerer) (*ledgerMetrics, error) {
	requests, err := metric.Register(reg, newLeaseRequests())
	if err != nil {
		return nil, err
	}
	returned, err := metric.Register(reg, prometheus.NewCounter(prometheus.CounterOpts{
		Name: metricReturned,
		Help: "Money leases returned to Redis unspent (idle, at shutdown), in micro-dollars.",
	}))
	if err != nil {
		return nil, err
	}
	outage, err := metric.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: metricOutageSpends,
		Help: "Spends that needed Redis while it was unavailable, by result (allowed from the local allowance, denied).",
	}, []string{"result"}))
	if err != nil {
		return nil, err
	}
	return &ledgerMetrics{
		lease:         leaseMetricsFor(requests, "money"),
		returned:      returned,
		outageAllowed: outage.WithLabelValues("allowed"),
		outageDenied:  outage.WithLabelValues("denied"),
	}, nil
}
