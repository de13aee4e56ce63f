package main_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
)

// Bounds on waiting. They are generous (the machine is small and shared, and
// the binary may be race-instrumented) and only ever end a wait early when
// the awaited thing happens: no test asserts on how fast anything is.
const (
	startTimeout = 20 * time.Second // serve until /readyz answers 200
	stopTimeout  = 20 * time.Second // SIGTERM until exit
	cliTimeout   = 30 * time.Second // one CLI command
	rpcTimeout   = 10 * time.Second // one Check
)

// exampleConfig is the README's configuration; tests append fields to it.
const exampleConfig = `tiers:
  free:  {rate_limit: 20/m}
  tier1: {rate_limit: 500/m}
default_tier: free
routes:
  - {method: POST, path: /v1/chat/completions, scope: chat:write, price_usd: "0.002"}
  - {method: GET,  path_prefix: /v1/chat/completions/, scope: chat:read}
  - {method: POST, path: /v1/embeddings, scope: embeddings:write, price_usd: "0.0001"}
  - {method: POST, path: /v1/images/generations, scope: images:write, price_usd: "0.04"}
`

// Prices of the example routes, in micro-USD.
const (
	priceChat      = 2000 // POST /v1/chat/completions
	priceEmbedding = 100  // POST /v1/embeddings
)

// ---------------------------------------------------------------------------
// Processes

// syncBuffer collects a process's output while the process writes it.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// baseEnv is the test's environment without KEYGATE_ADMIN_TOKEN, so that a
// developer's own token never leaks into a test. A race-instrumented binary
// would sleep a second at every exit; GORACE turns that off.
func baseEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "KEYGATE_ADMIN_TOKEN=") && !strings.HasPrefix(kv, "GORACE=") {
			env = append(env, kv)
		}
	}
	return append(env, "GORACE=atexit_sleep_ms=0")
}

func envWithToken(token string) []string {
	return append(baseEnv(), "KEYGATE_ADMIN_TOKEN="+token)
}

// freeAddr returns a loopback address whose port was free a moment ago.
func freeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("picking a free port: %v", err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

// proc is a started keygate process.
type proc struct {
	cmd    *exec.Cmd
	out    *syncBuffer // stdout and stderr together
	exited chan struct{}
	code   int // valid once exited is closed
}

func startProc(t testing.TB, env []string, args ...string) *proc {
	t.Helper()
	p := &proc{out: new(syncBuffer), exited: make(chan struct{})}
	p.cmd = exec.Command(keygateBinary(t), args...)
	p.cmd.Env = env
	p.cmd.Stdout = p.out
	p.cmd.Stderr = p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("starting keygate %v: %v", args, err)
	}
	go func() {
		p.cmd.Wait() //nolint:errcheck // the exit code is what matters
		p.code = p.cmd.ProcessState.ExitCode()
		close(p.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-p.exited:
		default:
			p.cmd.Process.Kill() //nolint:errcheck // it may just have exited
			<-p.exited
		}
	})
	return p
}

func (p *proc) running() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// wait waits at most d for the process to exit and returns its exit code;
// ok is false if it is still running.
func (p *proc) wait(d time.Duration) (code int, ok bool) {
	select {
	case <-p.exited:
		return p.code, true
	case <-time.After(d):
		return 0, false
	}
}

// ---------------------------------------------------------------------------
// The server

type serverOpts struct {
	db      string // store file; default: a new one in a temp dir
	config  string // YAML written to a file and passed as --config; "" = built-in
	noToken bool   // start without KEYGATE_ADMIN_TOKEN
}

// server is a running `keygate serve`.
type server struct {
	t      testing.TB
	db     string
	token  string
	listen string // ext_authz + grpc.health.v1
	admin  string // admin API
	http   string // /metrics, /healthz, /readyz
	*proc

	connOnce sync.Once
	conn     *grpc.ClientConn
}

