package main_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	accesslogdatav3 "github.com/envoyproxy/go-control-plane/envoy/data/accesslog/v3"
	accesslogv3 "github.com/envoyproxy/go-control-plane/envoy/service/accesslog/v3"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// settleConfig is the README's example in on_response mode, with a short
// settle_timeout and a max price on chat completions.
const settleConfig = `settle: on_response
settle_timeout: 4s
tiers:
  free:  {rate_limit: 20/m}
  tier1: {rate_limit: 500/m}
default_tier: tier1
routes:
  - {method: POST, path: /v1/chat/completions, scope: chat:write, price_usd: "0.002", max_price_usd: "0.005"}
  - {method: GET,  path_prefix: /v1/chat/completions/, scope: chat:read}
  - {method: POST, path: /v1/embeddings, scope: embeddings:write, price_usd: "0.0001"}
`

// billingJSON reads the settlement fields of accounts get and keys get.
type billingJSON struct {
	BalanceMicros  int64 `json:"balance_micros"`
	SpentMicros    int64 `json:"spent_micros"`
	ReservedMicros int64 `json:"reserved_micros"`
}

func (s *server) billing(t testing.TB, what, id string) billingJSON {
	t.Helper()
	var b billingJSON
	s.ok(t, &b, what, "get", id)
	return b
}

// logEntry is the final access-log entry Envoy's HTTP gRPC logger sends for
// a request: code 0 means no response (a reset or a timeout).
func logEntry(id string, code uint32, cost string) *accesslogdatav3.HTTPAccessLogEntry {
	e := &accesslogdatav3.HTTPAccessLogEntry{
		CommonProperties: &accesslogdatav3.AccessLogCommon{
			AccessLogType: accesslogdatav3.AccessLogType_DownstreamEnd,
		},
		Request: &accesslogdatav3.HTTPRequestProperties{
			RequestMethod: corev3.RequestMethod_POST, Path: "/v1/chat/completions", RequestId: id,
		},
		Response: &accesslogdatav3.HTTPResponseProperties{},
	}
	if code != 0 {
		e.Response.ResponseCode = wrapperspb.UInt32(code)
	}
	if cost != "" {
		e.Response.ResponseHeaders = map[string]string{"x-keygate-cost-usd": cost}
	}
	return e
}

// sendLogs streams the entries to s's access-log service as Envoy does (the
// identifier in the first message, entries batched), then closes the stream.
func (s *server) sendLogs(t testing.TB, batches ...[]*accesslogdatav3.HTTPAccessLogEntry) {
	t.Helper()
	s.authz(t) // opens the shared connection
	ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
	defer cancel()
	stream, err := accesslogv3.NewAccessLogServiceClient(s.conn).StreamAccessLogs(ctx)
	if err != nil {
		t.Fatalf("StreamAccessLogs: %v", err)
	}
	for i, b := range batches {
		msg := &accesslogv3.StreamAccessLogsMessage{LogEntries: &accesslogv3.StreamAccessLogsMessage_HttpLogs{
			HttpLogs: &accesslogv3.StreamAccessLogsMessage_HTTPAccessLogEntries{LogEntry: b},
		}}
		if i == 0 {
			msg.Identifier = &accesslogv3.StreamAccessLogsMessage_Identifier{
				Node: &corev3.Node{Id: "envoy-e2e", Cluster: "api"}, LogName: "keygate",
			}
		}
		if err := stream.Send(msg); err != nil {
			t.Fatalf("send access-log batch %d: %v", i, err)
		}
	}
	if _, err := stream.CloseAndRecv(); err != nil {
		t.Fatalf("closing the access-log stream: %v", err)
	}
}

// checkID sends one Check for a chat completion under request id id.
func (s *server) checkID(t testing.TB, secret, id string) decision {
	t.Helper()
	req := bearerRequest(secret, "POST", "/v1/chat/completions")
	req.Attributes.Request.Http.Id = id
	req.Attributes.Request.Http.Headers["x-request-id"] = id
	return decode(t, s.check(t, req))
}

