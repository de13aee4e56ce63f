// Package alert tells operators about crossed spend thresholds: it logs and
// counts each keystore.Alert, and delivers it to a webhook.
//
// The ledger writes each Alert to the store's outbox in the transaction of
// the charge that raised it, then hands it to Notifier.Notify. Notify never
// waits: it offers the alert to a bounded queue in memory, and an alert the
// queue cannot take is not lost, it waits in the outbox until Run has room
// and reads it from there. Run POSTs each alert as JSON, retries failures
// with exponential backoff and jitter until Config.MaxAge after the alert
// was raised, and removes it from the outbox once delivered or given up.
//
// Delivery is at least once. An alert delivered just before a crash, or
// whose removal from the outbox failed, is delivered again after a restart;
// its "id" is unique, so that a receiver can drop the repeat. A receiver
// that knows the secret checks the x-keygate-signature header: the
// lowercase hex HMAC-SHA256 of the body.
package alert

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/keygate/keygate/keystore"
)

// Errors returned by New.
var (
	// ErrBadURL: Config.URL is not an absolute http or https URL.
	ErrBadURL = errors.New("alert webhook URL must be an absolute http or https URL")
	// ErrNoOutbox: Config.URL is set but Config.Outbox is nil.
	ErrNoOutbox = errors.New("alert webhook needs an outbox")
	// ErrBadConfig: a size or duration of Config is negative, or
	// MinBackoff is above MaxBackoff.
	ErrBadConfig = errors.New("invalid alert configuration")
)

// errUnencodable: the alert cannot be written as JSON (a NaN threshold), so
// no attempt can ever succeed.
var errUnencodable = errors.New("alert cannot be encoded as JSON")

// Headers of a delivery, besides content-type.
const (
	SignatureHeader = "x-keygate-signature"
	userAgent       = "keygate-alerts/1"
)

const (
	defaultQueueSize  = 1024
	defaultTimeout    = 5 * time.Second
	defaultMaxAge     = time.Hour
	defaultMinBackoff = time.Second
	defaultMaxBackoff = 5 * time.Minute

	// senders is how many deliveries may be in flight at once, so that a
	// receiver slow to answer one alert does not hold back the others.
	senders = 4
	// maxDrain is how much of a response body is read, so that the
	// connection can be reused; the body itself means nothing.
	maxDrain = 64 << 10
)

// An Outbox holds the alerts written but not yet delivered. *keystore.Store
// is one.
type Outbox interface {
	// PendingAlerts returns the alerts not yet acknowledged, oldest first.
	PendingAlerts() ([]keystore.Alert, error)
	// AckAlerts removes alerts, delivered or given up, from the outbox.
	AckAlerts(ids []string) error
}

// Config configures a Notifier. Its zero value logs and counts alerts and
// delivers nothing.
type Config struct {
	// URL is the webhook every alert is POSTed to. "" delivers nothing: the
	// alerts are logged and counted, nothing is queued or acknowledged.
	URL string
	// Secret, when set, signs each body: x-keygate-signature is the hex
	// HMAC-SHA256 of the body under it. It is never logged.
	Secret string
	// Outbox is where alerts wait until delivered; required with URL.
	Outbox Outbox

	// QueueSize bounds the alerts kept in memory: queued, retrying, in
	// flight, or delivered and not yet acknowledged. More wait in the
	// outbox. 0 means 1024.
	QueueSize int
	// Timeout bounds one attempt: a 2xx status within it is success. 0
	// means 5s.
	Timeout time.Duration
	// MaxAge is how long after Alert.At delivery is retried; then the alert
	// is given up, logged as an error and removed from the outbox. Every
	// alert is tried at least once, however old. 0 means 1h.
	MaxAge time.Duration
	// MinBackoff and MaxBackoff bound the wait before a retry: MinBackoff
	// after the first failure, doubling up to MaxBackoff, less up to half
	// of it at random, so that alerts that failed together spread out.
	// 0 means 1s and 5m.
	MinBackoff, MaxBackoff time.Duration

	// Client sends the requests; nil means a client with Timeout that
	// follows no redirects (a 3xx is a failure, retried).
	Client *http.Client
	// Log receives each alert at info, and delivery failures; nil discards.
	Log *zap.Logger
	// Metrics, when not nil, registers the notifier's metrics.
	Metrics prometheus.Registerer
	// Now is the clock that Alert.At is compared with for MaxAge; nil
	// means time.Now. Waits between attempts are real time.
	Now func() time.Time
}