// startServer starts `keygate serve` on fresh loopback ports and waits until
// /readyz answers 200. The server is killed at cleanup if still running.
func startServer(t testing.TB, o serverOpts) *server {
	t.Helper()
	dir := t.TempDir()
	if o.db == "" {
		o.db = filepath.Join(dir, "keygate.db")
	}
	var cfgPath string
	if o.config != "" {
		cfgPath = filepath.Join(dir, "keygate.yaml")
		if err := os.WriteFile(cfgPath, []byte(o.config), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	token := ""
	if !o.noToken {
		token = "e2e-admin-token-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	}
	// A port picked free may be taken by someone else before serve binds it:
	// try again with new ports then.
	for attempt := 1; ; attempt++ {
		s := &server{t: t, db: o.db, token: token,
			listen: freeAddr(t), admin: freeAddr(t), http: freeAddr(t)}
		args := []string{"serve", "--db", s.db, "--listen", s.listen, "--admin-listen", s.admin, "--http-listen", s.http}
		if cfgPath != "" {
			args = append(args, "--config", cfgPath)
		}
		env := baseEnv()
		if token != "" {
			env = envWithToken(token)
		}
		s.proc = startProc(t, env, args...)
		err := s.waitReady()
		if err == nil {
			t.Cleanup(func() {
				if s.conn != nil {
					s.conn.Close()
				}
				if t.Failed() {
					t.Logf("keygate serve (db %s) output:\n%s", s.db, s.out.String())
				}
			})
			return s
		}
		out := s.out.String()
		if s.running() {
			s.cmd.Process.Kill() //nolint:errcheck // may have exited meanwhile
			<-s.exited
		}
		if attempt < 3 && strings.Contains(out, "address already in use") {
			continue
		}
		t.Fatalf("keygate serve did not become ready: %v\noutput:\n%s", err, out)
	}
}

func (s *server) waitReady() error {
	deadline := time.Now().Add(startTimeout)
	hc := &http.Client{Timeout: time.Second}
	for time.Now().Before(deadline) {
		if !s.running() {
			return fmt.Errorf("exited with code %d", s.code)
		}
		resp, err := hc.Get("http://" + s.http + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("/readyz not 200 after %s", startTimeout)
}

// stop sends SIGTERM and requires a clean exit (code 0) with no data race
// or panic reported.
func (s *server) stop(t testing.TB) {
	t.Helper()
	s.stopWith(t, syscall.SIGTERM)
}

func (s *server) stopWith(t testing.TB, sig os.Signal) {
	t.Helper()
	if err := s.cmd.Process.Signal(sig); err != nil {
		t.Fatalf("%s: %v", sig, err)
	}
	code, ok := s.wait(stopTimeout)
	if !ok {
		t.Fatalf("keygate serve still running %s after %s\noutput:\n%s", stopTimeout, sig, s.out.String())
	}
	if code != 0 {
		t.Errorf("keygate serve exit code after %s = %d, want 0\noutput:\n%s", sig, code, s.out.String())
	}
	s.checkLogsClean(t)
}

// kill sends SIGKILL: a crash.
func (s *server) kill(t testing.TB) {
	t.Helper()
	if err := s.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatalf("SIGKILL: %v", err)
	}
	if _, ok := s.wait(stopTimeout); !ok {
		t.Fatalf("keygate serve still running after SIGKILL")
	}
	s.checkLogsClean(t)
}

func (s *server) checkLogsClean(t testing.TB) {
	t.Helper()
	out := s.out.String()
	for _, bad := range []string{"DATA RACE", "panic", "goroutine "} {
		if strings.Contains(out, bad) {
			t.Errorf("keygate serve output contains %q:\n%s", bad, out)
		}
	}
}

// ---------------------------------------------------------------------------
// The CLI

type result struct {
	stdout, stderr string
	code           int
}

func (r result) String() string {
	return fmt.Sprintf("exit %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
}

// runKeygate runs the keygate CLI with env and args and returns what it printed.
func runKeygate(t testing.TB, env []string, args ...string) result {
	t.Helper()
	return runKeygateIn(t, "", env, args...)
}

// runKeygateIn is runKeygate in the working directory dir ("": this one).
func runKeygateIn(t testing.TB, dir string, env []string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), cliTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, keygateBinary(t), args...)
	cmd.Env, cmd.Dir = env, dir
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	r := result{stdout: stdout.String(), stderr: stderr.String()}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
	default:
		t.Fatalf("keygate %v: %v", args, err)
	}
	if ctx.Err() != nil {
		t.Fatalf("keygate %v did not finish within %s\n%s", args, cliTimeout, r)
	}
	if strings.Contains(r.stderr, "DATA RACE") {
		t.Errorf("keygate %v reported a data race:\n%s", args, r.stderr)
	}
	return r
}

// cli runs an admin command through s with the right token; --server is
// appended after args.
func (s *server) cli(t testing.TB, args ...string) result {
	t.Helper()
	return runKeygate(t, envWithToken(s.token), append(args, "--server", s.admin)...)
}

// ok runs an admin command through s with -o json, requires exit 0 and
// decodes stdout into v (which may be nil).
func (s *server) ok(t testing.TB, v any, args ...string) {
	t.Helper()
	r := s.cli(t, append(args, "-o", "json")...)
	mustJSON(t, r, v, args)
}

// dbOK runs an admin command on a store file with --db (no token), with
// -o json, requires exit 0 and decodes stdout into v.
func dbOK(t testing.TB, db string, v any, args ...string) {
	t.Helper()
	r := runKeygate(t, baseEnv(), append(args, "--db", db, "-o", "json")...)
	mustJSON(t, r, v, args)
}

func mustJSON(t testing.TB, r result, v any, args []string) {
	t.Helper()
	if r.code != 0 {
		t.Fatalf("keygate %v: %s", args, r)
	}
	if v == nil {
		return
	}
	dec := json.NewDecoder(strings.NewReader(r.stdout))
	if err := dec.Decode(v); err != nil {
		t.Fatalf("keygate %v: stdout is not the JSON expected: %v\n%s", args, err, r)
	}
	if dec.More() {
		t.Fatalf("keygate %v: stdout has more than one JSON value\n%s", args, r)
	}
}

// The JSON views scripts rely on. Decoding into int64 also checks that money
// is an integer.
type accountJSON struct {
	ID            string `json:"id"`
	Tier          string `json:"tier"`
	BalanceMicros int64  `json:"balance_micros"`
}

type keyJSON struct {
	ID             string     `json:"id"`
	Account        string     `json:"account"`
	Name           string     `json:"name"`
	Scopes         []string   `json:"scopes"`
	State          string     `json:"state"`
	RateLimit      string     `json:"rate_limit"`
	SpendCapMicros *int64     `json:"spend_cap_micros"`
	SpentMicros    int64      `json:"spent_micros"`
	ExpiresAt      *time.Time `json:"expires_at"`
	RevokedAt      *time.Time `json:"revoked_at"`
	Secret         string     `json:"secret"`
	OldKey         *keyJSON   `json:"old_key"`
}

func (s *server) createAccount(t testing.TB, id, balance string, extra ...string) accountJSON {
	t.Helper()
	var a accountJSON
	s.ok(t, &a, append([]string{"accounts", "create", id, "--balance", balance}, extra...)...)
	return a
}

func (s *server) createKey(t testing.TB, account, scopes string, extra ...string) keyJSON {
	t.Helper()
	var k keyJSON
	s.ok(t, &k, append([]string{"keys", "create", "--account", account, "--scopes", scopes}, extra...)...)
	if k.ID == "" || k.Secret == "" {
		t.Fatalf("keys create -o json: id %q, secret %q: want both", k.ID, k.Secret)
	}
	return k
}

func (s *server) account(t testing.TB, id string) accountJSON {
	t.Helper()
	var a accountJSON
	s.ok(t, &a, "accounts", "get", id)
	return a
}

func (s *server) key(t testing.TB, id string) keyJSON {
	t.Helper()
	var k keyJSON
	s.ok(t, &k, "keys", "get", id)
	return k
}

// ---------------------------------------------------------------------------
// Checks

// authz returns an ext_authz client on s's --listen address (one shared
// connection, as Envoy keeps).
func (s *server) authz(t testing.TB) authv3.AuthorizationClient {
	t.Helper()
	s.connOnce.Do(func() { s.conn = dial(t, s.listen) })
	return authv3.NewAuthorizationClient(s.conn)
}

func dial(t testing.TB, addr string) *grpc.ClientConn {
	t.Helper()
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatalf("grpc.NewClient(%s): %v", addr, err)
	}
	return cc
}

var requestSeq struct {
	sync.Mutex
	n int
}

func requestID() string {
	requestSeq.Lock()
	defer requestSeq.Unlock()
	requestSeq.n++
	return fmt.Sprintf("e2e-%d-%d", time.Now().UnixNano(), requestSeq.n)
}

// envoyRequest is a CheckRequest as Envoy's ext_authz filter sends it for an
// HTTP/1.1 request to api.example.com, with extra headers added (and
// overriding the defaults).
func envoyRequest(method, path string, extra map[string]string) *authv3.CheckRequest {
	id := requestID()
	h := map[string]string{
		":method":           method,
		":path":             path,
		":authority":        "api.example.com",
		":scheme":           "https",
		"x-request-id":      id,
		"user-agent":        "openai-python/1.54.0",
		"accept":            "application/json",
		"content-type":      "application/json",
		"x-forwarded-proto": "https",
		"x-forwarded-for":   "203.0.113.7",
	}
	for k, v := range extra {
		h[k] = v
	}
	return &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Source: &authv3.AttributeContext_Peer{Address: &corev3.Address{Address: &corev3.Address_SocketAddress{
			SocketAddress: &corev3.SocketAddress{Address: "203.0.113.7", PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: 51234}}}}},
		Destination: &authv3.AttributeContext_Peer{Address: &corev3.Address{Address: &corev3.Address_SocketAddress{
			SocketAddress: &corev3.SocketAddress{Address: "10.0.0.5", PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: 8080}}}}},
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
			Id: id, Method: method, Path: path, Host: "api.example.com", Scheme: "https",
			Protocol: "HTTP/1.1", Headers: h, Size: 0,
		}},
	}}
}

