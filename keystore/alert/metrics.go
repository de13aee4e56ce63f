package alert

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/metric"
)

// Metric names, declared once.
const (
	metricAlerts     = "keygate_alerts_total"
	metricOverflow   = "keygate_alerts_queue_overflow_total"
	metricDeliveries = "keygate_alert_deliveries_total"
	metricPending    = "keygate_alerts_pending"
)

type metrics struct {
	alerts            *prometheus.CounterVec
	overflow          prometheus.Counter
	ok, retry, gaveUp prometheus.Counter
	pending           prometheus.Gauge
}

// newMetrics builds the notifier's metrics and registers them with reg when
// it is not nil. A collector already registered under the same name (a
// second notifier in one registry, as in tests) is shared.
func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	alerts, err := metric.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: metricAlerts,
		Help: "Alerts raised (thresholds crossed), by type.",
	}, []string{"type"}))
	if err != nil {
		return nil, err
	}
	overflow, err := metric.Register(reg, prometheus.NewCounter(prometheus.CounterOpts{
		Name: metricOverflow,
		Help: "Alerts the in-memory queue had no room for; they wait in the outbox.",
	}))
	if err != nil {
		return nil, err
	}
	deliveries, err := metric.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: metricDeliveries,
		Help: "Webhook delivery attempts by result: ok, retry (failed, tried again later), gave_up (failed past the maximum age).",
	}, []string{"result"}))
	if err != nil {
		return nil, err
	}
	pending, err := metric.Register(reg, prometheus.NewGauge(prometheus.GaugeOpts{
		Name: metricPending,
		Help: "Alerts in memory not yet delivered or given up: queued, in flight or waiting to retry.",
	}))
	if err != nil {
		return nil, err
	}
	for _, t := range []string{keystore.AlertKeySpend, keystore.AlertAccountBalanceLow} {
		alerts.WithLabelValues(t) // exported as 0 before the first alert
	}
	return &metrics{
		alerts:   alerts,
		overflow: overflow,
		ok:       deliveries.WithLabelValues("ok"),
		retry:    deliveries.WithLabelValues("retry"),
		gaveUp:   deliveries.WithLabelValues("gave_up"),
		pending:  pending,
	}, nil
}
