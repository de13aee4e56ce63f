package authz_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/genproto/googleapis/rpc/code"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/test/bufconn"

	"github.com/keygate/keygate/authz"
	"github.com/keygate/keygate/authz/ratelimit"
	"github.com/keygate/keygate/authz/route"
	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/keystoretest"
	"github.com/keygate/keygate/keystore/money"
)

var t0 = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

// fixture is a real store, the design's route table and a Server reached
// over real gRPC.
type fixture struct {
	store  *keystore.Store
	srv    *authz.Server
	client authv3.AuthorizationClient
	now    atomic.Pointer[time.Time]
	logs   *observer.ObservedLogs
}

func newFixture(t *testing.T, opts ...func(*authz.Config)) *fixture {
	t.Helper()
	f := &fixture{store: keystoretest.Open(t)}
	f.setNow(t0)
	routes, err := route.NewTable([]route.Spec{
		{Method: "POST", Path: "/v1/chat/completions", Scope: "chat:write", Price: 2000, MaxPrice: 5000},
		{Method: "GET", PathPrefix: "/v1/chat/completions/", Scope: "chat:read"},
		{Method: "POST", Path: "/v1/embeddings", Scope: "embeddings:write", Price: 100},
		{Method: "POST", Path: "/v1/images/generations", Scope: "images:write", Price: 40000},
	})
	if err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zap.DebugLevel)
	f.logs = logs
	c := authz.Config{
		Keys: f.store, Routes: routes,
		TierRate: func(tier string) (ratelimit.Rate, bool) {
			if tier == "free" {
				return ratelimit.Rate{N: 3, Per: time.Minute}, true
			}
			return ratelimit.Rate{}, false
		},
		Log: zap.New(core),
		Now: func() time.Time { return *f.now.Load() },
	}
	for _, o := range opts {
		o(&c)
	}
	srv, err := authz.New(c)
	if err != nil {
		t.Fatal(err)
	}
	f.srv = srv
	f.client = dial(t, srv)
	return f
}

func (f *fixture) setNow(t time.Time) { f.now.Store(&t) }