// bearerRequest is envoyRequest with Authorization: Bearer secret.
func bearerRequest(secret, method, path string) *authv3.CheckRequest {
	return envoyRequest(method, path, map[string]string{"authorization": "Bearer " + secret})
}

// rawRequest is envoyRequest as sent with encode_raw_headers: every header in
// header_map with its value in raw_value, and no headers map.
func rawRequest(method, path string, extra map[string]string) *authv3.CheckRequest {
	req := envoyRequest(method, path, extra)
	h := req.Attributes.Request.Http
	for k, v := range h.Headers {
		if h.HeaderMap == nil {
			h.HeaderMap = &corev3.HeaderMap{}
		}
		h.HeaderMap.Headers = append(h.HeaderMap.Headers, &corev3.HeaderValue{Key: k, RawValue: []byte(v)})
	}
	h.Headers = nil
	return req
}

func (s *server) check(t testing.TB, req *authv3.CheckRequest) *authv3.CheckResponse {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
	defer cancel()
	resp, err := s.authz(t).Check(ctx, req)
	if err != nil {
		t.Fatalf("Check %s %s: %v", req.GetAttributes().GetRequest().GetHttp().GetMethod(),
			req.GetAttributes().GetRequest().GetHttp().GetPath(), err)
	}
	return resp
}

