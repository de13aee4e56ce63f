package loadgen

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"sync"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/genproto/googleapis/rpc/code"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// fakeAuthz allows "Bearer good", denies everything else with 401, fails
// with INTERNAL for "Bearer fail", never answers "Bearer slow", and records
// every x-request-id.
type fakeAuthz struct {
	authv3.UnimplementedAuthorizationServer
	mu  sync.Mutex
	ids map[string]int
}

func (f *fakeAuthz) Check(ctx context.Context, req *authv3.CheckRequest) (*authv3.CheckResponse, error) {
	h := req.GetAttributes().GetRequest().GetHttp()
	f.mu.Lock()
	f.ids[h.GetHeaders()["x-request-id"]]++
	f.mu.Unlock()
	switch h.GetHeaders()["authorization"] {
	case "Bearer good":
		return &authv3.CheckResponse{
			Status:       &rpcstatus.Status{Code: int32(code.Code_OK)},
			HttpResponse: &authv3.CheckResponse_OkResponse{OkResponse: &authv3.OkHttpResponse{}},
		}, nil
	case "Bearer fail":
		return nil, status.Error(codes.Internal, "boom")
	case "Bearer slow":
		<-ctx.Done()
		return nil, ctx.Err()
	}
	return &authv3.CheckResponse{
		Status: &rpcstatus.Status{Code: int32(code.Code_UNAUTHENTICATED)},
		HttpResponse: &authv3.CheckResponse_DeniedResponse{DeniedResponse: &authv3.DeniedHttpResponse{
			Status: &typev3.HttpStatus{Code: typev3.StatusCode_Unauthorized},
		}},
	}, nil
}

func startFake(t *testing.T, opts ...grpc.ServerOption) (*fakeAuthz, string, *grpc.Server) {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeAuthz{ids: map[string]int{}}
	srv := grpc.NewServer(opts...)
	authv3.RegisterAuthorizationServer(srv, f)
	go srv.Serve(lis) //nolint:errcheck // ends with Stop
	t.Cleanup(srv.Stop)
	return f, lis.Addr().String(), srv
}

func request(t *testing.T, auth string, rnd *rand.Rand) []byte {
	t.Helper()
	tp, err := Build(Spec{Method: "POST", Path: "/v1/chat/completions", Auth: auth}, 1, false)
	if err != nil {
		t.Fatal(err)
	}
	return tp.Fill(nil, "", rnd)
}