// dial serves srv as keygate serves it (NewGRPCServer: wire decoding) on an
// in-memory listener and returns a real gRPC client.
func dial(t testing.TB, srv *authz.Server) authv3.AuthorizationClient {
	t.Helper()
	lis := bufconn.Listen(1 << 20)
	gs := authz.NewGRPCServer(srv)
	go gs.Serve(lis) //nolint:errcheck
	t.Cleanup(gs.Stop)
	cc, err := grpc.NewClient("passthrough:///bufnet",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return authv3.NewAuthorizationClient(cc)
}

func (f *fixture) account(t *testing.T, id, tier string, balance money.Micros) {
	t.Helper()
	if _, err := f.store.CreateAccount(id, tier, balance, t0); err != nil {
		t.Fatal(err)
	}
}

func (f *fixture) key(t *testing.T, nk keystore.NewKey) (keystore.KeyInfo, string) {
	t.Helper()
	k, secret, err := f.store.CreateKey(nk, t0)
	if err != nil {
		t.Fatal(err)
	}
	return k, secret
}

func req(method, path string, headers map[string]string) *authv3.CheckRequest {
	return &authv3.CheckRequest{Attributes: &authv3.AttributeContext{Request: &authv3.AttributeContext_Request{
		Http: &authv3.AttributeContext_HttpRequest{Method: method, Path: path, Headers: headers, Host: "api.test"},
	}}}
}

func bearer(secret string) map[string]string {
	return map[string]string{"authorization": "Bearer " + secret, "x-request-id": "r1"}
}

// outcome is what a test asserts about a response.
type outcome struct {
	status  int
	typ     string
	message string
	code    code.Code
	headers map[string]string
}

func (f *fixture) check(t *testing.T, r *authv3.CheckRequest) outcome {
	t.Helper()
	resp, err := f.client.Check(context.Background(), r)
	if err != nil {
		t.Fatalf("Check returned an error (denials must be answers): %v", err)
	}
	return toOutcome(t, resp)
}

func toOutcome(t testing.TB, resp *authv3.CheckResponse) outcome {
	t.Helper()
	o := outcome{code: code.Code(resp.GetStatus().GetCode()), headers: map[string]string{}}
	if ok := resp.GetOkResponse(); ok != nil {
		o.status = 200
		for _, h := range append(ok.GetHeaders(), ok.GetResponseHeadersToAdd()...) {
			o.headers[h.GetHeader().GetKey()] = h.GetHeader().GetValue()
		}
		return o
	}
	d := resp.GetDeniedResponse()
	if d == nil {
		t.Fatalf("response is neither ok nor denied: %v", resp)
	}
	o.status = int(d.GetStatus().GetCode())
	for _, h := range d.GetHeaders() {
		o.headers[h.GetHeader().GetKey()] = h.GetHeader().GetValue()
	}
	var body struct {
		Error struct {
			Type    string `json:"type"`
			Message string `json:"message"`
		} `json:"error"`
	}
	if err := json.Unmarshal([]byte(d.GetBody()), &body); err != nil {
		t.Fatalf("denial body %q is not the JSON error shape: %v", d.GetBody(), err)
	}
	o.typ, o.message = body.Error.Type, body.Error.Message
	if o.headers["content-type"] != "application/json" {
		t.Errorf("denial %d has content-type %q, want application/json", o.status, o.headers["content-type"])
	}
	return o
}

func TestDecide(t *testing.T) {
	f := newFixture(t)
	f.account(t, "acme", "free", 100*money.PerUSD)
	_, secret := f.key(t, keystore.NewKey{Account: "acme", Scopes: []string{"chat:write", "chat:read"}, RateLimit: ratelimit.Rate{N: 100, Per: time.Second}})
	revoked, revokedSecret := f.key(t, keystore.NewKey{Account: "acme", Scopes: []string{"chat:write"}})
	if _, err := f.store.Revoke(revoked.ID, t0); err != nil {
		t.Fatal(err)
	}
	_, expiredSecret := f.key(t, keystore.NewKey{Account: "acme", Scopes: []string{"chat:write"}, ExpiresAt: t0.Add(time.Minute)})
	f.setNow(t0.Add(time.Hour))

	const invalid = "Invalid API key"
	tests := []struct {
		name    string
		give    *authv3.CheckRequest
		status  int
		typ     string
		message string // substring
	}{
		{"empty request", &authv3.CheckRequest{}, 401, "authentication_error", invalid},
		{"no authorization header", req("POST", "/v1/chat/completions", nil), 401, "authentication_error", invalid},
		{"basic scheme", req("POST", "/v1/chat/completions", map[string]string{"authorization": "Basic " + secret}), 401, "authentication_error", invalid},
		{"bearer without token", req("POST", "/v1/chat/completions", map[string]string{"authorization": "Bearer "}), 401, "authentication_error", invalid},
		{"unknown key", req("POST", "/v1/chat/completions", bearer("kg_"+strings.Repeat("a", 38))), 401, "authentication_error", invalid},
		{"garbage key", req("POST", "/v1/chat/completions", bearer("\x00é<script>\u202e")), 401, "authentication_error", invalid},
		{"revoked key", req("POST", "/v1/chat/completions", bearer(revokedSecret)), 401, "authentication_error", invalid},
		{"expired key", req("POST", "/v1/chat/completions", bearer(expiredSecret)), 401, "authentication_error", invalid},
		{"dot-dot segment", req("POST", "/v1/../v1/chat/completions", bearer(secret)), 400, "invalid_request_error", "path"},
		{"dot segment", req("POST", "/v1/./chat/completions", bearer(secret)), 400, "invalid_request_error", "path"},
		{"double slash", req("POST", "//v1/chat/completions", bearer(secret)), 400, "invalid_request_error", "path"},
		{"encoded slash", req("GET", "/v1/chat/completions/a%2F..%2Fb", bearer(secret)), 400, "invalid_request_error", "path"},
		{"encoded dot", req("GET", "/v1/chat/completions/%2e%2E/x", bearer(secret)), 400, "invalid_request_error", "path"},
		{"backslash", req("GET", `/v1/chat/completions/a\..\b`, bearer(secret)), 400, "invalid_request_error", "path"},
		{"no route", req("POST", "/v1/admin", bearer(secret)), 403, "permission_error", "No route"},
		{"wrong method", req("DELETE", "/v1/chat/completions", bearer(secret)), 403, "permission_error", "No route"},
		{"missing scope", req("POST", "/v1/embeddings", bearer(secret)), 403, "permission_error", "embeddings:write"},
		{"allowed", req("POST", "/v1/chat/completions", bearer(secret)), 200, "", ""},
		{"allowed, query ignored", req("GET", "/v1/chat/completions/abc?x=/../", bearer(secret)), 200, "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := f.check(t, tt.give)
			direct, err := f.srv.Check(context.Background(), tt.give)
			if err != nil {
				t.Fatal(err)
			}
			if d := toOutcome(t, direct); d.status != got.status || d.message != got.message {
				t.Errorf("served path says %d %q, generated-message path says %d %q", got.status, got.message, d.status, d.message)
			}
			if got.status != tt.status || got.typ != tt.typ || !strings.Contains(got.message, tt.message) {
				t.Fatalf("got %d %s %q, want %d %s containing %q", got.status, got.typ, got.message, tt.status, tt.typ, tt.message)
			}
			wantCode := code.Code_OK
			switch {
			case tt.status == 401:
				wantCode = code.Code_UNAUTHENTICATED
			case tt.status != 200:
				wantCode = code.Code_PERMISSION_DENIED
			}
			if got.code != wantCode {
				t.Errorf("gRPC status code %v, want %v", got.code, wantCode)
			}
			if tt.status == 401 && got.headers["www-authenticate"] != "Bearer" {
				t.Errorf("401 without www-authenticate: Bearer: %v", got.headers)
			}
			if tt.status == 401 && got.message != invalid {
				t.Errorf("401 message %q, want exactly %q", got.message, invalid)
			}
		})
	}
}

