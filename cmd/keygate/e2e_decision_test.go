package main_test

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"math/rand/v2"
	"slices"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// decisionConfig is the README's config at debug level (so that the test can
// show that even debug logs never carry a secret) with one operator-added
// free route.
const decisionConfig = exampleConfig + `  - {method: GET, path: /v1/models, scope: models:read}
log_level: debug
`

var accountChars = regexp.MustCompile(`[^a-z0-9._-]+`)

// secrets collects every secret a test has seen, to search logs and files for.
type secrets struct {
	mu   sync.Mutex
	list []string
}

func (s *secrets) add(k keyJSON) keyJSON {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.list = append(s.list, k.Secret)
	return k
}

// wantAbsent fails if any secret, or its random part, occurs in data.
func (s *secrets) wantAbsent(t *testing.T, what string, data []byte) {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.list) == 0 {
		t.Fatal("no secrets collected: the check below could not fail")
	}
	for _, sec := range s.list {
		if bytes.Contains(data, []byte(sec)) || bytes.Contains(data, []byte(strings.TrimPrefix(sec, "kg_"))) {
			t.Errorf("%s contains the secret %s", what, sec)
		}
	}
}

// TestE2EDecision walks every step of the decision through the real server,
// then stops it and searches its debug logs and its store for the secrets.
func TestE2EDecision(t *testing.T) {
	t.Parallel()
	s := startServer(t, serverOpts{config: decisionConfig})
	var seen secrets
	// Each subtest has its own account and keys: they run in parallel and
	// their balances and rate limits must not mix.
	var accounts atomic.Int64
	acct := func(t *testing.T, balance string, extra ...string) string {
		name := accountChars.ReplaceAllString(strings.ToLower(t.Name()), "-")
		if len(name) > 50 {
			name = name[len(name)-50:]
		}
		id := "a" + strconv.FormatInt(accounts.Add(1), 10) + "-" + name
		s.createAccount(t, id, balance, extra...)
		return id
	}
	key := func(t *testing.T, account, scopes string, extra ...string) keyJSON {
		return seen.add(s.createKey(t, account, scopes, extra...))
	}
	const fast = "1000/s" // a rate limit that never gets in the way

	// A valid secret that this server has never seen: minted in another store.
	otherDB := filepath.Join(t.TempDir(), "other.db")
	dbOK(t, otherDB, nil, "accounts", "create", "other")
	var foreign keyJSON
	dbOK(t, otherDB, &foreign, "keys", "create", "--account", "other", "--scopes", "chat:write")
	seen.add(foreign)

	t.Run("steps", func(t *testing.T) {
		t.Run("401", func(t *testing.T) {
			t.Parallel()
			a := acct(t, "10")
			k := key(t, a, "chat:write", "--rate-limit", fast)
			revoked := key(t, a, "chat:write", "--rate-limit", fast)
			s.ok(t, nil, "keys", "revoke", revoked.ID)
			last := "A"
			if strings.HasSuffix(k.Secret, last) {
				last = "B"
			}
			flipped := k.Secret[:len(k.Secret)-1] + last // a checksum character changed
			// "All auth errors use status 401 and the body
			// {"error":{"type":"authentication_error","message":"Invalid API key"}}."
			tests := []struct {
				name string
				auth string // "" sends no authorization header
			}{
				{name: "no header"},
				{name: "basic", auth: "Basic dXNlcjpwYXNzd29yZA=="},
				{name: "scheme only", auth: "Bearer"},
				{name: "empty token", auth: "Bearer "},
				{name: "secret without scheme", auth: k.Secret},
				{name: "token scheme", auth: "Token " + k.Secret},
				{name: "two tokens", auth: "Bearer " + k.Secret + " " + k.Secret},
				{name: "malformed", auth: "Bearer not-a-keygate-key"},
				{name: "bad checksum", auth: "Bearer " + flipped},
				{name: "truncated", auth: "Bearer " + k.Secret[:len(k.Secret)-3]},
				{name: "unknown", auth: "Bearer " + foreign.Secret},
				{name: "revoked", auth: "Bearer " + revoked.Secret},
			}
			for _, tt := range tests {
				t.Run(tt.name, func(t *testing.T) {
					hdr := map[string]string{}
					if tt.auth != "" {
						hdr["authorization"] = tt.auth
					}
					d := decode(t, s.check(t, envoyRequest("POST", "/v1/chat/completions", hdr)))
					wantInvalidKey(t, d)
					if strings.Contains(d.body, k.Secret) || strings.Contains(d.body, foreign.Secret) {
						t.Errorf("denial echoes the secret: %s", d.body)
					}
				})
			}
			t.Run("authentication comes before the path", func(t *testing.T) {
				wantDenied(t, s.checkKey(t, foreign.Secret, "POST", "/v1/../admin"), 401, "authentication_error")
			})
			// The valid key itself still works, and nothing above was charged.
			wantAllowed(t, s.checkKey(t, k.Secret, "POST", "/v1/chat/completions"), k.ID, a)
			if got := s.account(t, a).BalanceMicros; got != 10_000_000-priceChat {
				t.Errorf("balance = %d, want %d: only the one allowed request is charged", got, 10_000_000-priceChat)
			}
		})

		t.Run("400 path tricks", func(t *testing.T) {
			t.Parallel()
			a := acct(t, "10")
			k := key(t, a, "chat:write,chat:read,embeddings:write", "--rate-limit", fast)
			for _, p := range []string{
				"/v1/chat/../chat/completions",
				"/v1/embeddings/../chat/completions",
				"/v1/chat/completions/..",
				"/v1/./chat/completions",
				"/v1/chat/completions/.",
				"/v1//chat/completions",
				"//v1/chat/completions",
				"/v1/chat%2fcompletions",
				"/v1/chat%2Fcompletions",
				"/v1/%2e%2e/v1/chat/completions",
				"/v1/%2E%2E/v1/chat/completions",
				"/v1/%2e/chat/completions",
				"/v1/%2E/chat/completions",
				"/v1/chat/completions/%2e%2e/x",
				"/v1\\chat\\completions",
				"/v1/chat/completions\\",
				"/v1/chat/completions/..;/x",
				"/v1/chat/completions/../../v1/embeddings?x=1",
			} {
				t.Run(p, func(t *testing.T) {
					for _, m := range []string{"POST", "GET"} {
						wantDenied(t, s.checkKey(t, k.Secret, m, p), 400, "invalid_request_error")
					}
				})
			}
			t.Run("the query string is not part of the match", func(t *testing.T) {
				wantAllowed(t, s.checkKey(t, k.Secret, "POST", "/v1/chat/completions?stream=true&user=a%2Fb"), k.ID, a)
			})
			if got := s.account(t, a).BalanceMicros; got != 10_000_000-priceChat {
				t.Errorf("balance = %d, want %d: refused paths must not be charged", got, 10_000_000-priceChat)
			}
		})

		t.Run("403", func(t *testing.T) {
			t.Parallel()
			a := acct(t, "10")
			reader := key(t, a, "chat:read", "--rate-limit", fast)
			writer := key(t, a, "chat:write", "--rate-limit", fast)
			tests := []struct {
				name, secret, method, path string
				wantInMsg                  string
			}{
				{"no route", writer.Secret, "POST", "/v1/unknown", "/v1/unknown"},
				{"no route for the method", writer.Secret, "DELETE", "/v1/chat/completions", "DELETE"},
				{"prefix route needs the slash", reader.Secret, "GET", "/v1/chat/completions", ""},
				{"missing chat:write", reader.Secret, "POST", "/v1/chat/completions", "chat:write"},
				{"missing embeddings:write", writer.Secret, "POST", "/v1/embeddings", "embeddings:write"},
				{"missing images:write", writer.Secret, "POST", "/v1/images/generations", "images:write"},
				{"missing chat:read", writer.Secret, "GET", "/v1/chat/completions/chatcmpl-123", "chat:read"},
				{"missing operator scope", writer.Secret, "GET", "/v1/models", "models:read"},
			}
			for _, tt := range tests {
				t.Run(tt.name, func(t *testing.T) {
					d := s.checkKey(t, tt.secret, tt.method, tt.path)
					wantDenied(t, d, 403, "permission_error")
					if !strings.Contains(d.errMsg, tt.wantInMsg) {
						t.Errorf("message %q does not name %q", d.errMsg, tt.wantInMsg)
					}
				})
			}
			if got := s.account(t, a).BalanceMicros; got != 10_000_000 {
				t.Errorf("balance = %d, want 10000000: refused requests must not be charged", got)
			}
		})

		t.Run("429 rate limit", func(t *testing.T) {
			t.Parallel()
			a := acct(t, "10")
			k := key(t, a, "chat:write", "--rate-limit", "2/m")
			for i, wantRemaining := range []string{"1", "0"} {
				d := s.checkKey(t, k.Secret, "POST", "/v1/chat/completions")
				wantAllowed(t, d, k.ID, a)
				if d.respHdrs["x-ratelimit-limit-requests"] != "2" || d.respHdrs["x-ratelimit-remaining-requests"] != wantRemaining {
					t.Errorf("request %d: rate headers %v, want limit 2 remaining %s", i+1, d.respHdrs, wantRemaining)
				}
			}
			d := s.checkKey(t, k.Secret, "POST", "/v1/chat/completions")
			wantDenied(t, d, 429, "rate_limit_error")
			ra, err := strconv.Atoi(d.headers["retry-after"])
			if err != nil || ra < 1 || ra > 30 { // 2/m: a token every 30s
				t.Errorf("retry-after = %q, want whole seconds from 1 to 30", d.headers["retry-after"])
			}
			if got := s.account(t, a).BalanceMicros; got != 10_000_000-2*priceChat {
				t.Errorf("balance = %d, want %d: the limited request must not be charged", got, 10_000_000-2*priceChat)
			}
		})

		t.Run("tier rate limit", func(t *testing.T) {
			t.Parallel()
			for tier, want := range map[string]string{"free": "20", "tier1": "500"} {
				a := acct(t, "10", "--tier", tier)
				k := key(t, a, "chat:write")
				if k.RateLimit != "" {
					t.Errorf("key without --rate-limit has rate_limit %q", k.RateLimit)
				}
				d := s.checkKey(t, k.Secret, "POST", "/v1/chat/completions")
				wantAllowed(t, d, k.ID, a)
				if got := d.respHdrs["x-ratelimit-limit-requests"]; got != want {
					t.Errorf("tier %s: x-ratelimit-limit-requests = %q, want %s", tier, got, want)
				}
			}
		})

		t.Run("429 insufficient quota", func(t *testing.T) {
			t.Parallel()
			poor := acct(t, "0.001999")
			pk := key(t, poor, "chat:write", "--rate-limit", fast)
			db := s.checkKey(t, pk.Secret, "POST", "/v1/chat/completions")
			wantDenied(t, db, 429, "insufficient_quota")
			// The cheaper route still fits the balance.
			ek := key(t, poor, "embeddings:write", "--rate-limit", fast)
			wantAllowed(t, s.checkKey(t, ek.Secret, "POST", "/v1/embeddings"), ek.ID, poor)

			rich := acct(t, "10")
			ck := key(t, rich, "chat:write", "--rate-limit", fast, "--spend-cap", "0.005")
			for range 2 {
				wantAllowed(t, s.checkKey(t, ck.Secret, "POST", "/v1/chat/completions"), ck.ID, rich)
			}
			dc := s.checkKey(t, ck.Secret, "POST", "/v1/chat/completions") // 0.006 > 0.005
			wantDenied(t, dc, 429, "insufficient_quota")
			if db.errMsg == dc.errMsg {
				t.Errorf("balance and spend-cap denials read the same: %q", db.errMsg)
			}
			if !strings.Contains(strings.ToLower(db.errMsg), "balance") {
				t.Errorf("balance denial %q does not say balance", db.errMsg)
			}
			if !strings.Contains(strings.ToLower(dc.errMsg), "cap") {
				t.Errorf("spend-cap denial %q does not say cap", dc.errMsg)
			}
			if got := s.key(t, ck.ID).SpentMicros; got != 2*priceChat {
				t.Errorf("spent = %d, want %d", got, 2*priceChat)
			}
			if got := s.account(t, poor).BalanceMicros; got != 1999-priceEmbedding {
				t.Errorf("poor balance = %d, want %d", got, 1999-priceEmbedding)
			}
		})

		t.Run("price 0 always passes", func(t *testing.T) {
			t.Parallel()
			a := acct(t, "0")
			k := key(t, a, "chat:read,models:read", "--rate-limit", fast, "--spend-cap", "0.000001")
			for range 3 {
				wantAllowed(t, s.checkKey(t, k.Secret, "GET", "/v1/chat/completions/chatcmpl-42"), k.ID, a)
				wantAllowed(t, s.checkKey(t, k.Secret, "GET", "/v1/models"), k.ID, a)
			}
			// A key at its cap on an empty account still passes free routes.
			b := acct(t, "0.002")
			capped := key(t, b, "chat:write,chat:read", "--rate-limit", fast, "--spend-cap", "0.002")
			wantAllowed(t, s.checkKey(t, capped.Secret, "POST", "/v1/chat/completions"), capped.ID, b)
			wantDenied(t, s.checkKey(t, capped.Secret, "POST", "/v1/chat/completions"), 429, "insufficient_quota")
			wantAllowed(t, s.checkKey(t, capped.Secret, "GET", "/v1/chat/completions/chatcmpl-42"), capped.ID, b)
		})

		t.Run("exact boundaries", func(t *testing.T) {
			t.Parallel()
			// A balance equal to the price pays for it; the cap may be reached exactly.
			a := acct(t, "0.004")
			k := key(t, a, "chat:write", "--rate-limit", fast, "--spend-cap", "0.002")
			wantAllowed(t, s.checkKey(t, k.Secret, "POST", "/v1/chat/completions"), k.ID, a)
			d := s.checkKey(t, k.Secret, "POST", "/v1/chat/completions")
			wantDenied(t, d, 429, "insufficient_quota")
			if !strings.Contains(strings.ToLower(d.errMsg), "cap") {
				t.Errorf("at the cap: %q, want the spend-cap message", d.errMsg)
			}
			k2 := key(t, a, "chat:write", "--rate-limit", fast)
			wantAllowed(t, s.checkKey(t, k2.Secret, "POST", "/v1/chat/completions"), k2.ID, a) // balance 0.002 = price
			d = s.checkKey(t, k2.Secret, "POST", "/v1/chat/completions")
			wantDenied(t, d, 429, "insufficient_quota")
			if !strings.Contains(strings.ToLower(d.errMsg), "balance") {
				t.Errorf("at balance 0: %q, want the balance message", d.errMsg)
			}
			if got := s.account(t, a).BalanceMicros; got != 0 {
				t.Errorf("balance = %d, want 0", got)
			}
		})

		t.Run("order: scope before rate limit before spend", func(t *testing.T) {
			t.Parallel()
			a := acct(t, "0")
			k := key(t, a, "chat:read,embeddings:write", "--rate-limit", "1/h")
			// 403s do not use the rate limit.
			for range 3 {
				wantDenied(t, s.checkKey(t, k.Secret, "POST", "/v1/chat/completions"), 403, "permission_error")
			}
			// The one token goes to a request the balance cannot pay for...
			wantDenied(t, s.checkKey(t, k.Secret, "POST", "/v1/embeddings"), 429, "insufficient_quota")
			// ...and the next one is rate limited before the spend is looked at.
			wantDenied(t, s.checkKey(t, k.Secret, "GET", "/v1/chat/completions/x"), 429, "rate_limit_error")
		})

		t.Run("allow headers", func(t *testing.T) {
			t.Parallel()
			a := acct(t, "10")
			k := key(t, a, "chat:write", "--rate-limit", fast)
			req := envoyRequest("POST", "/v1/chat/completions", map[string]string{
				"authorization":     "Bearer " + k.Secret,
				"x-keygate-key-id":  "key_forged",
				"x-keygate-account": "someone-else",
			})
			d := decode(t, s.check(t, req))
			wantAllowed(t, d, k.ID, a)
			for _, h := range []string{"x-keygate-key-id", "x-keygate-account"} {
				if got := d.actions[h]; got != corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD {
					t.Errorf("%s append_action = %s, want OVERWRITE_IF_EXISTS_OR_ADD", h, got)
				}
			}
			for _, h := range d.remove {
				if strings.HasPrefix(h, "x-keygate-") {
					t.Errorf("headers_to_remove lists %s: Envoy would remove the header keygate sets", h)
				}
			}
			for h, v := range d.headers {
				if strings.Contains(v, k.Secret) {
					t.Errorf("upstream header %s carries the secret", h)
				}
			}
			for _, h := range []string{"x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"} {
				if d.respHdrs[h] == "" {
					t.Errorf("response header %s missing: %v", h, d.respHdrs)
				}
			}
			if got := d.respHdrs["x-ratelimit-limit-requests"]; got != "1000" {
				t.Errorf("x-ratelimit-limit-requests = %q, want 1000", got)
			}
		})

		t.Run("raw header_map", func(t *testing.T) {
			t.Parallel()
			a := acct(t, "10")
			k := key(t, a, "chat:write", "--rate-limit", fast)
			d := decode(t, s.check(t, rawRequest("POST", "/v1/chat/completions", map[string]string{"authorization": "Bearer " + k.Secret})))
			wantAllowed(t, d, k.ID, a)
			wantDenied(t, decode(t, s.check(t, rawRequest("POST", "/v1/chat/completions", nil))), 401, "authentication_error")
			wantInvalidKey(t, decode(t, s.check(t, rawRequest("POST", "/v1/chat/completions", map[string]string{"authorization": "Bearer " + foreign.Secret}))))
			wantDenied(t, decode(t, s.check(t, rawRequest("POST", "/v1/embeddings", map[string]string{"authorization": "Bearer " + k.Secret}))), 403, "permission_error")
			wantDenied(t, decode(t, s.check(t, rawRequest("POST", "/v1//chat/completions", map[string]string{"authorization": "Bearer " + k.Secret}))), 400, "invalid_request_error")
			if got := s.account(t, a).BalanceMicros; got != 10_000_000-priceChat {
				t.Errorf("balance = %d, want %d", got, 10_000_000-priceChat)
			}
		})

		t.Run("keygate check", func(t *testing.T) {
			t.Parallel()
			a := acct(t, "10")
			k := key(t, a, "chat:write", "--rate-limit", fast)
			check := func(args ...string) result {
				return runKeygate(t, baseEnv(), append([]string{"check", "--authz", s.listen}, args...)...)
			}
			r := check("--key", k.Secret, "POST", "/v1/chat/completions")
			if r.code != 0 || !strings.Contains(r.stdout, "allowed (200)") || !strings.Contains(r.stdout, "x-keygate-account: "+a) ||
				!strings.Contains(r.stdout, "removed: authorization") || !strings.Contains(r.stdout, "x-ratelimit-limit-requests: 1000") {
				t.Errorf("allowed check:\n%s", r)
			}
			r = check("--key", k.Secret, "POST", "/v1/embeddings")
			if r.code != 1 || !strings.Contains(r.stdout, "denied (403)") || !strings.Contains(r.stdout, "embeddings:write") {
				t.Errorf("denied check: want exit 1 and the 403 body\n%s", r)
			}
			r = check("POST", "/v1/chat/completions")
			if r.code != 1 || !strings.Contains(r.stdout, "denied (401)") || !strings.Contains(r.stdout, "authentication_error") {
				t.Errorf("check without a key: want exit 1 and a 401\n%s", r)
			}
			r = check("--key", k.Secret, "-o", "json", "post", "/v1/chat/completions")
			var v struct {
				Allowed bool              `json:"allowed"`
				Status  int               `json:"status"`
				Headers map[string]string `json:"headers"`
			}
			if err := json.Unmarshal([]byte(r.stdout), &v); err != nil || r.code != 0 || !v.Allowed || v.Status != 200 || v.Headers["x-keygate-key-id"] != k.ID {
				t.Errorf("check -o json: %+v, %v\n%s", v, err, r)
			}
		})

		t.Run("hostile requests", func(t *testing.T) {
			t.Parallel()
			a := acct(t, "10")
			k := key(t, a, "chat:write,chat:read", "--rate-limit", fast)
			bearer := map[string]string{"authorization": "Bearer " + k.Secret}
			withHTTP := func(h *authv3.AttributeContext_HttpRequest) *authv3.CheckRequest {
				return &authv3.CheckRequest{Attributes: &authv3.AttributeContext{Request: &authv3.AttributeContext_Request{Http: h}}}
			}
			manyHeaders := map[string]string{"authorization": "Bearer " + k.Secret}
			for i := range 200 {
				manyHeaders["x-filler-"+strconv.Itoa(i)] = strings.Repeat("v", 4096)
			}
			manyHeaders["x-huge"] = strings.Repeat("h", 1<<20)
			dupAuth := rawRequest("POST", "/v1/chat/completions", bearer)
			dupAuth.Attributes.Request.Http.HeaderMap.Headers = append(dupAuth.Attributes.Request.Http.HeaderMap.Headers,
				&corev3.HeaderValue{Key: "authorization", RawValue: []byte("Bearer " + foreign.Secret)})
			tests := []struct {
				name       string
				req        *authv3.CheckRequest
				mayAllow   bool
				wantStatus int // 0: any denial
			}{
				{name: "empty CheckRequest", req: &authv3.CheckRequest{}, wantStatus: 401},
				{name: "nil request", req: &authv3.CheckRequest{Attributes: &authv3.AttributeContext{}}, wantStatus: 401},
				{name: "nil http", req: &authv3.CheckRequest{Attributes: &authv3.AttributeContext{Request: &authv3.AttributeContext_Request{}}}, wantStatus: 401},
				{name: "empty http", req: withHTTP(&authv3.AttributeContext_HttpRequest{}), wantStatus: 401},
				{name: "key but no method or path", req: withHTTP(&authv3.AttributeContext_HttpRequest{Headers: bearer})},
				{name: "empty path", req: bearerRequest(k.Secret, "POST", "")},
				{name: "relative path", req: bearerRequest(k.Secret, "POST", "v1/chat/completions")},
				{name: "asterisk", req: bearerRequest(k.Secret, "OPTIONS", "*")},
				{name: "absolute URI", req: bearerRequest(k.Secret, "POST", "http://api.example.com/v1/chat/completions")},
				{name: "NUL in path", req: bearerRequest(k.Secret, "POST", "/v1/chat/completions\x00")},
				{name: "encoded NUL", req: bearerRequest(k.Secret, "POST", "/v1/chat/completions%00")},
				{name: "bad escape", req: bearerRequest(k.Secret, "POST", "/v1/chat/completions%zz")},
				{name: "10000-char path", req: bearerRequest(k.Secret, "GET", "/v1/"+strings.Repeat("a", 10_000))},
				{name: "10000 slashes", req: bearerRequest(k.Secret, "GET", strings.Repeat("/", 10_000))},
				{name: "empty method", req: bearerRequest(k.Secret, "", "/v1/chat/completions")},
				{name: "long method", req: bearerRequest(k.Secret, strings.Repeat("P", 5000), "/v1/chat/completions")},
				{name: "1 MiB authorization", req: envoyRequest("POST", "/v1/chat/completions", map[string]string{"authorization": "Bearer " + strings.Repeat("k", 1<<20)}), wantStatus: 401},
				{name: "huge headers", req: envoyRequest("POST", "/v1/chat/completions", manyHeaders), mayAllow: true},
				{name: "raw authorization not UTF-8", req: func() *authv3.CheckRequest {
					r := rawRequest("POST", "/v1/chat/completions", nil)
					h := r.Attributes.Request.Http
					h.HeaderMap.Headers = append(h.HeaderMap.Headers, &corev3.HeaderValue{Key: "authorization", RawValue: []byte("Bearer \xff\xfe\x00kg_")})
					return r
				}(), wantStatus: 401},
				{name: "two raw authorization headers", req: dupAuth},
				{name: "header_map entry without key", req: func() *authv3.CheckRequest {
					r := rawRequest("POST", "/v1/chat/completions", nil)
					h := r.Attributes.Request.Http
					h.HeaderMap.Headers = append(h.HeaderMap.Headers, &corev3.HeaderValue{}, nil)
					return r
				}(), wantStatus: 401},
			}
			for _, tt := range tests {
				t.Run(tt.name, func(t *testing.T) {
					d := decode(t, s.check(t, tt.req))
					if d.allowed {
						if !tt.mayAllow {
							t.Errorf("allowed: %s", d)
						}
						return
					}
					if tt.wantStatus != 0 {
						wantDenied(t, d, tt.wantStatus, "authentication_error")
					}
					if d.errType == "" || d.headers["content-type"] != "application/json" {
						t.Errorf("not a proper denial: %s", d)
					}
					if len(d.body) > 4096 {
						t.Errorf("denial body is %d bytes: client input is echoed unbounded", len(d.body))
					}
				})
			}
			// The server is still there and still right.
			wantAllowed(t, s.checkKey(t, k.Secret, "GET", "/v1/chat/completions/x"), k.ID, a)
			if !s.running() {
				t.Fatal("keygate serve exited")
			}
		})
		t.Run("malformed protobuf", func(t *testing.T) {
			t.Parallel()
			a := acct(t, "10")
			k := key(t, a, "chat:write", "--rate-limit", fast)
			valid, err := proto.Marshal(bearerRequest(k.Secret, "POST", "/v1/chat/completions"))
			if err != nil {
				t.Fatal(err)
			}
			junk := make([]byte, 4096)
			rand.NewChaCha8([32]byte{1}).Read(junk) //nolint:errcheck // never fails
			// CheckRequest.attributes(1).request(4).http(2) with the given fields.
			httpWith := func(fields []byte) []byte {
				h := protowire.AppendBytes(protowire.AppendTag(nil, 2, protowire.BytesType), fields)
				r := protowire.AppendBytes(protowire.AppendTag(nil, 4, protowire.BytesType), h)
				return protowire.AppendBytes(protowire.AppendTag(nil, 1, protowire.BytesType), r)
			}
			str := func(num protowire.Number, v string) []byte {
				return protowire.AppendString(protowire.AppendTag(nil, num, protowire.BytesType), v)
			}
			mapEntry := func(k, v string) []byte { // HttpRequest.headers(3) entry
				return protowire.AppendBytes(protowire.AppendTag(nil, 3, protowire.BytesType), append(str(1, k), str(2, v)...))
			}
			tests := []struct {
				name     string
				body     []byte
				mayAllow bool
			}{
				{name: "random bytes", body: junk},
				{name: "all 0xff", body: bytes.Repeat([]byte{0xff}, 512)},
				{name: "truncated", body: valid[:len(valid)/2]},
				{name: "one byte short", body: valid[:len(valid)-1]},
				{name: "trailing garbage", body: append(slices.Clone(valid), 0x0a)},
				{name: "length past the end", body: protowire.AppendVarint(protowire.AppendTag(nil, 1, protowire.BytesType), 1<<40)},
				{name: "negative length", body: append(protowire.AppendTag(nil, 1, protowire.BytesType), 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01)},
				{name: "wrong wire types", body: protowire.AppendVarint(protowire.AppendTag(nil, 1, protowire.VarintType), 7)},
				{name: "group start without end", body: protowire.AppendTag(nil, 1, protowire.StartGroupType)},
				{name: "path not UTF-8", body: httpWith(append(append(str(2, "POST"), str(4, "/v1/chat/completions\xff\xfe")...), mapEntry("authorization", "Bearer "+k.Secret)...))},
				{name: "authorization not UTF-8", body: httpWith(append(append(str(2, "POST"), str(4, "/v1/chat/completions")...), mapEntry("authorization", "Bearer \xff"+k.Secret)...))},
				{name: "map entry without value", body: httpWith(append(append(str(2, "POST"), str(4, "/v1/chat/completions")...),
					protowire.AppendBytes(protowire.AppendTag(nil, 3, protowire.BytesType), str(1, "authorization"))...))},
				{name: "3 MiB of unknown fields", body: append(protowire.AppendBytes(protowire.AppendTag(nil, 99, protowire.BytesType), make([]byte, 3<<20)), valid...), mayAllow: true},
				{name: "empty", body: []byte{}},
			}
			for _, tt := range tests {
				t.Run(tt.name, func(t *testing.T) {
					ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
					defer cancel()
					var out []byte
					s.authz(t) // dials
					err := s.conn.Invoke(ctx, "/envoy.service.auth.v3.Authorization/Check", &tt.body, &out, grpc.ForceCodecV2(rawCodec{}))
					if err != nil {
						t.Fatalf("Check with %d bytes: %v, want a denial", len(tt.body), err)
					}
					var resp authv3.CheckResponse
					if err := proto.Unmarshal(out, &resp); err != nil {
						t.Fatalf("the answer is not a CheckResponse: %v", err)
					}
					d := decode(t, &resp)
					if d.allowed {
						if !tt.mayAllow {
							t.Errorf("allowed: %s", d)
						}
						return
					}
					if d.errType == "" || d.headers["content-type"] != "application/json" || d.status < 400 {
						t.Errorf("not a proper denial: %s", d)
					}
					if d.status >= 500 {
						t.Errorf("denied %d: keygate hit an internal error on this input: %s", d.status, d)
					}
				})
			}
			wantAllowed(t, s.checkKey(t, k.Secret, "POST", "/v1/chat/completions"), k.ID, a)
		})
	})

	// Admin calls and every kind of Check were made at debug level: stop,
	// then search the logs and the file.
	s.stop(t)
	seen.add(keyJSON{Secret: s.token}) // the admin token is a secret too
	seen.wantAbsent(t, "keygate serve's logs", []byte(s.out.String()))
	if !strings.Contains(s.out.String(), `"denied"`) {
		t.Errorf("no debug log of a denial: the log search above looked at too little\n%s", s.out.String())
	}
	data, err := os.ReadFile(s.db)
	if err != nil {
		t.Fatal(err)
	}
	seen.wantAbsent(t, "the store file", data)
	otherData, err := os.ReadFile(otherDB)
	if err != nil {
		t.Fatal(err)
	}
	seen.wantAbsent(t, "the --db store file", otherData)
}

