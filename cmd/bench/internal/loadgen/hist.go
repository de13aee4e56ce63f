package loadgen

import (
	"math/bits"
	"time"
)

// Histogram records durations in log-linear buckets, the layout of
// HdrHistogram: every power of two is split into subBuckets equal parts, so
// any recorded value is known to within 1/subBuckets (0.8%) of itself, from
// 1 ns to maxValue, in a fixed 35 KiB. Recording is one bits.Len64 and an
// increment: cheap enough for every request of a load run. A Histogram is not
// safe for concurrent use; give each worker its own and Merge them.
type Histogram struct {
	counts   [numBuckets]uint64
	n        uint64
	sum      uint64 // ns
	min, max int64  // ns; exact
}

const (
	subBits    = 7
	subBuckets = 1 << subBits // per power of two
	// maxValue bounds what is recorded (about 36 minutes); larger values are
	// clamped to it, never dropped, so counts stay exact.
	maxValue   = 1<<41 - 1
	numBuckets = subBuckets + (41-subBits)*subBuckets
)

// index returns the bucket of v (0 ≤ v ≤ maxValue).
func index(v int64) int {
	if v < subBuckets {
		return int(v)
	}
	shift := bits.Len64(uint64(v)) - subBits - 1 // v>>shift is in [subBuckets, 2*subBuckets)
	return subBuckets + shift*subBuckets + int(v>>shift) - subBuckets
}

// upper returns the largest value that falls into bucket i: what a
// percentile reports, so that a reported p99 is never below the true one.
func upper(i int) int64 {
	if i < subBuckets {
		return int64(i)
	}
	shift := (i - subBuckets) / subBuckets
	m := int64(i%subBuckets + subBuckets)
	return (m+1)<<shift - 1
}

// Record adds one observation. Negative durations count as zero.
func (h *Histogram) Record(d time.Duration) {
	v := int64(d)
	if v < 0 {
		v = 0
	}
	if v > maxValue {
		v = maxValue
	}
	h.counts[index(v)]++
	if h.n == 0 || v < h.min {
		h.min = v
	}
	if v > h.max {
		h.max = v
	}
	h.n++
	h.sum += uint64(v)
}

// Merge adds every observation of o to h.
func (h *Histogram) Merge(o *Histogram) {
	if o.n == 0 {
		return
	}
	for i, c := range o.counts {
		h.counts[i] += c
	}
	if h.n == 0 || o.min < h.min {
		h.min = o.min
	}
	if o.max > h.max {
		h.max = o.max
	}
	h.n += o.n
	h.sum += o.sum
}

// Count returns the number of observations.
func (h *Histogram) Count() uint64 { return h.n }

// Max returns the largest observation, exactly.
func (h *Histogram) Max() time.Duration { return time.Duration(h.max) }

// Mean returns the mean observation.
func (h *Histogram) Mean() time.Duration {
	if h.n == 0 {
		return 0
	}
	return time.Duration(h.sum / h.n)
}

// Quantile returns the smallest bucket bound at or below which a fraction q
// (0 < q ≤ 1) of the observations lie: within 0.8% above the exact
// quantile, and never above Max.
func (h *Histogram) Quantile(q float64) time.Duration {
	if h.n == 0 {
		return 0
	}
	rank := uint64(q*float64(h.n) + 0.999999999) // ceil, robust to float noise
	if rank < 1 {
		rank = 1
	}
	if rank > h.n {
		rank = h.n
	}
	var seen uint64
	for i, c := range h.counts {
		seen += c
		if seen >= rank {
			return time.Duration(min(upper(i), h.max))
		}
	}
	return time.Duration(h.max)
}

// Sparse is a Histogram in a form for JSON: the non-empty buckets only.
type Sparse struct {
	Buckets [][2]uint64 `json:"buckets"` // bucket index, count
	Sum     uint64      `json:"sum_ns"`
	Min     int64       `json:"min_ns"`
	Max     int64       `json:"max_ns"`
}

// Sparse returns h's non-empty buckets.
func (h *Histogram) Sparse() Sparse {
	s := Sparse{Sum: h.sum, Min: h.min, Max: h.max, Buckets: [][2]uint64{}}
	for i, c := range h.counts {
		if c != 0 {
			s.Buckets = append(s.Buckets, [2]uint64{uint64(i), c})
		}
	}
	return s
}

// FromSparse rebuilds a Histogram; buckets out of range are ignored.
func FromSparse(s Sparse) *Histogram {
	h := &Histogram{sum: s.Sum, min: s.Min, max: s.Max}
	for _, b := range s.Buckets {
		if b[0] < numBuckets {
			h.counts[b[0]] += b[1]
			h.n += b[1]
		}
	}
	return h
}