func TestAllowHeaders(t *testing.T) {
	f := newFixture(t)
	f.account(t, "acme", "free", money.PerUSD)
	k, secret := f.key(t, keystore.NewKey{Account: "acme", Scopes: []string{"chat:write"}})
	h := bearer(secret)
	h["x-keygate-key-id"] = "spoofed"
	h["x-keygate-account"] = "spoofed"
	resp, err := f.client.Check(context.Background(), req("POST", "/v1/chat/completions", h))
	if err != nil {
		t.Fatal(err)
	}
	ok := resp.GetOkResponse()
	if ok == nil {
		t.Fatalf("not allowed: %v", resp)
	}
	if got := ok.GetHeadersToRemove(); len(got) != 1 || got[0] != "authorization" {
		t.Errorf("headers_to_remove = %v, want exactly [authorization]", got)
	}
	want := map[string]string{"x-keygate-key-id": k.ID, "x-keygate-account": "acme"}
	for _, h := range ok.GetHeaders() {
		if h.GetAppendAction() != corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD {
			t.Errorf("%s has append action %v", h.GetHeader().GetKey(), h.GetAppendAction())
		}
		if w, ok := want[h.GetHeader().GetKey()]; ok && h.GetHeader().GetValue() == w {
			delete(want, h.GetHeader().GetKey())
		}
	}
	if len(want) > 0 {
		t.Errorf("upstream headers missing %v in %v", want, ok.GetHeaders())
	}
	rh := map[string]string{}
	for _, h := range ok.GetResponseHeadersToAdd() {
		rh[h.GetHeader().GetKey()] = h.GetHeader().GetValue()
	}
	// The free tier allows 3/m; this was the first request.
	if rh["x-ratelimit-limit-requests"] != "3" || rh["x-ratelimit-remaining-requests"] != "2" || rh["x-ratelimit-reset-requests"] == "" {
		t.Errorf("rate-limit response headers = %v", rh)
	}
}

