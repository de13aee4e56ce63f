package loadgen

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
)

// Clients a generator can use.
const (
	ClientH2   = "h2"   // H2Conn: cheap, Envoy-like
	ClientGRPC = "grpc" // grpc-go's client: for comparison
)

// Config is one load phase. The generator runs a closed loop: Concurrency
// workers, each sending its next call when the last one is answered, spread
// over Conns connections (Envoy keeps one per worker thread). Calls answered
// during Warmup are not counted; the phase then lasts Duration, and no call
// starts after it. MaxRequests bounds the calls started, warm-up included.
type Config struct {
	Addr string // host:port
	// Addrs, when set, replaces Addr: several servers (replicas), each
	// with Conns connections; calls go to them in turn, call n to server
	// n mod len(Addrs), as a round-robin load balancer sends them.
	Addrs       []string
	Client      string // ClientH2 (default) or ClientGRPC
	Conns       int
	Concurrency int
	Warmup      time.Duration
	Duration    time.Duration
	MaxRequests uint64
	Source      *Source
	Seed        uint64 // of request ids; 0: random
	// Timeout is every call's grpc-timeout (Envoy's ext_authz timeout,
	// 200 ms by default); 0: none.
	Timeout time.Duration
	// Slot, if not zero, also records the latency per slot of this width
	// (a timeline, to see what a background task does to latency).
	Slot time.Duration
	// Probe, if set, is called at the start and the end of the measured
	// window, from one goroutine; what it returns at the end goes in the
	// Result (the caller measures the server's CPU time there).
	Probe func() Sample
}

// Sample is a reading of a server process (and of the generator itself).
type Sample struct {
	ServerCPU time.Duration // user + system
	ServerRSS int64         // bytes
	ServerHWM int64         // peak RSS, bytes
	GenCPU    time.Duration
	RedisCPU  time.Duration // user + system of a redis-server, if any
	// Counters are cumulative counters read from the servers (for
	// instance from their /metrics, summed over replicas), by name.
	Counters map[string]float64
	// CoreBusy is each core's time not idle (user, system, interrupts,
	// steal), by core number: with the server's CPU time it tells how much
	// else ran on the server's core.
	CoreBusy []time.Duration
}

// Result is what a phase measured, over its window only.
type Result struct {
	Start     time.Time      `json:"start"` // of the window
	Seconds   float64        `json:"seconds"`
	Requests  uint64         `json:"requests"` // decisions received in the window
	PerSecond float64        `json:"per_second"`
	ByStatus  map[int]uint64 `json:"by_status"` // HTTP status the response asks Envoy for; 200: allowed
	// Timeouts are calls the server did not answer within the timeout;
	// their latency is in Latency, but they are not Requests.
	Timeouts uint64 `json:"timeouts"`
	Errors   uint64 `json:"errors"` // transport or gRPC errors, timeouts aside
	FirstErr string `json:"first_error,omitempty"`
	Latency  Sparse `json:"latency"`
	// Server and generator readings over the window (zero without Probe).
	ServerCPUSeconds float64   `json:"server_cpu_seconds"`
	ServerRSS        int64     `json:"server_rss_bytes"`
	ServerHWM        int64     `json:"server_hwm_bytes"`
	GenCPUSeconds    float64   `json:"gen_cpu_seconds"`
	CoreBusySeconds  []float64 `json:"core_busy_seconds"`
	RedisCPUSeconds  float64   `json:"redis_cpu_seconds,omitempty"`
	// Counters are the Probe's counters over the window: end − begin (a
	// counter first seen at the end counts from zero).
	Counters map[string]float64 `json:"counters,omitempty"`
	Timeline []Slot             `json:"timeline,omitempty"`
}

// Slot is the latency of the calls answered in one timeline slot.
type Slot struct {
	Offset  time.Duration `json:"offset_ns"` // from Start
	Latency Sparse        `json:"latency"`
}

var errConfig = errors.New("bad load config")

// worker state, merged at the end.
type tally struct {
	hist     Histogram
	byStatus map[int]uint64
	timeouts uint64
	errors   uint64
	firstErr error
	samples  []sample // for the timeline
}

type sample struct {
	end time.Duration // since the window start
	lat time.Duration
}

// A caller is one connection; each worker gets its own callFunc from it.
type caller interface {
	newCallFunc() callFunc
	close()
}

// callFunc makes one call of an encoded CheckRequest and returns the encoded
// response, valid until its next call. It is used by one worker only.
type callFunc func(ctx context.Context, req []byte) (resp []byte, err error)

