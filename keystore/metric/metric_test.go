package metric_test

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keygate/keygate/keystore/metric"
)

func TestRegister(t *testing.T) {
	reg := prometheus.NewRegistry()
	opts := prometheus.CounterOpts{Name: "keygate_test_total", Help: "A test counter."}
	first, err := metric.Register(reg, prometheus.NewCounter(opts))
	if err != nil {
		t.Fatal(err)
	}
	again, err := metric.Register(reg, prometheus.NewCounter(opts))
	if err != nil {
		t.Fatalf("second registration: %v", err)
	}
	if again != first {
		t.Error("the second registration did not return the collector already registered")
	}
	// The same name with another shape is a real conflict.
	if _, err := metric.Register(reg, prometheus.NewGauge(prometheus.GaugeOpts{Name: "keygate_test_total", Help: "A test counter."})); err == nil {
		t.Error("a gauge under a counter's name was accepted")
	}
	if c, err := metric.Register(nil, prometheus.NewCounter(opts)); err != nil || c == nil {
		t.Errorf("nil registerer: %v, %v", c, err)
	}
}
