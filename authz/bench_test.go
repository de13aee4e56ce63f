package authz

import (
	"context"
	"fmt"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"

	"github.com/keygate/keygate/authz/ratelimit"
	"github.com/keygate/keygate/authz/route"
	"github.com/keygate/keygate/authz/wire"
	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/keystoretest"
	"github.com/keygate/keygate/keystore/money"
)

// benchServer is a Server over a real store with nKeys keys across
// nKeys/10 accounts with balances that never run out, every key allowed
// every route at a rate that never trips.
func benchServer(b *testing.B, nKeys int) (*Server, []string) {
	return benchServerRate(b, nKeys, ratelimit.Rate{N: 1_000_000_000, Per: time.Second})
}

func benchServerRate(b *testing.B, nKeys int, rate ratelimit.Rate) (*Server, []string) {
	b.Helper()
	st := keystoretest.Open(b)
	// One Import rather than a CreateKey per key: each of those is an
	// fsync'd transaction, and the benchmark function runs several times.
	accounts := make([]keystore.ImportAccount, 0, (nKeys+9)/10)
	keys := make([]keystore.NewKey, 0, nKeys)
	for i := 0; i < nKeys; i++ {
		acct := fmt.Sprintf("acct-%d", i/10)
		if i%10 == 0 {
			accounts = append(accounts, keystore.ImportAccount{ID: acct, Balance: money.Max / 4})
		}
		keys = append(keys, keystore.NewKey{Account: acct, Scopes: []string{"chat:write", "chat:read"}, RateLimit: rate})
	}
	imported, err := st.Import(accounts, keys, time.Now())
	if err != nil {
		b.Fatal(err)
	}
	secrets := make([]string, 0, nKeys)
	for _, k := range imported {
		secrets = append(secrets, k.Secret)
	}
	routes, err := route.NewTable([]route.Spec{
		{Method: "POST", Path: "/v1/chat/completions", Scope: "chat:write", Price: 2000},
		{Method: "GET", PathPrefix: "/v1/chat/completions/", Scope: "chat:read"},
		{Method: "POST", Path: "/v1/embeddings", Scope: "embeddings:write", Price: 100},
	})
	if err != nil {
		b.Fatal(err)
	}
	s, err := New(Config{Keys: st, Routes: routes})
	if err != nil {
		b.Fatal(err)
	}
	return s, secrets
}

// envoyRequest is a Check as Envoy sends it: every header it forwards.
func envoyRequest(method, path, secret string, i int) *authv3.CheckRequest {
	id := fmt.Sprintf("9f0c6a4e-8d1b-4c1e-a7c5-%012d", i)
	return &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Source:      &authv3.AttributeContext_Peer{},
		Destination: &authv3.AttributeContext_Peer{},
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
			Id: id, Method: method, Path: path, Host: "api.example.com", Scheme: "https", Protocol: "HTTP/2",
			Headers: map[string]string{
				":method": method, ":path": path, ":authority": "api.example.com", ":scheme": "https",
				"authorization": "Bearer " + secret, "content-type": "application/json",
				"user-agent": "openai-python/1.54.0", "accept": "application/json",
				"x-request-id": id, "x-forwarded-proto": "https", "x-forwarded-for": "203.0.113.7",
				"content-length": "512", "x-envoy-expected-rq-timeout-ms": "60000",
			},
		}},
	}}
}

func requests(secrets []string, method, path string) []*authv3.CheckRequest {
	out := make([]*authv3.CheckRequest, len(secrets))
	for i, s := range secrets {
		out[i] = envoyRequest(method, path, s, i)
	}
	return out
}

// BenchmarkDecide is the in-process decision (auth, path, scope, rate limit,
// debit) on the allow path with a price, in parallel over 10,000 keys.
func BenchmarkDecide(b *testing.B) {
	s, secrets := benchServer(b, 10_000)
	var reqs []request
	for _, r := range requests(secrets, "POST", "/v1/chat/completions") {
		reqs = append(reqs, fromProto(r.GetAttributes().GetRequest().GetHttp()))
	}
	var next atomic.Uint64
	b.ReportAllocs()
	b.ResetTimer()
	c0 := cpuTime()
	b.RunParallel(func(pb *testing.PB) {
		for i := next.Add(1) * 104729; pb.Next(); i++ { // a cursor per goroutine: no shared counter to contend on
			r := &reqs[i%uint64(len(reqs))]
			if _, d := s.decide(r, time.Now()); d != nil {
				b.Fatalf("denied: %s", d.Message)
			}
		}
	})
	reportCPU(b, c0)
}

// cpuTime returns the process's user and system CPU time so far. On a
// machine shared with other work, CPU time per operation (reportCPU) moves
// far less than wall time: another process's load stretches the wall clock
// of a parallel benchmark but adds nothing to this process's CPU time.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// reportCPU reports the CPU time spent since c0 per operation, as cpu-ns/op:
// the sum over every goroutine, garbage collection included.
func reportCPU(b *testing.B, c0 time.Duration) {
	b.ReportMetric(float64(cpuTime()-c0)/float64(b.N), "cpu-ns/op")
}

