package alert

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/keygate/keygate/keystore"
)

var t0 = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

// hookPath stands for the token a webhook URL often carries: it must never
// reach a log.
const hookPath = "/hooks/T0K3N-path-secret"

func keySpend(id string) keystore.Alert {
	return keystore.Alert{ID: id, Type: keystore.AlertKeySpend, KeyID: "key_" + id, Account: "acme",
		At: t0, Threshold: 0.8, Spent: 800_000, Cap: 1_000_000}
}

func balanceLow(id string) keystore.Alert {
	return keystore.Alert{ID: id, Type: keystore.AlertAccountBalanceLow, Account: "acme",
		At: t0, Balance: 0, AlertBelow: 1_000_000}
}

// fakeOutbox is the store's outbox in memory: the keystore's is not written
// yet, and the notifier only needs the two calls.
type fakeOutbox struct {
	mu        sync.Mutex
	alerts    []keystore.Alert
	acked     map[string]int // ID → times acked
	failAcks  int            // the next AckAlerts calls to fail
	ackCalls  int
	readCalls int
}

func newOutbox(alerts ...keystore.Alert) *fakeOutbox {
	return &fakeOutbox{alerts: alerts, acked: make(map[string]int)}
}

func (o *fakeOutbox) add(a ...keystore.Alert) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.alerts = append(o.alerts, a...)
}

func (o *fakeOutbox) PendingAlerts() ([]keystore.Alert, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.readCalls++
	return append([]keystore.Alert(nil), o.alerts...), nil
}

func (o *fakeOutbox) AckAlerts(ids []string) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.ackCalls++
	if o.failAcks > 0 {
		o.failAcks--
		return errors.New("disk on fire")
	}
	for _, id := range ids {
		o.acked[id]++
		for i, a := range o.alerts {
			if a.ID == id {
				o.alerts = append(o.alerts[:i], o.alerts[i+1:]...)
				break
			}
		}
	}
	return nil
}

func (o *fakeOutbox) timesAcked(id string) int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.acked[id]
}

func (o *fakeOutbox) pending() []string {
	o.mu.Lock()
	defer o.mu.Unlock()
	var ids []string
	for _, a := range o.alerts {
		ids = append(ids, a.ID)
	}
	return ids
}

func (o *fakeOutbox) calls() (reads, acks int) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.readCalls, o.ackCalls
}

// delivery is one request the receiver got.
type delivery struct {
	id     string
	body   []byte
	header http.Header
}

// receiver is a webhook on loopback. reply gets the 1-based number of the
// request, the alert's ID and the request, and returns the status to answer; it may block
// until the request's context is done.
type receiver struct {
	srv   *httptest.Server
	reply func(n int, id string, r *http.Request) int
	stop  chan struct{} // closed at cleanup: blocked handlers return

	mu  sync.Mutex
	got []delivery
}

func newReceiver(t *testing.T, reply func(n int, id string, r *http.Request) int) *receiver {
	t.Helper()
	rc := &receiver{reply: reply, stop: make(chan struct{})}
	rc.srv = httptest.NewServer(http.HandlerFunc(rc.serve))
	t.Cleanup(rc.srv.Close)
	t.Cleanup(func() { close(rc.stop) }) // runs first
	return rc
}

func (rc *receiver) serve(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	var head struct {
		ID string `json:"id"`
	}
	_ = json.Unmarshal(body, &head)
	rc.mu.Lock()
	rc.got = append(rc.got, delivery{id: head.ID, body: body, header: r.Header.Clone()})
	n := len(rc.got)
	rc.mu.Unlock()
	status := http.StatusNoContent
	if rc.reply != nil {
		status = rc.reply(n, head.ID, r)
	}
	w.WriteHeader(status)
}

func (rc *receiver) url() string { return rc.srv.URL + hookPath }

func (rc *receiver) deliveries() []delivery {
	rc.mu.Lock()
	defer rc.mu.Unlock()
	return append([]delivery(nil), rc.got...)
}