func TestRawHeaderMap(t *testing.T) {
	f := newFixture(t)
	f.account(t, "acme", "", money.PerUSD)
	_, secret := f.key(t, keystore.NewKey{Account: "acme", Scopes: []string{"chat:write"}})
	raw := func(hs ...*corev3.HeaderValue) *authv3.CheckRequest {
		r := req("POST", "/v1/chat/completions", nil)
		r.Attributes.Request.Http.HeaderMap = &corev3.HeaderMap{Headers: hs}
		return r
	}
	tests := []struct {
		name   string
		give   *authv3.CheckRequest
		status int
	}{
		{"raw value", raw(&corev3.HeaderValue{Key: "authorization", RawValue: []byte("Bearer " + secret)}), 200},
		{"value", raw(&corev3.HeaderValue{Key: "Authorization", Value: "Bearer " + secret}), 200},
		{"repeated authorization", raw(
			&corev3.HeaderValue{Key: "authorization", RawValue: []byte("Bearer " + secret)},
			&corev3.HeaderValue{Key: "authorization", RawValue: []byte("Bearer " + secret)}), 401},
		{"invalid UTF-8", raw(&corev3.HeaderValue{Key: "authorization", RawValue: []byte("Bearer \xff\xfe" + secret)}), 401},
		{"absent", raw(&corev3.HeaderValue{Key: "x-other", RawValue: []byte("1")}), 401},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := f.check(t, tt.give); got.status != tt.status {
				t.Fatalf("status %d, want %d", got.status, tt.status)
			}
		})
	}
}

func TestRateLimit(t *testing.T) {
	f := newFixture(t)
	f.account(t, "acme", "free", money.PerUSD)
	_, own := f.key(t, keystore.NewKey{Account: "acme", Scopes: []string{"chat:read"}, RateLimit: ratelimit.Rate{N: 2, Per: time.Minute}})
	_, tier := f.key(t, keystore.NewKey{Account: "acme", Scopes: []string{"chat:read"}})

	for i := 0; i < 2; i++ {
		if got := f.check(t, req("GET", "/v1/chat/completions/x", bearer(own))); got.status != 200 {
			t.Fatalf("request %d: %d %s", i, got.status, got.message)
		}
	}
	got := f.check(t, req("GET", "/v1/chat/completions/x", bearer(own)))
	if got.status != 429 || got.typ != "rate_limit_error" || got.code != code.Code_PERMISSION_DENIED {
		t.Fatalf("third request within the minute: %+v", got)
	}
	if got.headers["retry-after"] != "30" { // 2/m refills one request every 30 s
		t.Errorf("retry-after = %q, want 30", got.headers["retry-after"])
	}

	// The key's own limit (2/m) overrides the tier's (3/m).
	for i := 0; i < 3; i++ {
		if got := f.check(t, req("GET", "/v1/chat/completions/x", bearer(tier))); got.status != 200 {
			t.Fatalf("tier key request %d: %d", i, got.status)
		}
	}
	if got := f.check(t, req("GET", "/v1/chat/completions/x", bearer(tier))); got.status != 429 {
		t.Fatalf("fourth tier request: %d", got.status)
	}

	f.setNow(t0.Add(30 * time.Second))
	if got := f.check(t, req("GET", "/v1/chat/completions/x", bearer(own))); got.status != 200 {
		t.Fatalf("after refill: %d %s", got.status, got.message)
	}
}