// BenchmarkCheck is the whole handler: decision, metrics and the response.
func BenchmarkCheck(b *testing.B) {
	s, secrets := benchServer(b, 10_000)
	cases := []struct {
		name string
		reqs []*authv3.CheckRequest
	}{
		{"allow/priced", requests(secrets, "POST", "/v1/chat/completions")},
		{"allow/free", requests(secrets, "GET", "/v1/chat/completions/abc")},
		{"deny/unknown-key", requests(unknownSecrets(len(secrets)), "POST", "/v1/chat/completions")},
		{"deny/garbage-key", requests(garbage(len(secrets)), "POST", "/v1/chat/completions")},
		{"deny/path", requests(secrets, "POST", "/v1/../admin")},
	}
	for _, c := range cases {
		b.Run(c.name, func(b *testing.B) {
			var next atomic.Uint64
			b.ReportAllocs()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for i := next.Add(1) * 104729; pb.Next(); i++ { // a cursor per goroutine: no shared counter to contend on
					if _, err := s.Check(context.Background(), c.reqs[i%uint64(len(c.reqs))]); err != nil {
						b.Fatal(err)
					}
				}
			})
		})
	}
}

// BenchmarkCheckRateLimited is the 429 path: every key has spent its one
// request of the day.
func BenchmarkCheckRateLimited(b *testing.B) {
	s, secrets := benchServerRate(b, 1000, ratelimit.Rate{N: 1, Per: 24 * time.Hour})
	reqs := requests(secrets, "GET", "/v1/chat/completions/abc")
	for _, r := range reqs {
		s.Check(context.Background(), r) //nolint:errcheck // spends the token
	}
	var next atomic.Uint64
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for i := next.Add(1) * 104729; pb.Next(); i++ { // a cursor per goroutine: no shared counter to contend on
			resp, _ := s.Check(context.Background(), reqs[i%uint64(len(reqs))])
			if resp.GetDeniedResponse().GetStatus().GetCode() != 429 {
				b.Fatalf("not rate limited: %v", resp)
			}
		}
	})
}

// BenchmarkServedCheck is what the gRPC server runs per Check, less the
// transport: decode the request bytes, decide, encode the response. The
// generic variant decodes and encodes with the generated protobuf code.
func BenchmarkServedCheck(b *testing.B) {
	s, secrets := benchServer(b, 1000)
	var frames [][]byte
	for _, r := range requests(secrets, "POST", "/v1/chat/completions") {
		f, err := proto.Marshal(r)
		if err != nil {
			b.Fatal(err)
		}
		frames = append(frames, f)
	}
	codec := wire.Codec{}
	b.Run("wire", func(b *testing.B) {
		var next atomic.Uint64
		b.ReportAllocs()
		c0 := cpuTime()
		b.RunParallel(func(pb *testing.PB) {
			for i := next.Add(1) * 104729; pb.Next(); i++ { // a cursor per goroutine: no shared counter to contend on
				var w wire.Request
				if err := codec.Unmarshal(mem.BufferSlice{mem.SliceBuffer(frames[i%uint64(len(frames))])}, &w); err != nil {
					b.Fatal(err)
				}
				r := fromWire(&w)
				g, d := s.check(&r)
				if d != nil {
					b.Fatal(d.Message)
				}
				out, err := codec.Marshal(encodeAllow(g))
				if err != nil {
					b.Fatal(err)
				}
				out.Free()
			}
		})
		reportCPU(b, c0)
	})
	b.Run("generic", func(b *testing.B) {
		var next atomic.Uint64
		b.ReportAllocs()
		c0 := cpuTime()
		b.RunParallel(func(pb *testing.PB) {
			for i := next.Add(1) * 104729; pb.Next(); i++ { // a cursor per goroutine: no shared counter to contend on
				var req authv3.CheckRequest
				if err := proto.Unmarshal(frames[i%uint64(len(frames))], &req); err != nil {
					b.Fatal(err)
				}
				resp, _ := s.Check(context.Background(), &req)
				if _, err := proto.Marshal(resp); err != nil {
					b.Fatal(err)
				}
			}
		})
		reportCPU(b, c0)
	})
}

func unknownSecrets(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("kg_%038d", i)
	}
	return out
}

func garbage(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("sk-%d-not-a-keygate-key", i)
	}
	return out
}

// BenchmarkAllowResponse is the served path's allow response alone, from
// grant to the bytes gRPC sends: a rate-limited key, so all five headers.
func BenchmarkAllowResponse(b *testing.B) {
	s, secrets := benchServer(b, 1)
	r := fromProto(requests(secrets, "POST", "/v1/chat/completions")[0].GetAttributes().GetRequest().GetHttp())
	g, d := s.decide(&r, time.Now())
	if d != nil {
		b.Fatal(d.Message)
	}
	codec := wire.Codec{}
	b.ReportAllocs()
	for b.Loop() {
		out, err := codec.Marshal(encodeAllow(g))
		if err != nil {
			b.Fatal(err)
		}
		out.Free()
	}
}