// count is how many requests carried alert id.
func (rc *receiver) count(id string) int {
	n := 0
	for _, d := range rc.deliveries() {
		if d.id == id {
			n++
		}
	}
	return n
}

// env is a notifier under test, with what it talks to.
type env struct {
	n    *Notifier
	ob   *fakeOutbox
	reg  *prometheus.Registry
	logs *observer.ObservedLogs
}

// newEnv builds a notifier on c, filling in the outbox, log, metrics, a
// clock stopped at t0 and short backoffs when c leaves them out.
func newEnv(t *testing.T, c Config, ob *fakeOutbox) *env {
	t.Helper()
	core, logs := observer.New(zapcore.DebugLevel)
	reg := prometheus.NewRegistry()
	if ob != nil {
		c.Outbox = ob
	}
	c.Log, c.Metrics = zap.New(core), reg
	if c.Now == nil { // alerts are raised at t0
		c.Now = func() time.Time { return t0 }
	}
	if c.MinBackoff == 0 {
		c.MinBackoff, c.MaxBackoff = time.Millisecond, 4*time.Millisecond
	}
	n, err := New(c)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return &env{n: n, ob: ob, reg: reg, logs: logs}
}

// run starts Run and returns a function that stops it and waits for it to
// return nil; it is also called at cleanup.
func (e *env) run(t *testing.T) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.n.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("Run: %v", err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("Run did not return after its context was cancelled")
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// eventually waits until cond holds, or fails the test after a generous
// deadline (a guard against hanging, not a timing assertion).
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// metric is the value of the counter or gauge name whose labels include the
// given name, value pairs.
func (e *env) metric(t *testing.T, name string, labels ...string) float64 {
	t.Helper()
	mfs, err := e.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			for i := 0; i+1 < len(labels); i += 2 {
				found := false
				for _, lp := range m.GetLabel() {
					found = found || (lp.GetName() == labels[i] && lp.GetValue() == labels[i+1])
				}
				if !found {
					continue next
				}
			}
			if c := m.GetCounter(); c != nil {
				return c.GetValue()
			}
			return m.GetGauge().GetValue()
		}
	}
	t.Fatalf("no metric %s%v", name, labels)
	return 0
}

// checkDeliveries checks the deliveries counter by result.
func (e *env) checkDeliveries(t *testing.T, ok, retry, gaveUp float64) {
	t.Helper()
	got := [3]float64{
		e.metric(t, metricDeliveries, "result", "ok"),
		e.metric(t, metricDeliveries, "result", "retry"),
		e.metric(t, metricDeliveries, "result", "gave_up"),
	}
	if want := [3]float64{ok, retry, gaveUp}; got != want {
		t.Errorf("%s ok/retry/gave_up = %v, want %v", metricDeliveries, got, want)
	}
}

// checkLogsHide fails if any log entry shows one of the strings.
func (e *env) checkLogsHide(t *testing.T, secrets ...string) {
	t.Helper()
	for _, l := range e.logs.All() {
		text := l.Message + fmt.Sprint(l.ContextMap())
		for _, s := range secrets {
			if strings.Contains(text, s) {
				t.Errorf("log entry %q shows %q: %s", l.Message, s, text)
			}
		}
	}
}

