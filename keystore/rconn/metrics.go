package rconn

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keygate/keygate/keystore/metric"
)

// Metric names, declared once.
const (
	metricCommands    = "keygate_redis_commands_total"
	metricBreakerOpen = "keygate_redis_breaker_open"
	metricUp          = "keygate_redis_up"
	metricDuration    = "keygate_redis_call_duration_seconds"
)

type metrics struct {
	commands *prometheus.CounterVec
	open, up prometheus.Gauge
	duration prometheus.Histogram
}

// opMetrics are one op's counters, resolved once (label lookups are not
// free) and its refusal error, built once so that a refused Call does not
// allocate.
type opMetrics struct {
	ok, err, refused prometheus.Counter
	refusedErr       error
}

// newMetrics builds the connection's metrics and registers them with reg
// when it is not nil. A collector already registered under the same name (a
// second Conn in one registry, as in tests) is shared.
func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	commands, err := metric.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: metricCommands,
		Help: "Calls to Redis by op and result: ok (Redis answered), error (Redis failed, timed out, or the caller gave up) or refused (breaker open, Redis not called).",
	}, []string{"op", "result"}))
	if err != nil {
		return nil, err
	}
	open, err := metric.Register(reg, prometheus.NewGauge(prometheus.GaugeOpts{
		Name: metricBreakerOpen,
		Help: "1 while the Redis circuit breaker is open (Redis calls refused), else 0.",
	}))
	if err != nil {
		return nil, err
	}
	up, err := metric.Register(reg, prometheus.NewGauge(prometheus.GaugeOpts{
		Name: metricUp,
		Help: "1 while Redis is considered available (breaker closed), 0 during an outage.",
	}))
	if err != nil {
		return nil, err
	}
	duration, err := metric.Register(reg, prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    metricDuration,
		Help:    "Time taken by Redis calls that were not refused, from the call to its answer or failure.",
		Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1},
	}))
	if err != nil {
		return nil, err
	}
	return &metrics{commands: commands, open: open, up: up, duration: duration}, nil
}

// opMetrics returns op's counters, resolving them on op's first call.
func (c *Conn) opMetrics(op string) *opMetrics {
	if v, ok := c.ops.Load(op); ok {
		return v.(*opMetrics)
	}
	om := &opMetrics{
		ok:         c.m.commands.WithLabelValues(op, "ok"),
		err:        c.m.commands.WithLabelValues(op, "error"),
		refused:    c.m.commands.WithLabelValues(op, "refused"),
		refusedErr: fmt.Errorf("%s: %w", op, ErrUnavailable),
	}
	v, _ := c.ops.LoadOrStore(op, om)
	return v.(*opMetrics)
}