// checkKey sends one Envoy-like Check with the key and decodes the answer.
func (s *server) checkKey(t testing.TB, secret, method, path string) decision {
	t.Helper()
	return decode(t, s.check(t, bearerRequest(secret, method, path)))
}

// decision is a CheckResponse flattened for assertions.
type decision struct {
	allowed  bool
	grpcCode codes.Code
	status   int               // HTTP status of a denial; 200 when allowed
	headers  map[string]string // denial headers, or headers set upstream when allowed
	actions  map[string]corev3.HeaderValueOption_HeaderAppendAction
	respHdrs map[string]string // allowed: added to the upstream's response
	remove   []string          // allowed: headers_to_remove
	body     string
	errType  string
	errMsg   string
}

func (d decision) String() string {
	if d.allowed {
		return fmt.Sprintf("allowed (grpc %s) headers %v response headers %v remove %v", d.grpcCode, d.headers, d.respHdrs, d.remove)
	}
	return fmt.Sprintf("denied %d (grpc %s) headers %v body %s", d.status, d.grpcCode, d.headers, d.body)
}

func decode(t testing.TB, r *authv3.CheckResponse) decision {
	t.Helper()
	d := decision{grpcCode: codes.Code(r.GetStatus().GetCode()), headers: map[string]string{},
		actions: map[string]corev3.HeaderValueOption_HeaderAppendAction{}, respHdrs: map[string]string{}}
	addHeaders := func(into map[string]string, hs []*corev3.HeaderValueOption) {
		for _, h := range hs {
			k := strings.ToLower(h.GetHeader().GetKey())
			if _, dup := into[k]; dup {
				t.Errorf("header %s set twice in %v", k, r)
			}
			into[k] = h.GetHeader().GetValue()
			d.actions[k] = h.GetAppendAction()
		}
	}
	if ok := r.GetOkResponse(); ok != nil || (r.GetDeniedResponse() == nil && d.grpcCode == codes.OK) {
		d.allowed, d.status = true, 200
		addHeaders(d.headers, ok.GetHeaders())
		addHeaders(d.respHdrs, ok.GetResponseHeadersToAdd())
		d.remove = ok.GetHeadersToRemove()
		return d
	}
	den := r.GetDeniedResponse()
	d.status = int(den.GetStatus().GetCode())
	addHeaders(d.headers, den.GetHeaders())
	d.body = den.GetBody()
	var body struct {
		Error struct {
			Type    string `json:"type"`
			Message string `json:"message"`
		} `json:"error"`
	}
	if err := json.Unmarshal([]byte(d.body), &body); err != nil {
		t.Errorf("denial body is not the JSON error object: %v\n%s", err, d.body)
	}
	d.errType, d.errMsg = body.Error.Type, body.Error.Message
	return d
}