func TestBody(t *testing.T) {
	tests := []struct {
		name  string
		alert keystore.Alert
		want  map[string]any
	}{
		{
			name:  "key spend",
			alert: keySpend("alrt_1"),
			want: map[string]any{
				"id": "alrt_1", "type": "key_spend", "key_id": "key_alrt_1", "account": "acme",
				"threshold": 0.8, "spent_micros": 800000.0, "cap_micros": 1000000.0, "at": "2026-03-01T12:00:00Z",
			},
		},
		{
			name:  "account balance low, at zero",
			alert: balanceLow("alrt_2"),
			want: map[string]any{
				"id": "alrt_2", "type": "account_balance_low", "account": "acme",
				"balance_micros": 0.0, "threshold_micros": 1000000.0, "at": "2026-03-01T12:00:00Z",
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rc := newReceiver(t, nil)
			e := newEnv(t, Config{URL: rc.url()}, newOutbox(tt.alert))
			e.n.Notify([]keystore.Alert{tt.alert})
			e.run(t)
			eventually(t, "the ack", func() bool { return e.ob.timesAcked(tt.alert.ID) == 1 })

			got := rc.deliveries()
			if len(got) != 1 {
				t.Fatalf("%d deliveries, want 1", len(got))
			}
			want, err := json.Marshal(tt.alert)
			if err != nil {
				t.Fatal(err)
			}
			if string(got[0].body) != string(want) {
				t.Errorf("body %s, want json.Marshal(alert) %s", got[0].body, want)
			}
			var fields map[string]any
			if err := json.Unmarshal(got[0].body, &fields); err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, fields); diff != "" {
				t.Errorf("body fields (-want +got):\n%s", diff)
			}
			h := got[0].header
			if ct := h.Get("content-type"); ct != "application/json" {
				t.Errorf("content-type %q", ct)
			}
			if ua := h.Get("user-agent"); !strings.Contains(ua, "keygate") {
				t.Errorf("user-agent %q does not name keygate", ua)
			}
			if _, ok := h[http.CanonicalHeaderKey(SignatureHeader)]; ok {
				t.Errorf("%s sent without a secret", SignatureHeader)
			}
		})
	}
}

func TestSignature(t *testing.T) {
	const secret = "whsec-do-not-log"
	rc := newReceiver(t, nil)
	e := newEnv(t, Config{URL: rc.url(), Secret: secret}, newOutbox())
	e.run(t)
	a := keySpend("alrt_sig")
	e.ob.add(a)
	e.n.Notify([]keystore.Alert{a})
	eventually(t, "the ack", func() bool { return e.ob.timesAcked(a.ID) == 1 })

	d := rc.deliveries()[0]
	sig := d.header.Get(SignatureHeader)
	if !regexp.MustCompile(`^[0-9a-f]{64}$`).MatchString(sig) {
		t.Fatalf("%s %q is not lowercase hex SHA-256", SignatureHeader, sig)
	}
	raw, _ := hex.DecodeString(sig)
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write(d.body)
	if !hmac.Equal(raw, mac.Sum(nil)) {
		t.Errorf("signature does not verify with the secret")
	}
	wrong := hmac.New(sha256.New, []byte("another secret"))
	wrong.Write(d.body)
	if hmac.Equal(raw, wrong.Sum(nil)) {
		t.Errorf("signature verifies with the wrong secret")
	}
	if len(e.logs.FilterMessage("alert").All()) != 1 {
		t.Errorf("want the alert logged once at info")
	}
	e.checkLogsHide(t, secret, hookPath)
}

func TestRetriesUntilSuccess(t *testing.T) {
	// 500, 500, no answer within the timeout, then 204.
	rc := newReceiver(t, nil)
	rc.reply = func(n int, _ string, r *http.Request) int {
		switch n {
		case 1, 2:
			return http.StatusInternalServerError
		case 3:
			select { // the client gives up at Timeout and closes the request
			case <-r.Context().Done():
			case <-rc.stop:
			}
			return http.StatusOK
		}
		return http.StatusNoContent
	}
	e := newEnv(t, Config{URL: rc.url(), Timeout: 50 * time.Millisecond}, newOutbox())
	stop := e.run(t)
	a := balanceLow("alrt_retry")
	e.ob.add(a)
	e.n.Notify([]keystore.Alert{a})
	eventually(t, "the ack", func() bool { return e.ob.timesAcked(a.ID) > 0 })
	stop()

	if n := rc.count(a.ID); n != 4 {
		t.Errorf("%d attempts, want 4", n)
	}
	if n := e.ob.timesAcked(a.ID); n != 1 {
		t.Errorf("acked %d times, want 1", n)
	}
	if len(e.ob.pending()) != 0 {
		t.Errorf("outbox still holds %v", e.ob.pending())
	}
	e.checkDeliveries(t, 1, 3, 0)
	if g := e.metric(t, metricPending); g != 0 {
		t.Errorf("%s = %v, want 0", metricPending, g)
	}
	if n := len(e.logs.FilterMessageSnippet("will retry").All()); n != 3 {
		t.Errorf("%d retry warnings, want 3", n)
	}
	e.checkLogsHide(t, hookPath)
}

