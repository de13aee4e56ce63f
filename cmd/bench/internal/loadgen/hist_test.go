package loadgen

import (
	"math"
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

func TestBucketBounds(t *testing.T) {
	// Every value lies in a bucket whose upper bound is at or above it and
	// within 1/subBuckets of it, and buckets are contiguous.
	values := []int64{0, 1, 127, 128, 129, 255, 256, 257, 1000, 1 << 20, 1<<20 + 1, 123456789, maxValue}
	rnd := rand.New(rand.NewPCG(1, 2))
	for range 10000 {
		values = append(values, rnd.Int64N(maxValue))
	}
	for _, v := range values {
		i := index(v)
		if i < 0 || i >= numBuckets {
			t.Fatalf("index(%d) = %d, out of [0, %d)", v, i, numBuckets)
		}
		u := upper(i)
		if u < v {
			t.Errorf("upper(index(%d)) = %d, below the value", v, u)
		}
		if float64(u-v) > float64(v)/subBuckets {
			t.Errorf("upper(index(%d)) = %d, more than 1/%d above", v, u, subBuckets)
		}
		if i > 0 && upper(i-1) >= v {
			t.Errorf("value %d also fits bucket %d (upper %d)", v, i-1, upper(i-1))
		}
	}
}

func TestQuantileAgainstSorted(t *testing.T) {
	rnd := rand.New(rand.NewPCG(3, 4))
	var h Histogram
	var vals []int64
	for range 100_000 {
		// Log-normal-ish latencies, 10 µs to a few ms.
		v := int64(10_000 * math.Exp(rnd.NormFloat64()))
		vals = append(vals, v)
		h.Record(time.Duration(v))
	}
	slices.Sort(vals)
	for _, q := range []float64{0.01, 0.5, 0.9, 0.99, 0.999, 0.9999, 1} {
		rank := int(math.Ceil(q*float64(len(vals)))) - 1
		exact := vals[rank]
		got := int64(h.Quantile(q))
		if got < exact || float64(got-exact) > float64(exact)/subBuckets {
			t.Errorf("Quantile(%v) = %d, exact %d: want within +1/%d", q, got, exact, subBuckets)
		}
	}
	if h.Count() != uint64(len(vals)) {
		t.Errorf("Count = %d, want %d", h.Count(), len(vals))
	}
	if h.Max() != time.Duration(vals[len(vals)-1]) {
		t.Errorf("Max = %d, want %d", h.Max(), vals[len(vals)-1])
	}
	var sum int64
	for _, v := range vals {
		sum += v
	}
	if want := time.Duration(sum / int64(len(vals))); h.Mean() != want {
		t.Errorf("Mean = %v, want %v", h.Mean(), want)
	}
}

func TestQuantileSmall(t *testing.T) {
	var h Histogram
	if h.Quantile(0.99) != 0 || h.Mean() != 0 {
		t.Error("empty histogram reports a value")
	}
	for _, d := range []time.Duration{100, 200, 300, 400} {
		h.Record(d)
	}
	tests := []struct {
		q    float64
		want time.Duration
	}{
		{0.25, 100}, {0.5, 200}, {0.51, 300}, {0.75, 300}, {0.99, 400}, {1, 400},
	}
	for _, tt := range tests {
		// 100 is exact; 200..400 are in buckets of width 2 and 4 above 255,
		// capped by the exact max.
		got := h.Quantile(tt.q)
		if got < tt.want || got > tt.want+3 {
			t.Errorf("Quantile(%v) = %v, want %v (+3)", tt.q, got, tt.want)
		}
	}
}

func TestRecordClamps(t *testing.T) {
	var h Histogram
	h.Record(-5)
	h.Record(time.Duration(math.MaxInt64))
	if h.Count() != 2 {
		t.Fatalf("Count = %d, want 2", h.Count())
	}
	if h.Quantile(0.1) != 0 {
		t.Errorf("negative not recorded as 0: %v", h.Quantile(0.1))
	}
	if h.Max() != maxValue {
		t.Errorf("Max = %d, want clamp at %d", h.Max(), maxValue)
	}
}

func TestMergeAndSparse(t *testing.T) {
	rnd := rand.New(rand.NewPCG(5, 6))
	var a, b, all Histogram
	for i := range 5000 {
		d := time.Duration(rnd.Int64N(int64(time.Millisecond)))
		if i%3 == 0 {
			a.Record(d)
		} else {
			b.Record(d)
		}
		all.Record(d)
	}
	var m Histogram
	m.Merge(&a)
	m.Merge(&b)
	m.Merge(&Histogram{})
	if m != all {
		t.Error("merge of parts differs from recording all")
	}
	if got := FromSparse(all.Sparse()); *got != all {
		t.Error("FromSparse(Sparse()) differs")
	}
	if got := FromSparse(Sparse{Buckets: [][2]uint64{{numBuckets + 5, 1}}}); got.Count() != 0 {
		t.Error("out-of-range bucket counted")
	}
}
