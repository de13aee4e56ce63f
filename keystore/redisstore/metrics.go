package redisstore

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/metric"
)

// Reasons for a full sync, the label of keygate_redis_mirror_syncs_total.
const (
	syncStart   = "start"   // Run's first round
	syncGap     = "gap"     // the stream skipped a version: trimmed past this replica, or an entry lost
	syncVersion = "version" // P version is not what the stream gave: a change lost, or Redis went back
	syncError   = "error"   // Redis failed (an outage, a bad entry): read everything again
)

type metrics struct {
	dataLost prometheus.Gauge
	syncs    *prometheus.CounterVec
	changes  prometheus.Counter

	expired      prometheus.Counter
	settleErrors prometheus.Counter
}

// newMetrics builds the metrics and registers them with reg when it is not
// nil. A collector already registered under the same name (a second store
// in one registry, as in tests) is shared rather than refused.
func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	lost, err := metric.Register(reg, prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "keygate_redis_data_lost",
		Help: "1 when Redis has lost keygate's data (its marker is missing or changed): spending fails closed until an operator recovers.",
	}))
	if err != nil {
		return nil, err
	}
	syncs, err := metric.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "keygate_redis_mirror_syncs_total",
		Help: "Full syncs of the local key mirror from Redis, by reason (start, gap, version, error).",
	}, []string{"reason"}))
	if err != nil {
		return nil, err
	}
	changes, err := metric.Register(reg, prometheus.NewCounter(prometheus.CounterOpts{
		Name: "keygate_redis_mirror_changes_total",
		Help: "Entries of the Redis change stream applied to the local key mirror.",
	}))
	if err != nil {
		return nil, err
	}
	// The local store of serve registers the same counter (in Redis mode
	// it expires nothing): one definition, shared.
	expired, err := keystore.ExpiredReservations(reg)
	if err != nil {
		return nil, err
	}
	settleErrors, err := metric.Register(reg, prometheus.NewCounter(prometheus.CounterOpts{
		Name: "keygate_settle_errors_total",
		Help: "Settlements that Redis did not apply (unavailable, too slow, or an error): each such reservation is committed at its price when settle_timeout passes.",
	}))
	if err != nil {
		return nil, err
	}
	for _, r := range []string{syncStart, syncGap, syncVersion, syncError} {
		syncs.WithLabelValues(r)
	}
	return &metrics{dataLost: lost, syncs: syncs, changes: changes, expired: expired, settleErrors: settleErrors}, nil
}