// wantAllowed fails unless d allows the request for key and account with the
// headers the contract lists.
func wantAllowed(t testing.TB, d decision, keyID, account string) {
	t.Helper()
	if !d.allowed {
		t.Fatalf("want allowed, got %s", d)
	}
	if d.grpcCode != codes.OK {
		t.Errorf("allowed with gRPC status %s, want OK", d.grpcCode)
	}
	if got := d.headers["x-keygate-key-id"]; got != keyID {
		t.Errorf("x-keygate-key-id = %q, want %q", got, keyID)
	}
	if got := d.headers["x-keygate-account"]; got != account {
		t.Errorf("x-keygate-account = %q, want %q", got, account)
	}
	if len(d.remove) != 1 || d.remove[0] != "authorization" {
		t.Errorf("headers_to_remove = %q, want exactly [authorization]", d.remove)
	}
}

// wantDenied fails unless d is a denial with the status and error type, the
// JSON content type, the gRPC code the status calls for, and on 401 the
// www-authenticate challenge.
func wantDenied(t testing.TB, d decision, status int, errType string) {
	t.Helper()
	if d.allowed {
		t.Fatalf("want denied %d %s, got %s", status, errType, d)
	}
	if d.status != status || d.errType != errType {
		t.Errorf("got %d %q, want %d %q (%s)", d.status, d.errType, status, errType, d)
	}
	wantCode := codes.PermissionDenied
	if status == 401 {
		wantCode = codes.Unauthenticated
		if got := d.headers["www-authenticate"]; got != "Bearer" {
			t.Errorf("401 www-authenticate = %q, want Bearer (%s)", got, d)
		}
	}
	if d.grpcCode != wantCode {
		t.Errorf("gRPC status %s, want %s (%s)", d.grpcCode, wantCode, d)
	}
	if got := d.headers["content-type"]; got != "application/json" {
		t.Errorf("content-type = %q, want application/json (%s)", got, d)
	}
	if d.errMsg == "" {
		t.Errorf("denial without a message: %s", d)
	}
}

// wantInvalidKey is the 401 of an unknown, malformed, revoked or expired key.
func wantInvalidKey(t testing.TB, d decision) {
	t.Helper()
	wantDenied(t, d, 401, "authentication_error")
	if d.errMsg != "Invalid API key" {
		t.Errorf("401 message = %q, want exactly %q", d.errMsg, "Invalid API key")
	}
}

// ---------------------------------------------------------------------------
// HTTP and metrics

func httpGet(t testing.TB, url string) (int, string) {
	t.Helper()
	hc := &http.Client{Timeout: 5 * time.Second}
	resp, err := hc.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: reading body: %v", url, err)
	}
	return resp.StatusCode, string(b)
}

var sampleLine = regexp.MustCompile(`^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)`)

// metricSum adds up the samples of the metric name whose labels contain every
// one of the given label pairs (written `result="allow"`).
func metricSum(t testing.TB, s *server, name string, labels ...string) float64 {
	t.Helper()
	code, body := httpGet(t, "http://"+s.http+"/metrics")
	if code != 200 {
		t.Fatalf("/metrics: status %d", code)
	}
	var sum float64
	for _, line := range strings.Split(body, "\n") {
		m := sampleLine.FindStringSubmatch(line)
		if m == nil || m[1] != name {
			continue
		}
		match := true
		for _, l := range labels {
			if !strings.Contains(m[2], l) {
				match = false
			}
		}
		if !match {
			continue
		}
		v, err := strconv.ParseFloat(m[3], 64)
		if err != nil {
			t.Fatalf("/metrics: %q: %v", line, err)
		}
		sum += v
	}
	return sum
}

// eventually polls cond every 20ms until it is true or d has passed.
func eventually(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// wantFailure fails unless r is a non-zero exit with nothing on stdout and
// every one of want (case-insensitive) in stderr.
func wantFailure(t testing.TB, r result, want ...string) {
	t.Helper()
	if r.code == 0 {
		t.Errorf("exit 0, want an error\n%s", r)
		return
	}
	if strings.TrimSpace(r.stdout) != "" {
		t.Errorf("stdout not empty on error\n%s", r)
	}
	for _, w := range want {
		if !strings.Contains(strings.ToLower(r.stderr), strings.ToLower(w)) {
			t.Errorf("stderr does not name %q\n%s", w, r)
		}
	}
	if strings.Contains(r.stderr, "panic") || strings.Contains(r.stderr, "goroutine ") {
		t.Errorf("keygate panicked\n%s", r)
	}
}