// clock is a settable time.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

func TestGivesUpAfterMaxAge(t *testing.T) {
	tests := []struct {
		name     string
		age      time.Duration // of the alert when first tried
		attempts int
	}{
		// Each failed attempt moves the clock 25 minutes: at 25m and 50m the
		// alert is retried, at 75m it is past the hour.
		{name: "fresh alert", age: 0, attempts: 3},
		{name: "alert older than max age is still tried once", age: 2 * time.Hour, attempts: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clk := &clock{now: t0.Add(tt.age)}
			rc := newReceiver(t, func(int, string, *http.Request) int {
				clk.advance(25 * time.Minute)
				return http.StatusServiceUnavailable
			})
			e := newEnv(t, Config{URL: rc.url(), MaxAge: time.Hour, Now: clk.Now}, newOutbox())
			stop := e.run(t)
			a := keySpend("alrt_old")
			e.ob.add(a)
			e.n.Notify([]keystore.Alert{a})
			eventually(t, "the ack", func() bool { return e.ob.timesAcked(a.ID) > 0 })
			stop()

			if n := rc.count(a.ID); n != tt.attempts {
				t.Errorf("%d attempts, want %d", n, tt.attempts)
			}
			if n := e.ob.timesAcked(a.ID); n != 1 {
				t.Errorf("acked %d times, want 1", n)
			}
			e.checkDeliveries(t, 0, float64(tt.attempts-1), 1)
			if n := len(e.logs.FilterMessage("alert delivery given up").FilterField(zap.String("alert_id", a.ID)).All()); n != 1 {
				t.Errorf("%d give-up errors logged, want 1", n)
			}
			if g := e.metric(t, metricPending); g != 0 {
				t.Errorf("%s = %v, want 0", metricPending, g)
			}
		})
	}
}

func TestStuckAlertDoesNotHoldBackOthers(t *testing.T) {
	arrived := make(chan struct{})
	rc := newReceiver(t, nil)
	rc.reply = func(_ int, id string, r *http.Request) int {
		if id == "alrt_stuck" {
			close(arrived)
			select { // no answer until the notifier hangs up
			case <-r.Context().Done():
			case <-rc.stop:
			}
		}
		return http.StatusOK
	}
	// Far longer than eventually waits: the other alerts must not queue
	// behind the stuck attempt.
	e := newEnv(t, Config{URL: rc.url(), Timeout: time.Hour}, newOutbox())
	e.run(t)
	stuck := keySpend("alrt_stuck")
	e.ob.add(stuck)
	e.n.Notify([]keystore.Alert{stuck})
	<-arrived
	others := []keystore.Alert{keySpend("alrt_1"), balanceLow("alrt_2"), keySpend("alrt_3")}
	e.ob.add(others...)
	e.n.Notify(others)
	eventually(t, "the other alerts acked", func() bool { return len(e.ob.pending()) == 1 })
	if diff := cmp.Diff([]string{stuck.ID}, e.ob.pending()); diff != "" {
		t.Errorf("outbox (-want +got):\n%s", diff)
	}
}