// TestE2EExactUnderConcurrency races 300 Checks for 100 requests' worth of
// money, through the real server over several connections.
func TestE2EExactUnderConcurrency(t *testing.T) {
	t.Parallel()
	s := startServer(t, serverOpts{})
	const (
		n      = 300
		afford = 100
		conns  = 4
	)
	clients := make([]authv3.AuthorizationClient, conns)
	for i := range clients {
		cc := dial(t, s.listen)
		t.Cleanup(func() { cc.Close() })
		clients[i] = authv3.NewAuthorizationClient(cc)
	}
	// race sends n concurrent Checks with secret and counts the outcomes.
	race := func(t *testing.T, secret string) (allowed int, denials map[string]int) {
		var (
			wg    sync.WaitGroup
			mu    sync.Mutex
			ok    atomic.Int64
			start = make(chan struct{})
		)
		denials = map[string]int{}
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				ctx, cancel := context.WithTimeout(context.Background(), 4*rpcTimeout)
				defer cancel()
				resp, err := clients[i%conns].Check(ctx, bearerRequest(secret, "POST", "/v1/chat/completions"))
				if err != nil {
					t.Errorf("Check: %v", err)
					return
				}
				if resp.GetOkResponse() != nil {
					ok.Add(1)
					return
				}
				d := resp.GetDeniedResponse()
				mu.Lock()
				denials[strconv.Itoa(int(d.GetStatus().GetCode()))+" "+d.GetBody()]++
				mu.Unlock()
				if codes.Code(resp.GetStatus().GetCode()) != codes.PermissionDenied {
					t.Errorf("429 with gRPC code %d", resp.GetStatus().GetCode())
				}
			}()
		}
		close(start)
		wg.Wait()
		return int(ok.Load()), denials
	}
	wantOneDenial := func(t *testing.T, denials map[string]int, want string) {
		t.Helper()
		if len(denials) != 1 {
			t.Errorf("denials %v, want only %q", denials, want)
		}
		for d, c := range denials {
			if !strings.HasPrefix(d, "429 ") || !strings.Contains(d, "insufficient_quota") || !strings.Contains(strings.ToLower(d), want) || c != n-afford {
				t.Errorf("denial %q x%d, want %d x 429 insufficient_quota about %s", d, c, n-afford, want)
			}
		}
	}

	t.Run("account balance", func(t *testing.T) {
		t.Parallel()
		s.createAccount(t, "exact-balance", "0.2") // 100 x 0.002
		k := s.createKey(t, "exact-balance", "chat:write", "--rate-limit", "1000/s")
		allowed, denials := race(t, k.Secret)
		if allowed != afford {
			t.Errorf("%d of %d concurrent Checks allowed, want exactly %d", allowed, n, afford)
		}
		wantOneDenial(t, denials, "balance")
		if got := s.account(t, "exact-balance").BalanceMicros; got != 0 {
			t.Errorf("balance after = %d, want 0", got)
		}
		if got := s.key(t, k.ID).SpentMicros; got != afford*priceChat {
			t.Errorf("spent = %d, want %d", got, afford*priceChat)
		}
	})

	t.Run("key spend cap", func(t *testing.T) {
		t.Parallel()
		s.createAccount(t, "exact-cap", "100")
		k := s.createKey(t, "exact-cap", "chat:write", "--rate-limit", "1000/s", "--spend-cap", "0.2")
		allowed, denials := race(t, k.Secret)
		if allowed != afford {
			t.Errorf("%d of %d concurrent Checks allowed, want exactly %d", allowed, n, afford)
		}
		wantOneDenial(t, denials, "cap")
		if got := s.key(t, k.ID).SpentMicros; got != afford*priceChat {
			t.Errorf("spent = %d, want exactly the cap %d", got, afford*priceChat)
		}
		if got := s.account(t, "exact-cap").BalanceMicros; got != 100_000_000-afford*priceChat {
			t.Errorf("balance = %d, want %d", got, 100_000_000-afford*priceChat)
		}
	})
}

// rawCodec sends and receives message bytes as they are, so that a test can
// put any bytes on the wire as a CheckRequest.
type rawCodec struct{}

func (rawCodec) Name() string { return "proto" }

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	return mem.BufferSlice{mem.SliceBuffer(*v.(*[]byte))}, nil
}

func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	*v.(*[]byte) = data.Materialize()
	return nil
}