// A Notifier logs, counts and delivers alerts. Notify may be called from any
// goroutine; Run, once, delivers.
type Notifier struct {
	url     string // "" = deliver nothing
	secret  []byte // nil = no signature
	outbox  Outbox
	client  *http.Client
	log     *zap.Logger
	now     func() time.Time
	size    int
	timeout time.Duration
	maxAge  time.Duration
	minWait time.Duration
	maxWait time.Duration
	senders int
	m       *metrics
	wake    chan struct{} // capacity 1: Notify tells Run there is work

	mu sync.Mutex // guards the fields below; never held during I/O
	// held is every alert in memory, by ID: waiting for an attempt, in
	// flight, or delivered (or given up) and waiting for its ack.
	held   map[string]*entry
	sched  schedule  // the waiting entries, earliest attempt first
	recent recentIDs // IDs acked lately, so that a late Notify sends nothing
	seq    uint64    // orders entries scheduled for the same time
	// rescan is set when the outbox may hold alerts that are not held: at
	// start, and when Notify turned one away. turnedAway counts those, so
	// that a scan that read the outbox before the last one keeps rescan set.
	rescan     bool
	turnedAway uint64
}

// entry is one alert in memory.
type entry struct {
	alert    keystore.Alert
	body     []byte // nil: unencodable
	state    state
	failures int       // attempts failed so far
	next     time.Time // when waiting: the earliest next attempt
	seq      uint64
	index    int // in schedule, while waiting
}

type state uint8

const (
	waiting state = iota
	sending
	finished // delivered or given up; the ack is pending
)

// New checks c and builds a Notifier. It starts nothing: Run delivers.
func New(c Config) (*Notifier, error) {
	if c.URL != "" {
		if err := checkURL(c.URL); err != nil {
			return nil, err
		}
		if c.Outbox == nil {
			return nil, ErrNoOutbox
		}
	}
	if c.QueueSize < 0 || c.Timeout < 0 || c.MaxAge < 0 || c.MinBackoff < 0 || c.MaxBackoff < 0 {
		return nil, fmt.Errorf("%w: negative queue size or duration", ErrBadConfig)
	}
	n := &Notifier{
		url:     c.URL,
		outbox:  c.Outbox,
		client:  c.Client,
		log:     c.Log,
		now:     c.Now,
		size:    cmpOr(c.QueueSize, defaultQueueSize),
		timeout: cmpOr(c.Timeout, defaultTimeout),
		maxAge:  cmpOr(c.MaxAge, defaultMaxAge),
		minWait: cmpOr(c.MinBackoff, defaultMinBackoff),
		maxWait: cmpOr(c.MaxBackoff, defaultMaxBackoff),
		senders: senders,
		wake:    make(chan struct{}, 1),
		held:    make(map[string]*entry),
	}
	if n.minWait > n.maxWait {
		return nil, fmt.Errorf("%w: min backoff %s above max backoff %s", ErrBadConfig, n.minWait, n.maxWait)
	}
	if c.Secret != "" {
		n.secret = []byte(c.Secret)
	}
	if n.client == nil {
		n.client = &http.Client{
			Timeout:       n.timeout,
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		}
	}
	if n.log == nil {
		n.log = zap.NewNop()
	}
	if n.now == nil {
		n.now = time.Now
	}
	n.recent = newRecentIDs(n.size)
	m, err := newMetrics(c.Metrics)
	if err != nil {
		return nil, err
	}
	n.m = m
	return n, nil
}

// checkURL accepts an absolute http or https URL with a host. Its errors do
// not quote the URL: a webhook's path often holds a token.
func checkURL(s string) error {
	u, err := url.Parse(s)
	switch {
	case err != nil:
		return fmt.Errorf("%w: it does not parse", ErrBadURL)
	case u.Scheme != "http" && u.Scheme != "https":
		return fmt.Errorf("%w: scheme %q", ErrBadURL, u.Scheme)
	case u.Host == "" || u.Hostname() == "":
		return fmt.Errorf("%w: no host", ErrBadURL)
	}
	return nil
}

func cmpOr[T int | time.Duration](v, def T) T {
	if v == 0 {
		return def
	}
	return v
}

// Notify logs and counts each alert and, when there is a webhook, queues it
// for Run. It never blocks: an alert the queue has no room for is counted
// as an overflow and read from the outbox later.
func (n *Notifier) Notify(alerts []keystore.Alert) {
	for _, a := range alerts {
		n.m.alerts.WithLabelValues(a.Type).Inc()
		n.log.Info("alert", fields(a)...)
	}
	if n.url == "" || len(alerts) == 0 {
		return
	}
	added := false
	n.mu.Lock()
	for _, a := range alerts {
		if n.knownLocked(a.ID) {
			continue
		}
		if len(n.held) >= n.size {
			n.rescan = true
			n.turnedAway++
			n.m.overflow.Inc()
			continue
		}
		n.addLocked(a)
		added = true
	}
	n.mu.Unlock()
	if added {
		select {
		case n.wake <- struct{}{}:
		default: // Run is already told
		}
	}
}