func TestFullQueueWaitsInOutbox(t *testing.T) {
	first := make(chan struct{}) // the first request has arrived
	gate := make(chan struct{})  // lets it be answered
	rc := newReceiver(t, nil)
	rc.reply = func(n int, _ string, r *http.Request) int {
		if n == 1 {
			close(first)
			select {
			case <-gate:
			case <-rc.stop:
			}
		}
		return http.StatusOK
	}
	e := newEnv(t, Config{URL: rc.url(), QueueSize: 1}, newOutbox())
	e.run(t)
	// Run's first read finds the outbox empty: from then on only Notify's
	// overflow can send it back there.
	eventually(t, "the first outbox read", func() bool { reads, _ := e.ob.calls(); return reads > 0 })
	a1, a2 := keySpend("alrt_1"), balanceLow("alrt_2")
	e.ob.add(a1)
	e.n.Notify([]keystore.Alert{a1})
	<-first // a1 is in flight: the queue is full

	e.ob.add(a2)
	e.n.Notify([]keystore.Alert{a2}) // returns although nothing can be queued
	if n := e.metric(t, metricOverflow); n != 1 {
		t.Errorf("%s = %v, want 1", metricOverflow, n)
	}
	if g := e.metric(t, metricPending); g != 1 {
		t.Errorf("%s = %v while one alert is held, want 1", metricPending, g)
	}
	close(gate)
	eventually(t, "both acks", func() bool { return e.ob.timesAcked(a1.ID) == 1 && e.ob.timesAcked(a2.ID) == 1 })
	for _, id := range []string{a1.ID, a2.ID} {
		if n := rc.count(id); n != 1 {
			t.Errorf("%s delivered %d times, want 1", id, n)
		}
	}
	if n := e.metric(t, metricAlerts, "type", keystore.AlertAccountBalanceLow); n != 1 {
		t.Errorf("%s{type=account_balance_low} = %v, want 1", metricAlerts, n)
	}
}

func TestOutboxDeliveredAtStart(t *testing.T) {
	rc := newReceiver(t, nil)
	pending := []keystore.Alert{keySpend("alrt_1"), balanceLow("alrt_2"), keySpend("alrt_3")}
	e := newEnv(t, Config{URL: rc.url()}, newOutbox(pending...))
	e.run(t)
	eventually(t, "the outbox to empty", func() bool { return len(e.ob.pending()) == 0 })
	for _, a := range pending {
		if n := rc.count(a.ID); n != 1 {
			t.Errorf("%s delivered %d times, want 1", a.ID, n)
		}
	}
	// Raised before the restart: counted then, not now.
	if n := e.metric(t, metricAlerts, "type", keystore.AlertKeySpend); n != 0 {
		t.Errorf("%s = %v, want 0", metricAlerts, n)
	}
	e.checkDeliveries(t, 3, 0, 0)
}

func TestDuplicateIDDeliveredOnce(t *testing.T) {
	rc := newReceiver(t, nil)
	a, b, c := keySpend("alrt_a"), balanceLow("alrt_b"), keySpend("alrt_c")
	e := newEnv(t, Config{URL: rc.url()}, newOutbox(a, b))
	e.n.senders = 1 // one at a time, in order: a barrier alert proves nothing else was queued before it

	e.n.Notify([]keystore.Alert{a}) // a is both notified and in the outbox that Run reads at start
	e.run(t)
	eventually(t, "a and b acked", func() bool { return e.ob.timesAcked(a.ID) == 1 && e.ob.timesAcked(b.ID) == 1 })

	e.n.Notify([]keystore.Alert{a}) // late: a was delivered already
	if g := e.metric(t, metricPending); g != 0 {
		t.Errorf("%s = %v after a repeated Notify, want 0", metricPending, g)
	}
	e.ob.add(c)
	e.n.Notify([]keystore.Alert{c})
	eventually(t, "c acked", func() bool { return e.ob.timesAcked(c.ID) == 1 })
	for _, x := range []keystore.Alert{a, b, c} {
		if n := rc.count(x.ID); n != 1 {
			t.Errorf("%s delivered %d times, want 1", x.ID, n)
		}
	}
	if n := e.ob.timesAcked(a.ID); n != 1 {
		t.Errorf("a acked %d times, want 1", n)
	}
}