// Run runs one phase against cfg.Addr.
func Run(ctx context.Context, cfg Config) (Result, error) {
	if cfg.Concurrency < 1 || cfg.Conns < 1 || cfg.Duration <= 0 || cfg.Source == nil {
		return Result{}, fmt.Errorf("%w: need concurrency, conns, duration and a source", errConfig)
	}
	if cfg.MaxRequests == 0 {
		cfg.MaxRequests = 1 << 62
	}
	if cfg.Seed == 0 {
		cfg.Seed = rand.Uint64()
	}
	dialCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	callers, err := dial(dialCtx, cfg)
	if err != nil {
		return Result{}, err
	}
	defer func() {
		for _, cs := range callers {
			for _, c := range cs {
				c.close()
			}
		}
	}()

	t0 := time.Now()
	winStart := t0.Add(cfg.Warmup)
	winEnd := winStart.Add(cfg.Duration)
	// Calls stuck past the end (a wedged server) are cut by closing the
	// connections; the workers then see errors and stop.
	runCtx, stopRun := context.WithDeadline(ctx, winEnd.Add(5*time.Second))
	defer stopRun()

	var (
		seq     atomic.Uint64
		wg      sync.WaitGroup
		tallies = make([]*tally, cfg.Concurrency)
	)
	estimate := int(float64(cfg.Duration/time.Second+1) * 40_000 / float64(cfg.Concurrency))
	for w := range cfg.Concurrency {
		tl := &tally{byStatus: map[int]uint64{}}
		if cfg.Slot > 0 {
			tl.samples = make([]sample, 0, estimate)
		}
		tallies[w] = tl
		wg.Add(1)
		go func() {
			defer wg.Done()
			calls := make([]callFunc, len(callers))
			for a, cs := range callers {
				calls[a] = cs[w%len(cs)].newCallFunc()
			}
			work(runCtx, cfg, calls, tl, &seq, uint64(w), winStart, winEnd)
		}()
	}

	var begin, end Sample
	probeDone := make(chan struct{})
	go func() {
		defer close(probeDone)
		if cfg.Probe == nil {
			return
		}
		// The probe follows the window's clock, not the workers: they stop
		// at winEnd too, and must not cancel the last reading.
		if !sleepUntil(ctx, winStart) {
			return
		}
		begin = cfg.Probe()
		if !sleepUntil(ctx, winEnd) {
			return
		}
		end = cfg.Probe()
	}()

	wg.Wait()
	stopRun()
	<-probeDone
	if err := ctx.Err(); err != nil {
		return Result{}, err
	}

	res := Result{Start: winStart, Seconds: cfg.Duration.Seconds(), ByStatus: map[int]uint64{}}
	var all Histogram
	for _, tl := range tallies {
		all.Merge(&tl.hist)
		for s, n := range tl.byStatus {
			res.ByStatus[s] += n
		}
		res.Errors += tl.errors
		res.Timeouts += tl.timeouts
		if tl.firstErr != nil && res.FirstErr == "" {
			res.FirstErr = tl.firstErr.Error()
		}
	}
	for _, n := range res.ByStatus {
		res.Requests += n
	}
	res.PerSecond = float64(res.Requests) / res.Seconds
	res.Latency = all.Sparse()
	if cfg.Probe != nil {
		res.ServerCPUSeconds = (end.ServerCPU - begin.ServerCPU).Seconds()
		res.GenCPUSeconds = (end.GenCPU - begin.GenCPU).Seconds()
		res.RedisCPUSeconds = (end.RedisCPU - begin.RedisCPU).Seconds()
		res.Counters = CounterDeltas(begin.Counters, end.Counters)
		res.ServerRSS, res.ServerHWM = end.ServerRSS, end.ServerHWM
		for i := range min(len(begin.CoreBusy), len(end.CoreBusy)) {
			res.CoreBusySeconds = append(res.CoreBusySeconds, (end.CoreBusy[i] - begin.CoreBusy[i]).Seconds())
		}
	}
	if cfg.Slot > 0 {
		res.Timeline = timeline(tallies, cfg.Slot, cfg.Duration)
	}
	return res, nil
}