func TestSpend(t *testing.T) {
	f := newFixture(t)
	f.account(t, "poor", "", 3000) // covers one chat completion at 0.002
	_, poor := f.key(t, keystore.NewKey{Account: "poor", Scopes: []string{"chat:write", "chat:read"}})
	f.account(t, "rich", "", 100*money.PerUSD)
	capped, cappedSecret := f.key(t, keystore.NewKey{Account: "rich", Scopes: []string{"chat:write"}, SpendCap: 4000})

	steps := []struct {
		name    string
		secret  string
		method  string
		path    string
		status  int
		message string
	}{
		{"first paid request", poor, "POST", "/v1/chat/completions", 200, ""},
		{"balance below price", poor, "POST", "/v1/chat/completions", 429, "balance"},
		{"price 0 always passes", poor, "GET", "/v1/chat/completions/abc", 200, ""},
		{"under cap", cappedSecret, "POST", "/v1/chat/completions", 200, ""},
		{"reaches cap exactly", cappedSecret, "POST", "/v1/chat/completions", 200, ""},
		{"past cap", cappedSecret, "POST", "/v1/chat/completions", 429, "spending cap"},
	}
	for _, st := range steps {
		got := f.check(t, req(st.method, st.path, bearer(st.secret)))
		if got.status != st.status || !strings.Contains(got.message, st.message) {
			t.Fatalf("%s: got %d %s %q", st.name, got.status, got.typ, got.message)
		}
		if got.status == 429 && got.typ != "insufficient_quota" {
			t.Fatalf("%s: type %q, want insufficient_quota", st.name, got.typ)
		}
	}
	a, err := f.store.Account("poor")
	if err != nil {
		t.Fatal(err)
	}
	if a.Balance != 1000 {
		t.Errorf("poor balance = %d, want 1000", a.Balance)
	}
	k, err := f.store.Key(capped.ID)
	if err != nil {
		t.Fatal(err)
	}
	if k.Spent != 4000 {
		t.Errorf("capped spent = %d, want 4000", k.Spent)
	}
}

// TestConcurrentSpend: 300 concurrent Checks against a balance that covers
// 100 give exactly 100 allows, and the balance ends at zero.
func TestConcurrentSpend(t *testing.T) {
	f := newFixture(t)
	f.account(t, "acme", "", 100*2000)
	var secrets []string
	for i := 0; i < 10; i++ {
		_, s := f.key(t, keystore.NewKey{Account: "acme", Scopes: []string{"chat:write"}, RateLimit: ratelimit.Rate{N: 1000, Per: time.Second}})
		secrets = append(secrets, s)
	}
	var allowed, quota atomic.Int64
	var wg sync.WaitGroup
	for i := 0; i < 300; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			resp, err := f.client.Check(context.Background(), req("POST", "/v1/chat/completions", bearer(secrets[i%len(secrets)])))
			if err != nil {
				t.Error(err)
				return
			}
			switch o := toOutcome(t, resp); {
			case o.status == 200:
				allowed.Add(1)
			case o.typ == "insufficient_quota":
				quota.Add(1)
			default:
				t.Errorf("unexpected %+v", o)
			}
		}(i)
	}
	wg.Wait()
	if allowed.Load() != 100 || quota.Load() != 200 {
		t.Fatalf("allowed %d, insufficient_quota %d; want 100 and 200", allowed.Load(), quota.Load())
	}
	if a, _ := f.store.Account("acme"); a.Balance != 0 {
		t.Fatalf("balance %d, want 0", a.Balance)
	}
}

// TestSecretNeverLogged runs allowed and denied Checks with debug logging on
// and looks for the secret in every field of every entry.
func TestSecretNeverLogged(t *testing.T) {
	f := newFixture(t)
	f.account(t, "acme", "", 0)
	_, secret := f.key(t, keystore.NewKey{Account: "acme", Scopes: []string{"chat:read"}})
	for _, r := range []*authv3.CheckRequest{
		req("GET", "/v1/chat/completions/x", bearer(secret)),
		req("POST", "/v1/chat/completions", bearer(secret)), // 403
		req("GET", "/v1/../x", bearer(secret)),              // 400
		req("GET", "/v1/chat/completions/x", bearer(secret+"x")),
	} {
		f.check(t, r)
	}
	if f.logs.Len() == 0 {
		t.Fatal("no log entries: the test would prove nothing")
	}
	for _, e := range f.logs.All() {
		if s := fmt.Sprint(e.Message, e.ContextMap()); strings.Contains(s, secret[4:20]) {
			t.Fatalf("secret in log entry: %s", s)
		}
	}
}