// fields describes an alert for the log.
func fields(a keystore.Alert) []zap.Field {
	f := []zap.Field{
		zap.String("alert_id", a.ID),
		zap.String("type", a.Type),
		zap.String("account", a.Account),
		zap.Time("at", a.At),
	}
	if a.Type == keystore.AlertKeySpend {
		return append(f,
			zap.String("key_id", a.KeyID),
			zap.Float64("threshold", a.Threshold),
			zap.Int64("spent_micros", int64(a.Spent)),
			zap.Int64("cap_micros", int64(a.Cap)))
	}
	return append(f,
		zap.Int64("balance_micros", int64(a.Balance)),
		zap.Int64("alert_below_micros", int64(a.AlertBelow)))
}

func (n *Notifier) knownLocked(id string) bool {
	_, ok := n.held[id]
	return ok || n.recent.has(id)
}

// addLocked holds a, due at once.
func (n *Notifier) addLocked(a keystore.Alert) {
	body, err := json.Marshal(a)
	if err != nil {
		body = nil // send gives it up
	}
	e := &entry{alert: a, body: body}
	n.held[a.ID] = e
	n.scheduleLocked(e, time.Time{})
	n.m.pending.Inc()
}

func (n *Notifier) scheduleLocked(e *entry, at time.Time) {
	n.seq++
	e.state, e.next, e.seq = waiting, at, n.seq
	n.sched.push(e)
}

// result is the outcome of one attempt.
type result struct {
	e   *entry
	err error
}

// Run delivers alerts until ctx is done, then returns nil: first those
// already in the outbox, then those Notify queues. Requests in flight are
// cancelled on return, and what is not delivered stays in the outbox. It
// must not run twice at once.
func (n *Notifier) Run(ctx context.Context) error {
	if n.url == "" {
		<-ctx.Done()
		return nil
	}
	sendCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		wg       sync.WaitGroup
		results  = make(chan result, n.senders) // one per sender: sending never blocks
		inflight int
		acks     []string  // delivered or given up, not yet acked
		fails    int       // outbox calls failed in a row
		retryAt  time.Time // outbox calls wait until then after a failure
		timer    = time.NewTimer(time.Hour)
	)
	defer timer.Stop()
	n.mu.Lock()
	n.rescan = true // alerts written before a restart
	n.mu.Unlock()

	for {
		if now := time.Now(); !now.Before(retryAt) {
			var err error
			if acks, err = n.syncOutbox(acks); err != nil {
				fails++
				retryAt = now.Add(n.backoff(fails))
			} else {
				fails = 0
			}
		}
		for inflight < n.senders {
			e := n.popDue(time.Now())
			if e == nil {
				break
			}
			inflight++
			wg.Go(func() { results <- result{e, n.send(sendCtx, e)} })
		}

		var timerC <-chan time.Time
		if d, ok := n.untilNext(time.Now(), inflight < n.senders, retryAt, len(acks) > 0); ok {
			timer.Reset(d)
			timerC = timer.C
		}
		select {
		case <-ctx.Done():
			cancel()
			wg.Wait()
			close(results)
			for r := range results {
				if r.err != nil {
					n.requeue(r.e) // cut short: not the receiver's failure
					continue
				}
				n.finish(r.e, nil)
				acks = append(acks, r.e.alert.ID)
			}
			if len(acks) > 0 {
				_ = n.ack(acks) // logged; best effort: unacked alerts are sent again after a restart
			}
			return nil
		case r := <-results:
			inflight--
			if n.finish(r.e, r.err) {
				acks = append(acks, r.e.alert.ID)
			}
		case <-n.wake:
		case <-timerC:
		}
	}
}

// syncOutbox acks what was delivered, then, when the outbox may hold alerts
// not held and there is room, reads it. It returns the acks still to make.
func (n *Notifier) syncOutbox(acks []string) ([]string, error) {
	if len(acks) > 0 {
		if err := n.ack(acks); err != nil {
			return acks, err
		}
		acks = nil
	}
	return nil, n.scan()
}

