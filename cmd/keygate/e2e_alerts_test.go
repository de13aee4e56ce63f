package main_test

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
)

// receiver is a webhook that records the alerts it accepts, checking each
// signature, and refuses them with a 503 while failing is set.
type receiver struct {
	t       testing.TB
	secret  string
	failing atomic.Bool
	refused atomic.Int64

	mu     sync.Mutex
	alerts []map[string]any
	ids    map[string]int
}

func newReceiver(t testing.TB, secret string) (*receiver, string) {
	r := &receiver{t: t, secret: secret, ids: map[string]int{}}
	srv := httptest.NewServer(r)
	t.Cleanup(srv.Close)
	return r, srv.URL + "/hooks/keygate"
}

func (r *receiver) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	body, err := io.ReadAll(req.Body)
	if err != nil {
		http.Error(w, err.Error(), 400)
		return
	}
	if req.Method != http.MethodPost || req.Header.Get("content-type") != "application/json" {
		r.t.Errorf("alert delivered with %s and content-type %q, want POST application/json", req.Method, req.Header.Get("content-type"))
	}
	mac := hmac.New(sha256.New, []byte(r.secret))
	mac.Write(body)
	if got, want := req.Header.Get("x-keygate-signature"), hex.EncodeToString(mac.Sum(nil)); got != want {
		r.t.Errorf("x-keygate-signature %q, want %q (HMAC-SHA256 of the body)", got, want)
	}
	if r.failing.Load() {
		r.refused.Add(1)
		http.Error(w, "try later", http.StatusServiceUnavailable)
		return
	}
	var a map[string]any
	if err := json.Unmarshal(body, &a); err != nil {
		r.t.Errorf("alert body %q: %v", body, err)
	}
	r.mu.Lock()
	r.alerts = append(r.alerts, a)
	r.ids[a["id"].(string)]++
	r.mu.Unlock()
	w.WriteHeader(http.StatusNoContent)
}

// received returns the alerts accepted so far, as "type threshold" strings,
// sorted, and fails on any id delivered twice.
func (r *receiver) received() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, a := range r.alerts {
		switch a["type"] {
		case "key_spend":
			out = append(out, "key_spend "+jsonString(a["threshold"]))
		default:
			out = append(out, jsonString(a["type"])+" "+jsonString(a["threshold_micros"]))
		}
	}
	for id, n := range r.ids {
		if n > 1 {
			r.t.Errorf("alert %s delivered %d times", id, n)
		}
	}
	sort.Strings(out)
	return out
}

func jsonString(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

func alertsConfig(url string) string {
	return "alerts: {webhook_url: " + url + ", secret: e2e-webhook-secret}\n" + exampleConfig
}

// TestE2EAlerts: a key's spend crossing 50%, 80% and 100% of its cap, and an
// account's balance falling under its alert level, each reach the webhook
// exactly once, signed.
func TestE2EAlerts(t *testing.T) {
	t.Parallel()
	rcv, url := newReceiver(t, "e2e-webhook-secret")
	s := startServer(t, serverOpts{config: alertsConfig(url)})
	s.createAccount(t, "acme", "0.012", "--alert-below", "0.005", "--tier", "tier1")
	k := s.createKey(t, "acme", "chat:write", "--spend-cap", "0.01")

	// 5 × 0.002: the spend reaches 0.004, 0.006 (50%), 0.008 (80%), 0.010
	// (100%); the balance falls from 0.012 to 0.002, under 0.005 at the 4th.
	for i := range 5 {
		if d := s.checkKey(t, k.Secret, "POST", "/v1/chat/completions"); d.status != 200 {
			t.Fatalf("Check %d: %s", i+1, d)
		}
	}
	want := []string{`"account_balance_low" 5000`, "key_spend 0.5", "key_spend 0.8", "key_spend 1"}
	if !eventually(stopTimeout, func() bool { return len(rcv.received()) >= len(want) }) {
		t.Fatalf("alerts received: %v, want %v", rcv.received(), want)
	}
	// Later Checks (refused at the cap) raise nothing more.
	if d := s.checkKey(t, k.Secret, "POST", "/v1/chat/completions"); d.status != 429 {
		t.Fatalf("Check past the cap: %s, want 429", d)
	}
	if got := rcv.received(); !equal(got, want) {
		t.Fatalf("alerts received: %v, want %v", got, want)
	}
	rcv.mu.Lock()
	for _, a := range rcv.alerts {
		if a["account"] != "acme" || a["at"] == nil || a["id"] == "" {
			t.Errorf("alert %v lacks account, at or id", a)
		}
		if a["type"] == "key_spend" && (a["key_id"] != k.ID || a["cap_micros"] != float64(10000)) {
			t.Errorf("key alert %v: want key_id %s and cap_micros 10000", a, k.ID)
		}
		if a["type"] == "account_balance_low" && a["balance_micros"] != float64(4000) {
			t.Errorf("balance alert %v: want balance_micros 4000", a)
		}
	}
	rcv.mu.Unlock()

	// A credit that lifts the balance over the level re-arms its alert.
	s.ok(t, nil, "accounts", "credit", "acme", "0.003") // 0.002 -> 0.005
	k2 := s.createKey(t, "acme", "chat:write")
	if d := s.checkKey(t, k2.Secret, "POST", "/v1/chat/completions"); d.status != 200 {
		t.Fatalf("Check after the credit: %s", d)
	}
	want = append([]string{`"account_balance_low" 5000`}, want...)
	if !eventually(stopTimeout, func() bool { return len(rcv.received()) >= len(want) }) || !equal(rcv.received(), want) {
		t.Fatalf("alerts received after the re-arm: %v, want %v", rcv.received(), want)
	}
	s.stop(t)
}

// TestE2EAlertsOutbox: alerts that the webhook refuses wait in the store
// across a restart and are delivered once it accepts them.
func TestE2EAlertsOutbox(t *testing.T) {
	t.Parallel()
	rcv, url := newReceiver(t, "e2e-webhook-secret")
	rcv.failing.Store(true)
	s := startServer(t, serverOpts{config: alertsConfig(url)})
	s.createAccount(t, "acme", "1", "--tier", "tier1")
	k := s.createKey(t, "acme", "chat:write", "--spend-cap", "0.004")
	for i := range 2 { // 50% then 100%
		if d := s.checkKey(t, k.Secret, "POST", "/v1/chat/completions"); d.status != 200 {
			t.Fatalf("Check %d: %s", i+1, d)
		}
	}
	if !eventually(stopTimeout, func() bool { return rcv.refused.Load() >= 3 }) {
		t.Fatalf("the webhook was tried %d times, want the 3 alerts tried", rcv.refused.Load())
	}
	s.stop(t)

	rcv.failing.Store(false)
	s = startServer(t, serverOpts{db: s.db, config: alertsConfig(url)})
	want := []string{"key_spend 0.5", "key_spend 0.8", "key_spend 1"}
	if !eventually(stopTimeout, func() bool { return len(rcv.received()) >= len(want) }) || !equal(rcv.received(), want) {
		t.Fatalf("alerts received after the restart: %v, want %v", rcv.received(), want)
	}
	s.stop(t)
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