// TestH2ConnConcurrent runs many calls at once over one connection, far more
// bytes than the initial flow-control windows, with the server limiting
// concurrent streams, and checks each answer.
func TestH2ConnConcurrent(t *testing.T) {
	f, addr, _ := startFake(t, grpc.MaxConcurrentStreams(8))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := DialH2(ctx, addr, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	const workers, calls = 32, 100
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rnd := rand.New(rand.NewPCG(uint64(w), 1))
			tps := map[bool]Template{}
			for allow, auth := range map[bool]string{true: "Bearer good", false: "Bearer bad"} {
				tp, err := Build(Spec{Method: "POST", Path: "/v1/chat/completions", Auth: auth}, w, false)
				if err != nil {
					errs <- err
					return
				}
				tps[allow] = tp
			}
			c := NewCall()
			var buf []byte
			for i := range calls {
				allow := (i+w)%2 == 0
				tp := tps[allow]
				buf = tp.Fill(buf[:0], "", rnd) // a fresh request id each time
				c.Req = buf
				conn.Do(c)
				<-c.Done
				if c.Err != nil || c.Status != 0 {
					errs <- fmt.Errorf("call: err %v, grpc-status %d", c.Err, c.Status)
					return
				}
				o, err := DecodeOutcome(c.Resp)
				if err != nil {
					errs <- err
					return
				}
				if o.Allowed != allow {
					errs <- fmt.Errorf("allowed = %v, want %v (%+v)", o.Allowed, allow, o)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.ids) != workers*calls {
		t.Errorf("server saw %d distinct request ids, want %d", len(f.ids), workers*calls)
	}
}

func TestH2ConnErrors(t *testing.T) {
	_, addr, srv := startFake(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := DialH2(ctx, addr, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	rnd := rand.New(rand.NewPCG(1, 1))

	c := NewCall()
	c.Req = request(t, "Bearer fail", rnd)
	conn.Do(c)
	<-c.Done
	if c.Err != nil || c.Status != int(codes.Internal) {
		t.Errorf("failing call: err %v, status %d; want status %d", c.Err, c.Status, codes.Internal)
	}

	c.Req = make([]byte, 1<<20) // beyond the server's 64 KiB stream window
	conn.Do(c)
	<-c.Done
	if !errors.Is(c.Err, ErrTooLarge) {
		t.Errorf("oversized call: err %v, want ErrTooLarge", c.Err)
	}

	srv.Stop()
	c.Req = request(t, "Bearer good", rnd)
	conn.Do(c)
	select {
	case <-c.Done:
		if c.Err == nil {
			t.Error("call on a stopped server succeeded")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("call on a stopped server hangs")
	}
}

func TestDialH2Refused(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	lis.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := DialH2(ctx, addr, 0); err == nil {
		t.Error("dial to a closed port succeeded")
	}
}

// TestRun runs short phases with both clients and checks the accounting, not
// the speed.
func TestRun(t *testing.T) {
	f, addr, _ := startFake(t)
	good := []Template{}
	for _, auth := range []string{"Bearer good", "Bearer good", "Bearer bad"} {
		tp, err := Build(Spec{Method: "POST", Path: "/v1/chat/completions", Auth: auth}, 1, false)
		if err != nil {
			t.Fatal(err)
		}
		good = append(good, tp)
	}
	src, err := NewSource(good, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, client := range []string{ClientH2, ClientGRPC} {
		probes := 0
		res, err := Run(context.Background(), Config{
			Addr: addr, Client: client, Conns: 2, Concurrency: 8,
			Warmup: 50 * time.Millisecond, Duration: time.Second, Timeout: time.Minute,
			Source: src, Slot: 250 * time.Millisecond,
			Probe: func() Sample { probes++; return Sample{ServerCPU: time.Duration(probes) * time.Second} },
		})
		if err != nil {
			t.Fatalf("%s: %v", client, err)
		}
		if res.Errors != 0 || res.Requests == 0 {
			t.Fatalf("%s: %d requests, %d errors (%s)", client, res.Requests, res.Errors, res.FirstErr)
		}
		if got := res.ByStatus[200] + res.ByStatus[401]; got != res.Requests {
			t.Errorf("%s: by status %v, sum %d, want %d", client, res.ByStatus, got, res.Requests)
		}
		if res.ByStatus[200] == 0 || res.ByStatus[401] == 0 {
			t.Errorf("%s: by status %v: want both allowed and denied", client, res.ByStatus)
		}
		if probes != 2 || res.ServerCPUSeconds != 1 {
			t.Errorf("%s: %d probes, server CPU %v; want 2 probes, 1s", client, probes, res.ServerCPUSeconds)
		}
		if len(res.Timeline) != 4 {
			t.Errorf("%s: %d timeline slots, want 4", client, len(res.Timeline))
		}
		var inSlots uint64
		for _, s := range res.Timeline {
			inSlots += FromSparse(s.Latency).Count()
		}
		if inSlots != res.Requests {
			t.Errorf("%s: timeline holds %d calls, want %d", client, inSlots, res.Requests)
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for id, n := range f.ids {
		if n > 1 {
			t.Fatalf("request id %s sent %d times", id, n)
		}
	}
}

func TestRunMaxRequests(t *testing.T) {
	f, addr, _ := startFake(t)
	tp, err := Build(Spec{Method: "GET", Path: "/", Auth: "Bearer good"}, 1, false)
	if err != nil {
		t.Fatal(err)
	}
	src, _ := NewSource([]Template{tp}, nil)
	res, err := Run(context.Background(), Config{
		Addr: addr, Conns: 1, Concurrency: 4, Duration: 5 * time.Second, MaxRequests: 100, Source: src,
	})
	if err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	sent := len(f.ids)
	f.mu.Unlock()
	if sent != 100 || res.Requests != 100 {
		t.Errorf("server saw %d calls, result counts %d; want 100", sent, res.Requests)
	}
}

// TestRunTimeouts counts calls the server does not answer within the
// timeout as timeouts, with both clients, not as errors.
func TestRunTimeouts(t *testing.T) {
	_, addr, _ := startFake(t)
	tp, err := Build(Spec{Method: "POST", Path: "/v1/chat/completions", Auth: "Bearer slow"}, 1, false)
	if err != nil {
		t.Fatal(err)
	}
	src, _ := NewSource([]Template{tp}, nil)
	for _, client := range []string{ClientH2, ClientGRPC} {
		res, err := Run(context.Background(), Config{
			Addr: addr, Client: client, Conns: 1, Concurrency: 2,
			Duration: 500 * time.Millisecond, Timeout: 20 * time.Millisecond, Source: src,
		})
		if err != nil {
			t.Fatalf("%s: %v", client, err)
		}
		if res.Timeouts == 0 || res.Errors != 0 || res.Requests != 0 {
			t.Errorf("%s: %d timeouts, %d errors (%s), %d requests; want only timeouts", client, res.Timeouts, res.Errors, res.FirstErr, res.Requests)
		}
		if got := FromSparse(res.Latency).Count(); got != res.Timeouts {
			t.Errorf("%s: latency holds %d calls, want the %d timeouts", client, got, res.Timeouts)
		}
	}
}

// TestRunRoundRobin spreads calls over several servers in turn, with both
// clients: with MaxRequests a multiple of the servers, each gets its share
// exactly.
func TestRunRoundRobin(t *testing.T) {
	tp, err := Build(Spec{Method: "GET", Path: "/", Auth: "Bearer good"}, 1, false)
	if err != nil {
		t.Fatal(err)
	}
	src, _ := NewSource([]Template{tp}, nil)
	for _, client := range []string{ClientH2, ClientGRPC} {
		var fakes []*fakeAuthz
		var addrs []string
		for range 3 {
			f, addr, _ := startFake(t)
			fakes, addrs = append(fakes, f), append(addrs, addr)
		}
		res, err := Run(context.Background(), Config{
			Addrs: addrs, Client: client, Conns: 2, Concurrency: 5, Duration: 5 * time.Second, MaxRequests: 300, Source: src,
		})
		if err != nil {
			t.Fatalf("%s: %v", client, err)
		}
		if res.Requests != 300 || res.Errors != 0 {
			t.Errorf("%s: %d requests, %d errors (%s); want 300, 0", client, res.Requests, res.Errors, res.FirstErr)
		}
		for i, f := range fakes {
			f.mu.Lock()
			if n := len(f.ids); n != 100 {
				t.Errorf("%s: server %d saw %d calls, want 100", client, i, n)
			}
			f.mu.Unlock()
		}
	}
}

func TestCounterDeltas(t *testing.T) {
	got := CounterDeltas(map[string]float64{"a": 10, "gone": 5}, map[string]float64{"a": 25, "new": 3})
	want := map[string]float64{"a": 15, "new": 3}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("CounterDeltas (-want +got):\n%s", diff)
	}
	if CounterDeltas(map[string]float64{"a": 1}, nil) != nil {
		t.Error("CounterDeltas without end counters is not nil")
	}
}