func TestNoURL(t *testing.T) {
	ob := newOutbox(keySpend("alrt_old"))
	e := newEnv(t, Config{}, ob)
	stop := e.run(t)
	e.n.Notify([]keystore.Alert{keySpend("alrt_1"), balanceLow("alrt_2"), balanceLow("alrt_3")})
	stop()

	if reads, acks := ob.calls(); reads != 0 || acks != 0 {
		t.Errorf("outbox read %d and acked %d times, want neither", reads, acks)
	}
	if n := e.metric(t, metricAlerts, "type", keystore.AlertKeySpend); n != 1 {
		t.Errorf("%s{key_spend} = %v, want 1", metricAlerts, n)
	}
	if n := e.metric(t, metricAlerts, "type", keystore.AlertAccountBalanceLow); n != 2 {
		t.Errorf("%s{account_balance_low} = %v, want 2", metricAlerts, n)
	}
	if g := e.metric(t, metricPending); g != 0 {
		t.Errorf("%s = %v, want 0", metricPending, g)
	}
	e.checkDeliveries(t, 0, 0, 0)
	logged := e.logs.FilterMessage("alert").FilterField(zap.String("key_id", "key_alrt_1")).All()
	if len(logged) != 1 || logged[0].Level != zapcore.InfoLevel {
		t.Fatalf("key_spend alert not logged once at info: %v", logged)
	}
	want := map[string]any{"alert_id": "alrt_1", "type": "key_spend", "key_id": "key_alrt_1", "account": "acme",
		"threshold": 0.8, "spent_micros": int64(800000), "cap_micros": int64(1000000), "at": t0}
	if diff := cmp.Diff(want, logged[0].ContextMap()); diff != "" {
		t.Errorf("log fields (-want +got):\n%s", diff)
	}
}

func TestShutdownLeavesAlertInOutbox(t *testing.T) {
	arrived := make(chan struct{}, 1)
	rc := newReceiver(t, nil)
	rc.reply = func(n int, _ string, r *http.Request) int {
		arrived <- struct{}{}
		select { // answers only when the notifier gives up the request
		case <-r.Context().Done():
		case <-rc.stop:
		}
		return http.StatusOK
	}
	e := newEnv(t, Config{URL: rc.url()}, newOutbox())
	stop := e.run(t)
	a := keySpend("alrt_1")
	e.ob.add(a)
	e.n.Notify([]keystore.Alert{a})
	<-arrived
	stop() // fails the test if Run does not return

	if n := e.ob.timesAcked(a.ID); n != 0 {
		t.Errorf("acked %d times, want 0", n)
	}
	if diff := cmp.Diff([]string{a.ID}, e.ob.pending()); diff != "" {
		t.Errorf("outbox (-want +got):\n%s", diff)
	}
	e.checkDeliveries(t, 0, 0, 0)
}

func TestAckRetried(t *testing.T) {
	rc := newReceiver(t, nil)
	ob := newOutbox()
	ob.failAcks = 2
	e := newEnv(t, Config{URL: rc.url()}, ob)
	e.run(t)
	a := keySpend("alrt_1")
	ob.add(a)
	e.n.Notify([]keystore.Alert{a})
	eventually(t, "the ack", func() bool { return ob.timesAcked(a.ID) == 1 })

	if _, acks := ob.calls(); acks != 3 {
		t.Errorf("AckAlerts called %d times, want 3 (two failures)", acks)
	}
	if n := rc.count(a.ID); n != 1 {
		t.Errorf("delivered %d times, want 1", n)
	}
	if n := len(e.logs.FilterMessageSnippet("ack failed").All()); n != 2 {
		t.Errorf("%d ack failures logged, want 2", n)
	}
}