// TestE2ESettleOnResponse drives settlement as Envoy would: Checks reserve,
// the access-log stream settles each request by its outcome.
func TestE2ESettleOnResponse(t *testing.T) {
	t.Parallel()
	s := startServer(t, serverOpts{config: settleConfig})
	s.createAccount(t, "acme", "1")
	k := s.createKey(t, "acme", "chat:write")

	ids := []string{"ok", "err-5xx", "reset", "cost", "clamp", "bad-cost", "over-precise", "expire"}
	for _, id := range ids {
		if d := s.checkID(t, k.Secret, id); d.status != 200 {
			t.Fatalf("Check %s: %s", id, d)
		}
	}
	// Nothing is spent yet; everything is held.
	if b := s.billing(t, "accounts", "acme"); b.BalanceMicros != 1_000_000 || b.ReservedMicros != 8*priceChat {
		t.Fatalf("after the Checks: account %+v, want balance 1000000 and %d reserved", b, 8*priceChat)
	}
	if b := s.billing(t, "keys", k.ID); b.SpentMicros != 0 || b.ReservedMicros != 8*priceChat {
		t.Fatalf("after the Checks: key %+v, want nothing spent and %d reserved", b, 8*priceChat)
	}
	// A second Check under an open request id is refused.
	if d := s.checkID(t, k.Secret, "ok"); d.status != 400 || d.errType != "invalid_request_error" {
		t.Fatalf("Check reusing an open id: %s, want 400 invalid_request_error", d)
	}

	periodic := logEntry("expire", 200, "")
	periodic.CommonProperties.AccessLogType = accesslogdatav3.AccessLogType_DownstreamPeriodic
	s.sendLogs(t,
		[]*accesslogdatav3.HTTPAccessLogEntry{
			logEntry("ok", 200, ""),                    // the route's price
			logEntry("err-5xx", 503, "0.004"),          // released, whatever the header says
			logEntry("reset", 0, ""),                   // no response: released
			logEntry("cost", 201, "0.003"),             // the reported cost
			logEntry("clamp", 200, "1"),                // clamped to max_price_usd
			logEntry("bad-cost", 200, "abc"),           // ignored header: the price
			logEntry("over-precise", 200, "0.0000001"), // ignored header: the price
			periodic,                            // not final: ignored
			logEntry("never-reserved", 200, ""), // unknown: ignored
		},
		[]*accesslogdatav3.HTTPAccessLogEntry{
			logEntry("ok", 200, "0.004"), // repeated: changes nothing
			logEntry("cost", 500, ""),    // repeated: changes nothing
		},
	)
	charged := int64(priceChat + 3000 + 5000 + priceChat + priceChat)
	if b := s.billing(t, "accounts", "acme"); b.BalanceMicros != 1_000_000-charged || b.ReservedMicros != priceChat {
		t.Fatalf("after settling: account %+v, want balance %d and one price (expire) reserved", b, 1_000_000-charged)
	}
	if b := s.billing(t, "keys", k.ID); b.SpentMicros != charged || b.ReservedMicros != priceChat {
		t.Fatalf("after settling: key %+v, want %d spent and %d reserved", b, charged, priceChat)
	}
	if n := metricSum(t, s, "keygate_settle_cost_header_invalid_total"); n != 2 {
		t.Errorf("keygate_settle_cost_header_invalid_total = %v, want 2", n)
	}

	// The request whose entry never came is committed at the route's price
	// after settle_timeout, once; a late entry changes nothing.
	if !eventually(4*stopTimeout, func() bool { return s.billing(t, "accounts", "acme").ReservedMicros == 0 }) {
		t.Fatalf("the reservation of %q did not expire", "expire")
	}
	charged += priceChat
	s.sendLogs(t, []*accesslogdatav3.HTTPAccessLogEntry{logEntry("expire", 503, "")})
	if b := s.billing(t, "accounts", "acme"); b.BalanceMicros != 1_000_000-charged {
		t.Fatalf("after the expiry and a late entry: account %+v, want balance %d", b, 1_000_000-charged)
	}
	if n := metricSum(t, s, "keygate_reservations_expired_total"); n != 1 {
		t.Errorf("keygate_reservations_expired_total = %v, want 1", n)
	}
	// A Check with no request id at all is debited at once, and counted.
	req := bearerRequest(k.Secret, "POST", "/v1/chat/completions")
	req.Attributes.Request.Http.Id = ""
	delete(req.Attributes.Request.Http.Headers, "x-request-id")
	if d := decode(t, s.check(t, req)); d.status != 200 {
		t.Fatalf("Check without an id: %s", d)
	}
	charged += priceChat
	if b := s.billing(t, "accounts", "acme"); b.BalanceMicros != 1_000_000-charged || b.ReservedMicros != 0 {
		t.Fatalf("after a Check without an id: %+v, want balance %d", b, 1_000_000-charged)
	}
	if n := metricSum(t, s, "keygate_settle_no_request_id_total"); n != 1 {
		t.Errorf("keygate_settle_no_request_id_total = %v, want 1", n)
	}
	s.stop(t)
}