func sleepUntil(ctx context.Context, t time.Time) bool {
	tm := time.NewTimer(time.Until(t))
	defer tm.Stop()
	select {
	case <-tm.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// CounterDeltas returns end − begin for each counter of end; a counter
// missing from begin counts from zero (Prometheus exports a labelled
// counter from its first use). Nil when end has none.
func CounterDeltas(begin, end map[string]float64) map[string]float64 {
	if len(end) == 0 {
		return nil
	}
	out := make(map[string]float64, len(end))
	for k, v := range end {
		out[k] = v - begin[k]
	}
	return out
}

func work(ctx context.Context, cfg Config, calls []callFunc, tl *tally, seq *atomic.Uint64, w uint64, winStart, winEnd time.Time) {
	rnd := rand.New(rand.NewPCG(cfg.Seed, w))
	buf := make([]byte, 0, cfg.Source.MaxLen())
	for ctx.Err() == nil {
		n := seq.Add(1)
		if n > cfg.MaxRequests {
			return
		}
		buf = cfg.Source.Fill(buf[:0], n, rnd)
		start := time.Now()
		if !start.Before(winEnd) {
			return
		}
		resp, err := calls[n%uint64(len(calls))](ctx, buf)
		end := time.Now()
		if end.Before(winStart) {
			if err != nil && ctx.Err() == nil && !errors.Is(err, ErrTimeout) {
				// A failure during warm-up is a failure of the phase.
				tl.errors++
				if tl.firstErr == nil {
					tl.firstErr = err
				}
				return
			}
			continue
		}
		if !end.Before(winEnd) {
			return // answered after the window: not counted
		}
		lat := end.Sub(start)
		if err == nil {
			var o Outcome
			if o, err = DecodeOutcome(resp); err == nil {
				tl.byStatus[o.HTTPStatus]++
			}
		}
		switch {
		case errors.Is(err, ErrTimeout):
			tl.timeouts++ // counted in the latency, as a client waits that long
		case err != nil:
			tl.errors++
			if tl.firstErr == nil {
				tl.firstErr = err
			}
			if ctx.Err() != nil || errors.Is(err, ErrConnClosed) {
				return
			}
			continue
		}
		tl.hist.Record(lat)
		if tl.samples != nil {
			tl.samples = append(tl.samples, sample{end: end.Sub(winStart), lat: lat})
		}
	}
}

func timeline(tallies []*tally, slot, window time.Duration) []Slot {
	n := int((window + slot - 1) / slot)
	hs := make([]Histogram, n)
	for _, tl := range tallies {
		for _, s := range tl.samples {
			i := int(s.end / slot)
			if i >= 0 && i < n {
				hs[i].Record(s.lat)
			}
		}
	}
	out := make([]Slot, n)
	for i := range hs {
		out[i] = Slot{Offset: time.Duration(i) * slot, Latency: hs[i].Sparse()}
	}
	return out
}

// dial opens cfg.Conns connections to each server: the callers of server
// i are out[i].
func dial(ctx context.Context, cfg Config) ([][]caller, error) {
	addrs := cfg.Addrs
	if len(addrs) == 0 {
		addrs = []string{cfg.Addr}
	}
	var out [][]caller
	fail := func(err error) ([][]caller, error) {
		for _, cs := range out {
			for _, c := range cs {
				c.close()
			}
		}
		return nil, err
	}
	for _, addr := range addrs {
		out = append(out, nil)
		for range cfg.Conns {
			c, err := dialOne(ctx, cfg, addr)
			if err != nil {
				return fail(err)
			}
			out[len(out)-1] = append(out[len(out)-1], c)
		}
	}
	return out, nil
}

func dialOne(ctx context.Context, cfg Config, addr string) (caller, error) {
	switch cfg.Client {
	case ClientH2, "":
		c, err := DialH2(ctx, addr, cfg.Timeout)
		if err != nil {
			return nil, fmt.Errorf("dial %s: %w", addr, err)
		}
		return h2caller{conn: c}, nil
	case ClientGRPC:
		cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithDefaultCallOptions(grpc.ForceCodecV2(rawCodec{})))
		if err != nil {
			return nil, fmt.Errorf("dial %s: %w", addr, err)
		}
		cc.Connect()
		return grpcCaller{cc: cc, timeout: cfg.Timeout}, nil
	}
	return nil, fmt.Errorf("%w: unknown client %q", errConfig, cfg.Client)
}

// h2caller makes calls on an H2Conn.
type h2caller struct{ conn *H2Conn }

func (h h2caller) newCallFunc() callFunc {
	c := NewCall()
	return func(ctx context.Context, req []byte) ([]byte, error) {
		c.Req = req
		h.conn.Do(c)
		select {
		case <-c.Done:
		case <-ctx.Done():
			// The call may still complete: abandon its Call for a new one.
			c = NewCall()
			return nil, ctx.Err()
		}
		if c.Err != nil {
			return nil, c.Err
		}
		switch c.Status {
		case 0:
		case int(codes.DeadlineExceeded):
			return nil, fmt.Errorf("%w: grpc-status %d", ErrTimeout, c.Status)
		default:
			return nil, fmt.Errorf("grpc-status %d", c.Status)
		}
		return c.Resp, nil
	}
}

func (h h2caller) close() { h.conn.Close() }

// grpcCaller makes calls with grpc-go's client, request and response passed
// through as bytes by rawCodec.
type grpcCaller struct {
	cc      *grpc.ClientConn
	timeout time.Duration
}

func (g grpcCaller) newCallFunc() callFunc {
	var resp []byte
	return func(ctx context.Context, req []byte) ([]byte, error) {
		if g.timeout > 0 {
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, g.timeout)
			defer cancel()
		}
		if err := g.cc.Invoke(ctx, checkPath, &req, &resp); err != nil {
			if s, ok := status.FromError(err); ok {
				if s.Code() == codes.DeadlineExceeded {
					return nil, fmt.Errorf("%w: %s", ErrTimeout, s.Message())
				}
				return nil, fmt.Errorf("grpc: %s: %s", s.Code(), s.Message())
			}
			return nil, err
		}
		return resp, nil
	}
}

func (g grpcCaller) close() { g.cc.Close() }

// rawCodec sends a *[]byte as the message and receives into one: the
// messages are already encoded.
type rawCodec struct{}

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	p, ok := v.(*[]byte)
	if !ok {
		return nil, fmt.Errorf("%w: rawCodec takes *[]byte, not %T", errConfig, v)
	}
	return mem.BufferSlice{mem.SliceBuffer(*p)}, nil
}

func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	p, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("%w: rawCodec takes *[]byte, not %T", errConfig, v)
	}
	*p = data.Materialize()
	return nil
}

func (rawCodec) Name() string { return "proto" }
