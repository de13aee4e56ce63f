package settle

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/metric"
)

// Values of keygate_access_log_entries_ignored_total's reason label.
const (
	ignoredNotFinal    = "not_final"     // logged at request start, periodically, or per upstream attempt
	ignoredTCP         = "tcp"           // TCP entries: keygate reserves for HTTP requests only
	ignoredNoRequestID = "no_request_id" // neither request_id nor an x-request-id header
	ignoredDenied      = "denied"        // keygate denied the request: it reserved nothing
)

type metrics struct {
	settlements map[keystore.Settled]prometheus.Counter
	costInvalid prometheus.Counter
	ignored     map[string]prometheus.Counter
	micros      prometheus.Counter
}

// newMetrics registers the settlement metrics on reg (nil: unregistered
// counters). A registry that already has them, from an earlier Server in
// the same process, shares its counters.
func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	settlements, err1 := metric.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "keygate_settlements_total",
		Help: "Final access-log entries settled, by what the ledger did: committed, released, or unknown (no open reservation for the request id).",
	}, []string{"result"}))
	costInvalid, err2 := metric.Register(reg, prometheus.NewCounter(prometheus.CounterOpts{
		Name: "keygate_settle_cost_header_invalid_total",
		Help: "Cost headers that were not a non-negative USD amount with at most 6 decimal places; the route's price applied instead.",
	}))
	ignored, err3 := metric.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "keygate_access_log_entries_ignored_total",
		Help: "Access-log entries that settle nothing, by reason: not_final, tcp, no_request_id, denied (keygate refused the request, so it reserved nothing).",
	}, []string{"reason"}))
	micros, err4 := metric.Register(reg, prometheus.NewCounter(prometheus.CounterOpts{
		Name: "keygate_settled_micros_total",
		Help: "Amount charged by committed settlements, in micro-USD.",
	}))
	if err := errors.Join(err1, err2, err3, err4); err != nil {
		return nil, err
	}
	m := &metrics{
		settlements: map[keystore.Settled]prometheus.Counter{},
		costInvalid: costInvalid,
		ignored:     map[string]prometheus.Counter{},
		micros:      micros,
	}
	for _, r := range []keystore.Settled{keystore.SettleUnknown, keystore.SettleCommitted, keystore.SettleReleased} {
		m.settlements[r] = settlements.WithLabelValues(r.String())
	}
	for _, r := range []string{ignoredNotFinal, ignoredTCP, ignoredNoRequestID, ignoredDenied} {
		m.ignored[r] = ignored.WithLabelValues(r)
	}
	return m, nil
}

// settled returns the counter of result; a value this package does not know
// counts as unknown.
func (m *metrics) settled(result keystore.Settled) prometheus.Counter {
	if c, ok := m.settlements[result]; ok {
		return c
	}
	return m.settlements[keystore.SettleUnknown]
}