// TestE2ESettleConcurrentExact: 300 concurrent Checks against a balance that
// covers 100 reserve exactly 100; settling them all spends the balance to
// exactly zero.
func TestE2ESettleConcurrentExact(t *testing.T) {
	t.Parallel()
	s := startServer(t, serverOpts{config: settleConfig})
	s.createAccount(t, "acme", "0.2") // 100 × 0.002
	k := s.createKey(t, "acme", "chat:write")

	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		allowed []string
	)
	client := s.authz(t)
	for i := range 300 {
		wg.Go(func() {
			id := fmt.Sprintf("conc-%d", i)
			req := bearerRequest(k.Secret, "POST", "/v1/chat/completions")
			req.Attributes.Request.Http.Id = id
			ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
			defer cancel()
			resp, err := client.Check(ctx, req)
			if err != nil {
				t.Errorf("Check %s: %v", id, err)
				return
			}
			if resp.GetOkResponse() != nil {
				mu.Lock()
				allowed = append(allowed, id)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if len(allowed) != 100 {
		t.Fatalf("%d Checks allowed, want exactly 100", len(allowed))
	}
	var entries []*accesslogdatav3.HTTPAccessLogEntry
	for _, id := range allowed {
		entries = append(entries, logEntry(id, 200, ""))
	}
	s.sendLogs(t, entries[:50], entries[50:])
	if b := s.billing(t, "accounts", "acme"); b.BalanceMicros != 0 || b.ReservedMicros != 0 {
		t.Fatalf("after settling the 100: %+v, want balance 0 and nothing reserved", b)
	}
	if d := s.checkID(t, k.Secret, "one-more"); d.status != 429 {
		t.Fatalf("Check on an empty balance: %s, want 429", d)
	}
	s.stop(t)
}

// TestE2ESettleRestart: open reservations survive a clean restart with their
// amounts and deadlines, and settle afterwards.
func TestE2ESettleRestart(t *testing.T) {
	t.Parallel()
	s := startServer(t, serverOpts{config: settleConfig})
	s.createAccount(t, "acme", "1")
	k := s.createKey(t, "acme", "chat:write")
	for _, id := range []string{"before-stop-1", "before-stop-2"} {
		if d := s.checkID(t, k.Secret, id); d.status != 200 {
			t.Fatalf("Check %s: %s", id, d)
		}
	}
	s.stop(t)

	s = startServer(t, serverOpts{db: s.db, config: settleConfig})
	if b := s.billing(t, "accounts", "acme"); b.BalanceMicros != 1_000_000 || b.ReservedMicros != 2*priceChat {
		t.Fatalf("after the restart: %+v, want balance 1000000 and two prices reserved", b)
	}
	// The id is still held.
	if d := s.checkID(t, k.Secret, "before-stop-1"); d.status != 400 {
		t.Fatalf("Check reusing an id held across the restart: %s, want 400", d)
	}
	s.sendLogs(t, []*accesslogdatav3.HTTPAccessLogEntry{logEntry("before-stop-1", 200, "0.001"), logEntry("before-stop-2", 502, "")})
	if b := s.billing(t, "accounts", "acme"); b.BalanceMicros != 1_000_000-1000 || b.ReservedMicros != 0 {
		t.Fatalf("after settling across the restart: %+v, want balance 999000 and nothing reserved", b)
	}
	s.stop(t)
}

// TestE2ESettleOnCheckIgnoresLogs: in the default mode the access-log
// service is served, but nothing is reserved, so entries change nothing.
func TestE2ESettleOnCheckIgnoresLogs(t *testing.T) {
	t.Parallel()
	s := startServer(t, serverOpts{config: exampleConfig})
	s.createAccount(t, "acme", "1")
	k := s.createKey(t, "acme", "chat:write")
	if d := s.checkID(t, k.Secret, "on-check-1"); d.status != 200 {
		t.Fatalf("Check: %s", d)
	}
	s.sendLogs(t, []*accesslogdatav3.HTTPAccessLogEntry{logEntry("on-check-1", 500, "")})
	if b := s.billing(t, "accounts", "acme"); b.BalanceMicros != 1_000_000-priceChat || b.ReservedMicros != 0 {
		t.Fatalf("on_check: %+v, want the price debited at the Check and kept", b)
	}
	s.stop(t)
}

// TestE2ESettleCrash: after a SIGKILL, what the last flush wrote holds: an
// open reservation comes back open, and a settled one does not come back
// to be charged a second time.
func TestE2ESettleCrash(t *testing.T) {
	t.Parallel()
	longSettle := strings.Replace(settleConfig, "settle_timeout: 4s", "settle_timeout: 10m", 1)
	s := startServer(t, serverOpts{config: longSettle})
	s.createAccount(t, "acme", "1")
	k := s.createKey(t, "acme", "chat:write")
	for _, id := range []string{"crash-open", "crash-settled"} {
		if d := s.checkID(t, k.Secret, id); d.status != 200 {
			t.Fatalf("Check %s: %s", id, d)
		}
	}
	s.sendLogs(t, []*accesslogdatav3.HTTPAccessLogEntry{logEntry("crash-settled", 200, "")})
	// The ledger is written at least once a second. The first flush seen
	// may have begun before the settlement; the one after it began later.
	// Only flushes with something to write count, so a Check on another
	// account gives the second one something.
	flushes := func() float64 { return metricSum(t, s, "keygate_ledger_flushes_total", `result="ok"`) }
	s.createAccount(t, "other", "1")
	other := s.createKey(t, "other", "chat:write")
	for i := range 2 {
		before := flushes()
		if d := s.checkID(t, other.Secret, fmt.Sprintf("other-%d", i)); d.status != 200 {
			t.Fatalf("Check on the other account: %s", d)
		}
		if !eventually(stopTimeout, func() bool { return flushes() > before }) {
			t.Fatal("no ledger flush after the settlement")
		}
	}
	s.kill(t)

	s = startServer(t, serverOpts{db: s.db, config: longSettle})
	if b := s.billing(t, "accounts", "acme"); b.BalanceMicros != 1_000_000-priceChat || b.ReservedMicros != priceChat {
		t.Fatalf("after the crash: %+v, want one price charged and one reserved", b)
	}
	// The settled id is free again; the open one is still held.
	if d := s.checkID(t, k.Secret, "crash-settled"); d.status != 200 {
		t.Fatalf("Check reusing the settled id: %s", d)
	}
	if d := s.checkID(t, k.Secret, "crash-open"); d.status != 400 {
		t.Fatalf("Check reusing the open id: %s, want 400", d)
	}
	s.stop(t)
}