// ack removes delivered alerts from the outbox, then forgets them.
func (n *Notifier) ack(ids []string) error {
	if err := n.outbox.AckAlerts(ids); err != nil {
		n.log.Warn("alert outbox ack failed; will retry (the alerts may be delivered again after a restart)",
			zap.Int("alerts", len(ids)), zap.Error(err))
		return err
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, id := range ids {
		delete(n.held, id)
		n.recent.add(id)
	}
	return nil
}

// scan reads the outbox when it may hold alerts not held and there is
// room, and holds what it can, oldest first.
func (n *Notifier) scan() error {
	n.mu.Lock()
	need, gen := n.rescan && len(n.held) < n.size, n.turnedAway
	n.mu.Unlock()
	if !need {
		return nil
	}
	pending, err := n.outbox.PendingAlerts()
	if err != nil {
		n.log.Error("alert outbox read failed; will retry", zap.Error(err))
		return err
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	for _, a := range pending {
		if n.knownLocked(a.ID) {
			continue
		}
		if len(n.held) >= n.size {
			return nil // rescan stays set: the rest when there is room
		}
		n.addLocked(a)
	}
	if n.turnedAway == gen {
		n.rescan = false
	}
	return nil
}

// popDue takes the earliest waiting entry if it is due at now.
func (n *Notifier) popDue(now time.Time) *entry {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.sched.Len() == 0 || n.sched[0].next.After(now) {
		return nil
	}
	e := n.sched.pop()
	e.state = sending
	return e
}

// untilNext says how long Run may sleep before it has something to do
// without being woken: an attempt falling due (when a sender is free), or
// outbox work, which waits out a failure. false: nothing until woken.
func (n *Notifier) untilNext(now time.Time, senderFree bool, retryAt time.Time, acking bool) (time.Duration, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	var next time.Time
	if senderFree && n.sched.Len() > 0 {
		next = n.sched[0].next
	}
	if acking || (n.rescan && len(n.held) < n.size) {
		at := retryAt
		if at.Before(now) { // a failure's wait is over, or there was none
			at = now
		}
		if next.IsZero() || at.Before(next) {
			next = at
		}
	}
	if next.IsZero() {
		return 0, false
	}
	return max(next.Sub(now), 0), true
}

// finish records the outcome of an attempt, and reports whether the alert
// is done with (delivered or given up) and must be acked.
func (n *Notifier) finish(e *entry, err error) bool {
	if err == nil {
		n.m.ok.Inc()
		n.done(e)
		return true
	}
	e.failures++
	age := n.now().Sub(e.alert.At)
	if age >= n.maxAge || errors.Is(err, errUnencodable) {
		n.m.gaveUp.Inc()
		n.log.Error("alert delivery given up", append(fields(e.alert),
			zap.Int("attempts", e.failures), zap.Duration("age", age), zap.Error(err))...)
		n.done(e)
		return true
	}
	wait := min(n.backoff(e.failures), n.maxAge-age)
	n.m.retry.Inc()
	n.log.Warn("alert delivery failed; will retry",
		zap.String("alert_id", e.alert.ID), zap.String("type", e.alert.Type),
		zap.Int("attempts", e.failures), zap.Duration("retry_in", wait), zap.Error(err))
	n.mu.Lock()
	n.scheduleLocked(e, time.Now().Add(wait))
	n.mu.Unlock()
	return false
}

func (n *Notifier) done(e *entry) {
	n.mu.Lock()
	e.state = finished
	n.mu.Unlock()
	n.m.pending.Dec()
}

// requeue puts back an attempt that shutdown cut short, due at once.
func (n *Notifier) requeue(e *entry) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.scheduleLocked(e, time.Time{})
}

// send makes one attempt. Its error never holds the URL, which may hold a
// token, nor the secret.
func (n *Notifier) send(ctx context.Context, e *entry) error {
	if e.body == nil {
		return errUnencodable
	}
	ctx, cancel := context.WithTimeout(ctx, n.timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, n.url, bytes.NewReader(e.body))
	if err != nil {
		return fmt.Errorf("build request: %w", err)
	}
	req.Header.Set("content-type", "application/json")
	req.Header.Set("user-agent", userAgent)
	if n.secret != nil {
		req.Header.Set(SignatureHeader, Sign(n.secret, e.body))
	}
	resp, err := n.client.Do(req)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		if ctx.Err() == context.DeadlineExceeded {
			return fmt.Errorf("no answer within %s: %w", n.timeout, err)
		}
		return err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxDrain))
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return fmt.Errorf("webhook answered %s", resp.Status)
	}
	return nil
}

// Sign returns the x-keygate-signature of body under secret: the lowercase
// hex HMAC-SHA256. Receivers compute it over the raw body and compare with
// hmac.Equal.
func Sign(secret, body []byte) string {
	h := hmac.New(sha256.New, secret)
	h.Write(body)
	return hex.EncodeToString(h.Sum(nil))
}