func TestUnencodableGivenUp(t *testing.T) {
	rc := newReceiver(t, nil)
	a := keySpend("alrt_nan")
	a.Threshold = math.NaN()
	e := newEnv(t, Config{URL: rc.url()}, newOutbox(a))
	e.run(t)
	eventually(t, "the ack", func() bool { return e.ob.timesAcked(a.ID) == 1 })
	if n := len(rc.deliveries()); n != 0 {
		t.Errorf("%d requests, want 0", n)
	}
	e.checkDeliveries(t, 0, 0, 1)
}

func TestNew(t *testing.T) {
	ob := newOutbox()
	tests := []struct {
		name string
		c    Config
		want error // nil: accepted
	}{
		{"no URL", Config{}, nil},
		{"http", Config{URL: "http://127.0.0.1:8080/hook", Outbox: ob}, nil},
		{"https upper case scheme", Config{URL: "HTTPS://hooks.example.com/x?y=1", Outbox: ob}, nil},
		{"relative", Config{URL: "/hook/T0K3N", Outbox: ob}, ErrBadURL},
		{"host without scheme", Config{URL: "hooks.example.com/T0K3N", Outbox: ob}, ErrBadURL},
		{"host:port without scheme", Config{URL: "localhost:8080/T0K3N", Outbox: ob}, ErrBadURL},
		{"ftp", Config{URL: "ftp://example.com/T0K3N", Outbox: ob}, ErrBadURL},
		{"no host", Config{URL: "http:///T0K3N", Outbox: ob}, ErrBadURL},
		{"opaque", Config{URL: "http:T0K3N", Outbox: ob}, ErrBadURL},
		{"port only", Config{URL: "http://:8080/T0K3N", Outbox: ob}, ErrBadURL},
		{"unparsable", Config{URL: "http://[::1/T0K3N", Outbox: ob}, ErrBadURL},
		{"control character", Config{URL: "http://example.com/\nT0K3N", Outbox: ob}, ErrBadURL},
		{"no outbox", Config{URL: "http://example.com/T0K3N"}, ErrNoOutbox},
		{"negative queue", Config{QueueSize: -1}, ErrBadConfig},
		{"negative timeout", Config{Timeout: -time.Second}, ErrBadConfig},
		{"negative max age", Config{MaxAge: -time.Second}, ErrBadConfig},
		{"min backoff above max", Config{MinBackoff: time.Minute, MaxBackoff: time.Second}, ErrBadConfig},
		{"min backoff above default max", Config{MinBackoff: time.Hour}, ErrBadConfig},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := New(tt.c)
			if !errors.Is(err, tt.want) || (tt.want == nil) != (err == nil) {
				t.Fatalf("New: %v, want %v", err, tt.want)
			}
			if err != nil && strings.Contains(err.Error(), "T0K3N") {
				t.Errorf("error %q quotes the URL", err)
			}
		})
	}
}

func TestNewSharesMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	for range 2 {
		if _, err := New(Config{Metrics: reg}); err != nil {
			t.Fatalf("New with a registry already holding the metrics: %v", err)
		}
	}
}

func TestBackoff(t *testing.T) {
	n, err := New(Config{MinBackoff: 10 * time.Millisecond, MaxBackoff: 80 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ceilings := []time.Duration{10, 20, 40, 80, 80, 80} // ms, after 1..6 failures
	for i, c := range ceilings {
		c *= time.Millisecond
		spread := map[time.Duration]bool{}
		for range 200 {
			d := n.backoff(i + 1)
			if d < c/2 || d > c {
				t.Fatalf("backoff(%d) = %s, want within [%s, %s]", i+1, d, c/2, c)
			}
			spread[d] = true
		}
		if len(spread) < 2 {
			t.Errorf("backoff(%d) has no jitter", i+1)
		}
	}
	if d := n.backoff(1000); d > 80*time.Millisecond {
		t.Errorf("backoff(1000) = %s, above the maximum", d)
	}
}
