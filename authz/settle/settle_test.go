package settle_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	datav3 "github.com/envoyproxy/go-control-plane/envoy/data/accesslog/v3"
	accesslogv3 "github.com/envoyproxy/go-control-plane/envoy/service/accesslog/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/keygate/keygate/authz"
	"github.com/keygate/keygate/authz/route"
	"github.com/keygate/keygate/authz/settle"
	"github.com/keygate/keygate/authz/wire"
	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/money"
)

// price is what every reservation of the fake ledger holds.
const price money.Micros = 2000

// call is one Settle the ledger received.
type call struct {
	ID      string
	Success bool
	Cost    money.Micros
	HasCost bool
}

// fakeLedger stands in for keystore.Store: reservations are a set of ids,
// each holding price; a commit charges the reported cost as given (the real
// ledger clamps it; that is not this package's job).
type fakeLedger struct {
	mu     sync.Mutex
	open   map[string]bool // request ids with an open reservation
	calls  []call
	notify chan string // if not nil, receives each settled id
}

func newLedger(ids ...string) *fakeLedger {
	l := &fakeLedger{open: map[string]bool{}}
	for _, id := range ids {
		l.open[id] = true
	}
	return l
}

func (l *fakeLedger) Settle(id string, success bool, cost money.Micros, hasCost bool) (keystore.Settled, money.Micros) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.calls = append(l.calls, call{id, success, cost, hasCost})
	if l.notify != nil {
		l.notify <- id
	}
	if !l.open[id] {
		return keystore.SettleUnknown, 0
	}
	delete(l.open, id)
	switch {
	case !success:
		return keystore.SettleReleased, 0
	case hasCost:
		return keystore.SettleCommitted, cost
	}
	return keystore.SettleCommitted, price
}

func (l *fakeLedger) Calls() []call {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]call(nil), l.calls...)
}

// fixture is a settle.Server over a fake ledger, served over real gRPC on
// 127.0.0.1 with keygate's server codec, as authz.NewGRPCServer installs it.
type fixture struct {
	srv    *settle.Server
	ledger *fakeLedger
	reg    *prometheus.Registry
	logs   *observer.ObservedLogs
	client accesslogv3.AccessLogServiceClient
}

func newFixture(t *testing.T, ledger *fakeLedger) *fixture {
	t.Helper()
	f := &fixture{ledger: ledger, reg: prometheus.NewRegistry()}
	core, logs := observer.New(zap.DebugLevel)
	f.logs = logs
	var err error
	f.srv, err = settle.New(settle.Config{Ledger: ledger, Log: zap.New(core), Metrics: f.reg})
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer(grpc.ForceServerCodecV2(wire.Codec{}))
	f.srv.Register(gs)
	f.client = accesslogv3.NewAccessLogServiceClient(listen(t, gs))
	return f
}

// listen serves gs on a loopback port and returns a client connection to it.
func listen(t *testing.T, gs *grpc.Server) *grpc.ClientConn {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- gs.Serve(lis) }()
	t.Cleanup(func() {
		gs.Stop()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	cc, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

// stream sends msgs on one access-log stream, as Envoy does, then closes
// it. The server answers the close only after it has handled every message,
// so the ledger has seen them all when stream returns.
func (f *fixture) stream(t *testing.T, msgs ...*accesslogv3.StreamAccessLogsMessage) {
	t.Helper()
	if err := send(f.client, msgs...); err != nil {
		t.Fatal(err)
	}
}

func send(c accesslogv3.AccessLogServiceClient, msgs ...*accesslogv3.StreamAccessLogsMessage) error {
	st, err := c.StreamAccessLogs(context.Background())
	if err != nil {
		return err
	}
	for i, m := range msgs {
		if err := st.Send(m); errors.Is(err, io.EOF) {
			break // the server ended the stream: CloseAndRecv says why
		} else if err != nil {
			return fmt.Errorf("Send(message %d): %w", i, err)
		}
	}
	if _, err := st.CloseAndRecv(); err != nil {
		return fmt.Errorf("CloseAndRecv: %w", err)
	}
	return nil
}

// metrics returns every non-zero series of the settlement metrics, keyed
// like `name{label="value"}`.
func (f *fixture) metrics(t *testing.T) map[string]float64 {
	t.Helper()
	mfs, err := f.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			key := mf.GetName()
			var labels []string
			for _, l := range m.GetLabel() {
				labels = append(labels, fmt.Sprintf("%s=%q", l.GetName(), l.GetValue()))
			}
			if len(labels) > 0 {
				key += "{" + strings.Join(labels, ",") + "}"
			}
			if v := m.GetCounter().GetValue(); v != 0 {
				got[key] = v
			}
		}
	}
	return got
}

// httpLogs is a message of HTTP entries; the first of a stream also names
// the Envoy that sends it.
func httpLogs(first bool, entries ...*datav3.HTTPAccessLogEntry) *accesslogv3.StreamAccessLogsMessage {
	m := &accesslogv3.StreamAccessLogsMessage{
		LogEntries: &accesslogv3.StreamAccessLogsMessage_HttpLogs{
			HttpLogs: &accesslogv3.StreamAccessLogsMessage_HTTPAccessLogEntries{LogEntry: entries},
		},
	}
	if first {
		m.Identifier = &accesslogv3.StreamAccessLogsMessage_Identifier{
			Node:    &corev3.Node{Id: "envoy-1", Cluster: "api"},
			LogName: "keygate",
		}
	}
	return m
}

func tcpLogs(first bool, n int) *accesslogv3.StreamAccessLogsMessage {
	m := &accesslogv3.StreamAccessLogsMessage{
		LogEntries: &accesslogv3.StreamAccessLogsMessage_TcpLogs{
			TcpLogs: &accesslogv3.StreamAccessLogsMessage_TCPAccessLogEntries{},
		},
	}
	for range n {
		m.GetTcpLogs().LogEntry = append(m.GetTcpLogs().LogEntry, &datav3.TCPAccessLogEntry{
			CommonProperties: &datav3.AccessLogCommon{AccessLogType: datav3.AccessLogType_TcpConnectionEnd},
		})
	}
	if first {
		m.Identifier = &accesslogv3.StreamAccessLogsMessage_Identifier{LogName: "keygate"}
	}
	return m
}

// entry is a final HTTP entry as Envoy writes it when a request ends: code
// 0 means no response (a reset or a timeout before the upstream answered).
func entry(id string, code uint32, opts ...func(*datav3.HTTPAccessLogEntry)) *datav3.HTTPAccessLogEntry {
	e := &datav3.HTTPAccessLogEntry{
		CommonProperties: &datav3.AccessLogCommon{AccessLogType: datav3.AccessLogType_DownstreamEnd},
		Request:          &datav3.HTTPRequestProperties{RequestId: id, Path: "/v1/chat/completions"},
		Response:         &datav3.HTTPResponseProperties{},
	}
	if code != 0 {
		e.Response.ResponseCode = wrapperspb.UInt32(code)
	}
	for _, o := range opts {
		o(e)
	}
	return e
}

func cost(v string) func(*datav3.HTTPAccessLogEntry) {
	return respHeader(settle.CostHeader, v)
}

func respHeader(name, v string) func(*datav3.HTTPAccessLogEntry) {
	return func(e *datav3.HTTPAccessLogEntry) {
		if e.Response.ResponseHeaders == nil {
			e.Response.ResponseHeaders = map[string]string{}
		}
		e.Response.ResponseHeaders[name] = v
	}
}

func reqHeader(name, v string) func(*datav3.HTTPAccessLogEntry) {
	return func(e *datav3.HTTPAccessLogEntry) {
		if e.Request.RequestHeaders == nil {
			e.Request.RequestHeaders = map[string]string{}
		}
		e.Request.RequestHeaders[name] = v
	}
}

func logType(lt datav3.AccessLogType) func(*datav3.HTTPAccessLogEntry) {
	return func(e *datav3.HTTPAccessLogEntry) { e.CommonProperties.AccessLogType = lt }
}

// intermediate is an entry of an Envoy older than access_log_type.
func intermediate(e *datav3.HTTPAccessLogEntry) {
	e.CommonProperties.AccessLogType = datav3.AccessLogType_NotSet
	//lint:ignore SA1019 what an Envoy older than access_log_type sends
	e.CommonProperties.IntermediateLogEntry = true
}

// extAuthz marks an entry the way Envoy's ext_authz filter does when it
// stops a request: the UAEX response flag, and details saying why.
func extAuthz(details string) func(*datav3.HTTPAccessLogEntry) {
	return func(e *datav3.HTTPAccessLogEntry) {
		e.CommonProperties.ResponseFlags = &datav3.ResponseFlags{
			UnauthorizedDetails: &datav3.ResponseFlags_Unauthorized{Reason: datav3.ResponseFlags_Unauthorized_EXTERNAL_SERVICE},
		}
		e.Response.ResponseCodeDetails = details
	}
}

func noResponse(e *datav3.HTTPAccessLogEntry) { e.Response = nil }

const (
	committed = `keygate_settlements_total{result="committed"}`
	released  = `keygate_settlements_total{result="released"}`
	unknown   = `keygate_settlements_total{result="unknown"}`
	micros    = `keygate_settled_micros_total`
	invalid   = `keygate_settle_cost_header_invalid_total`
	notFinal  = `keygate_access_log_entries_ignored_total{reason="not_final"}`
	tcp       = `keygate_access_log_entries_ignored_total{reason="tcp"}`
	noID      = `keygate_access_log_entries_ignored_total{reason="no_request_id"}`
	denied    = `keygate_access_log_entries_ignored_total{reason="denied"}`
)

func TestStreamAccessLogs(t *testing.T) {
	tests := []struct {
		name        string
		reserved    []string // request ids with an open reservation
		msgs        []*accesslogv3.StreamAccessLogsMessage
		wantCalls   []call
		wantMetrics map[string]float64
		wantOpen    []string // reservations left open
	}{
		{
			name:     "2xx commits at the price",
			reserved: []string{"a", "b", "c"},
			msgs:     []*accesslogv3.StreamAccessLogsMessage{httpLogs(true, entry("a", 200), entry("b", 201), entry("c", 299))},
			wantCalls: []call{
				{ID: "a", Success: true}, {ID: "b", Success: true}, {ID: "c", Success: true},
			},
			wantMetrics: map[string]float64{committed: 3, micros: 3 * float64(price)},
		},
		{
			name:     "other statuses release",
			reserved: []string{"a", "b", "c", "d", "e"},
			msgs: []*accesslogv3.StreamAccessLogsMessage{httpLogs(true,
				entry("a", 500), entry("b", 503), entry("c", 404), entry("d", 304), entry("e", 199))},
			wantCalls: []call{
				{ID: "a"}, {ID: "b"}, {ID: "c"}, {ID: "d"}, {ID: "e"},
			},
			wantMetrics: map[string]float64{released: 5},
		},
		{
			name:        "no response releases",
			reserved:    []string{"reset", "nil response"},
			msgs:        []*accesslogv3.StreamAccessLogsMessage{httpLogs(true, entry("reset", 0), entry("nil response", 0, noResponse))},
			wantCalls:   []call{{ID: "reset"}, {ID: "nil response"}},
			wantMetrics: map[string]float64{released: 2},
		},
		{
			name:     "reported cost is charged",
			reserved: []string{"a", "b", "c"},
			msgs: []*accesslogv3.StreamAccessLogsMessage{httpLogs(true,
				entry("a", 200, cost("0.0042")),
				entry("b", 200, respHeader("X-Keygate-Cost-USD", "1.5")),
				entry("c", 200, cost("0")))},
			wantCalls: []call{
				{ID: "a", Success: true, Cost: 4200, HasCost: true},
				{ID: "b", Success: true, Cost: 1_500_000, HasCost: true},
				{ID: "c", Success: true, Cost: 0, HasCost: true},
			},
			wantMetrics: map[string]float64{committed: 3, micros: 4200 + 1_500_000},
		},
		{
			name:     "a failed request charges nothing whatever its cost header",
			reserved: []string{"a"},
			msgs:     []*accesslogv3.StreamAccessLogsMessage{httpLogs(true, entry("a", 502, cost("0.5")))},
			wantCalls: []call{
				{ID: "a", Success: false, Cost: 500_000, HasCost: true},
			},
			wantMetrics: map[string]float64{released: 1},
		},
		{
			name:     "an invalid cost header is ignored and counted",
			reserved: []string{"neg", "precise", "exp", "dollar", "list", "empty"},
			msgs: []*accesslogv3.StreamAccessLogsMessage{httpLogs(true,
				entry("neg", 200, cost("-0.01")),
				entry("precise", 200, cost("0.0000001")),
				entry("exp", 200, cost("1e-3")),
				entry("dollar", 200, cost("$0.01")),
				entry("list", 200, cost("0.01,0.02")),
				entry("empty", 200, cost("")))},
			wantCalls: []call{
				{ID: "neg", Success: true}, {ID: "precise", Success: true}, {ID: "exp", Success: true},
				{ID: "dollar", Success: true}, {ID: "list", Success: true}, {ID: "empty", Success: true},
			},
			wantMetrics: map[string]float64{committed: 6, micros: 6 * float64(price), invalid: 6},
		},
		{
			name:     "only the final entry settles",
			reserved: []string{"a", "b"},
			msgs: []*accesslogv3.StreamAccessLogsMessage{httpLogs(true,
				entry("a", 0, logType(datav3.AccessLogType_DownstreamStart)),
				entry("a", 0, logType(datav3.AccessLogType_DownstreamPeriodic)),
				entry("a", 503, logType(datav3.AccessLogType_UpstreamEnd)),
				entry("a", 0, logType(datav3.AccessLogType_UpstreamPoolReady)),
				entry("a", 200, logType(datav3.AccessLogType_DownstreamTunnelSuccessfullyEstablished)),
				entry("a", 0, intermediate),
				entry("a", 200, logType(datav3.AccessLogType_DownstreamEnd)),
				entry("b", 200, logType(datav3.AccessLogType_NotSet)))},
			wantCalls:   []call{{ID: "a", Success: true}, {ID: "b", Success: true}},
			wantMetrics: map[string]float64{committed: 2, micros: 2 * float64(price), notFinal: 6},
		},
		{
			name:        "TCP entries are ignored",
			reserved:    []string{"a"},
			msgs:        []*accesslogv3.StreamAccessLogsMessage{tcpLogs(true, 3), httpLogs(false, entry("a", 200)), tcpLogs(false, 1)},
			wantCalls:   []call{{ID: "a", Success: true}},
			wantMetrics: map[string]float64{committed: 1, micros: float64(price), tcp: 4},
		},
		{
			name:     "unknown ids change nothing and the stream goes on",
			reserved: []string{"a"},
			msgs: []*accesslogv3.StreamAccessLogsMessage{
				httpLogs(true, entry("never reserved", 200), entry("also unknown", 500)),
				httpLogs(false, entry("a", 200)),
				httpLogs(false, entry("a", 200)), // a repeat: already settled
			},
			wantCalls: []call{
				{ID: "never reserved", Success: true}, {ID: "also unknown"},
				{ID: "a", Success: true}, {ID: "a", Success: true},
			},
			wantMetrics: map[string]float64{committed: 1, micros: float64(price), unknown: 3},
		},
		{
			name:     "x-request-id header when request_id is empty",
			reserved: []string{"h1", "h2"},
			msgs: []*accesslogv3.StreamAccessLogsMessage{httpLogs(true,
				entry("", 200, reqHeader("x-request-id", "h1")),
				entry("", 500, reqHeader("X-Request-ID", "h2")))},
			wantCalls:   []call{{ID: "h1", Success: true}, {ID: "h2"}},
			wantMetrics: map[string]float64{committed: 1, micros: float64(price), released: 1},
		},
		{
			name:     "request_id wins over the header",
			reserved: []string{"field"},
			msgs: []*accesslogv3.StreamAccessLogsMessage{httpLogs(true,
				entry("field", 200, reqHeader("x-request-id", "header")))},
			wantCalls:   []call{{ID: "field", Success: true}},
			wantMetrics: map[string]float64{committed: 1, micros: float64(price)},
		},
		{
			name: "no request id is ignored and counted",
			msgs: []*accesslogv3.StreamAccessLogsMessage{httpLogs(true,
				entry("", 200), entry("", 200, noResponse), entry("", 200, reqHeader("x-request-id", "")),
				&datav3.HTTPAccessLogEntry{}, nil)},
			wantMetrics: map[string]float64{noID: 5},
		},
		{
			// Two requests with one id: keygate reserved for the first and
			// denied the second (400). The denial's entry must not release
			// the first request's reservation.
			name:        "an entry of a request keygate denied settles nothing",
			reserved:    []string{"a"},
			msgs:        []*accesslogv3.StreamAccessLogsMessage{httpLogs(true, entry("a", 400, extAuthz("ext_authz_denied")), entry("a", 200))},
			wantCalls:   []call{{ID: "a", Success: true}},
			wantMetrics: map[string]float64{committed: 1, micros: float64(price), denied: 1},
		},
		{
			// The Check timed out in Envoy after keygate reserved, or
			// Envoy refused keygate's answer: the request never reached the
			// API, so its reservation is released.
			name:     "an entry of a request whose Check failed releases",
			reserved: []string{"timeout", "invalid"},
			msgs: []*accesslogv3.StreamAccessLogsMessage{httpLogs(true,
				entry("timeout", 503, extAuthz("ext_authz_error")),
				entry("invalid", 500, extAuthz("ext_authz_invalid")))},
			wantCalls:   []call{{ID: "timeout"}, {ID: "invalid"}},
			wantMetrics: map[string]float64{released: 2},
		},
		{
			name:     "several messages of several entries",
			reserved: []string{"a", "b", "c", "d"},
			msgs: []*accesslogv3.StreamAccessLogsMessage{
				httpLogs(true, entry("a", 200), entry("b", 500)),
				httpLogs(false),
				httpLogs(false, entry("c", 200, cost("0.25")), entry("d", 0)),
				{}, // no entries at all
			},
			wantCalls: []call{
				{ID: "a", Success: true}, {ID: "b"}, {ID: "c", Success: true, Cost: 250_000, HasCost: true}, {ID: "d"},
			},
			wantMetrics: map[string]float64{committed: 2, released: 2, micros: float64(price) + 250_000},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t, newLedger(tt.reserved...))
			f.stream(t, tt.msgs...)
			if diff := cmp.Diff(tt.wantCalls, f.ledger.Calls(), cmpopts.EquateEmpty()); diff != "" {
				t.Errorf("Settle calls (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(tt.wantMetrics, f.metrics(t), cmpopts.EquateEmpty()); diff != "" {
				t.Errorf("metrics (-want +got):\n%s", diff)
			}
		})
	}
}

// TestConcurrentStreams: several Envoys (or one Envoy's worker threads,
// each of which opens its own stream) log at once; each request settles
// exactly once.
func TestConcurrentStreams(t *testing.T) {
	const streams, perStream, perMessage = 8, 60, 7
	var ids []string
	for s := range streams {
		for i := range perStream {
			ids = append(ids, fmt.Sprintf("s%d-r%d", s, i))
		}
	}
	f := newFixture(t, newLedger(ids...))

	errs := make(chan error, streams)
	for s := range streams {
		go func() {
			var msgs []*accesslogv3.StreamAccessLogsMessage
			var batch []*datav3.HTTPAccessLogEntry
			for i := range perStream {
				code := uint32(200)
				if i%3 == 0 {
					code = 503
				}
				batch = append(batch, entry(fmt.Sprintf("s%d-r%d", s, i), code))
				if len(batch) == perMessage || i == perStream-1 {
					msgs = append(msgs, httpLogs(len(msgs) == 0, batch...))
					batch = nil
				}
			}
			errs <- send(f.client, msgs...)
		}()
	}
	for range streams {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}

	seen := map[string]int{}
	for _, c := range f.ledger.Calls() {
		seen[c.ID]++
	}
	for _, id := range ids {
		if seen[id] != 1 {
			t.Errorf("%s settled %d times, want 1", id, seen[id])
		}
	}
	const failed = streams * (perStream / 3)
	want := map[string]float64{
		committed: streams*perStream - failed,
		released:  failed,
		micros:    (streams*perStream - failed) * float64(price),
	}
	if diff := cmp.Diff(want, f.metrics(t)); diff != "" {
		t.Errorf("metrics (-want +got):\n%s", diff)
	}
}

// noKeys is an authz.Keys that the Checks of TestBesideCheck never reach:
// a Check without an API key is denied before any lookup.
type noKeys struct{ authz.Keys }

// TestBesideCheck serves the access-log service on the very server keygate
// serves Checks with: its codec decodes Checks itself and must pass access-
// log messages to the generic protobuf code, and both services must answer
// on one connection.
func TestBesideCheck(t *testing.T) {
	routes, err := route.NewTable(nil)
	if err != nil {
		t.Fatal(err)
	}
	az, err := authz.New(authz.Config{Keys: noKeys{}, Routes: routes})
	if err != nil {
		t.Fatal(err)
	}
	ledger := newLedger("a", "b")
	srv, err := settle.New(settle.Config{Ledger: ledger})
	if err != nil {
		t.Fatal(err)
	}
	gs := authz.NewGRPCServer(az)
	srv.Register(gs)
	cc := listen(t, gs)

	als := accesslogv3.NewAccessLogServiceClient(cc)
	if err := send(als, httpLogs(true, entry("a", 200, cost("0.000150"))), httpLogs(false, entry("b", 500))); err != nil {
		t.Fatal(err)
	}
	want := []call{{ID: "a", Success: true, Cost: 150, HasCost: true}, {ID: "b"}}
	if diff := cmp.Diff(want, ledger.Calls()); diff != "" {
		t.Errorf("Settle calls (-want +got):\n%s", diff)
	}

	resp, err := authv3.NewAuthorizationClient(cc).Check(context.Background(), &authv3.CheckRequest{
		Attributes: &authv3.AttributeContext{Request: &authv3.AttributeContext_Request{
			Http: &authv3.AttributeContext_HttpRequest{Method: "GET", Path: "/v1/models"},
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := resp.GetDeniedResponse().GetStatus().GetCode(); got != typev3.StatusCode_Unauthorized {
		t.Errorf("Check without a key: status %v, want 401", got)
	}
}

// stubStream is a stream whose Recv returns msgs, then err.
type stubStream struct {
	accesslogv3.AccessLogService_StreamAccessLogsServer
	msgs   []*accesslogv3.StreamAccessLogsMessage
	err    error
	closed bool
}

func (s *stubStream) Recv() (*accesslogv3.StreamAccessLogsMessage, error) {
	if len(s.msgs) == 0 {
		return nil, s.err
	}
	m := s.msgs[0]
	s.msgs = s.msgs[1:]
	return m, nil
}

func (s *stubStream) SendAndClose(*accesslogv3.StreamAccessLogsResponse) error {
	s.closed = true
	return nil
}

func TestStreamEnd(t *testing.T) {
	broken := errors.New("connection reset")
	tests := []struct {
		name       string
		recvErr    error
		wantErr    error
		wantClosed bool
	}{
		{name: "client closes", recvErr: io.EOF, wantErr: nil, wantClosed: true},
		{name: "transport fails", recvErr: broken, wantErr: broken, wantClosed: false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ledger := newLedger("a")
			srv, err := settle.New(settle.Config{Ledger: ledger})
			if err != nil {
				t.Fatal(err)
			}
			st := &stubStream{msgs: []*accesslogv3.StreamAccessLogsMessage{httpLogs(true, entry("a", 200))}, err: tt.recvErr}
			if err := srv.StreamAccessLogs(st); !errors.Is(err, tt.wantErr) {
				t.Errorf("StreamAccessLogs = %v, want %v", err, tt.wantErr)
			}
			if st.closed != tt.wantClosed {
				t.Errorf("SendAndClose called: %v, want %v", st.closed, tt.wantClosed)
			}
			if diff := cmp.Diff([]call{{ID: "a", Success: true}}, ledger.Calls()); diff != "" {
				t.Errorf("Settle calls (-want +got):\n%s", diff)
			}
		})
	}
}

// TestClose: Close ends a stream that waits for Envoy's next message, and
// refuses new ones, so that the server's graceful stop does not wait on
// streams Envoy never ends.
func TestClose(t *testing.T) {
	ledger := newLedger("a", "b")
	ledger.notify = make(chan string, 1)
	srv, err := settle.New(settle.Config{Ledger: ledger})
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer(grpc.ForceServerCodecV2(wire.Codec{}))
	srv.Register(gs)
	client := accesslogv3.NewAccessLogServiceClient(listen(t, gs))

	st, err := client.StreamAccessLogs(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(httpLogs(true, entry("a", 200))); err != nil {
		t.Fatal(err)
	}
	<-ledger.notify // the handler runs, and now waits for the next message
	srv.Close()
	srv.Close() // twice is harmless
	if _, err := st.CloseAndRecv(); status.Code(err) != codes.Unavailable {
		t.Errorf("open stream after Close: %v, want Unavailable", err)
	}
	if err := send(client, httpLogs(true, entry("b", 200))); status.Code(err) != codes.Unavailable {
		t.Errorf("new stream after Close: %v, want Unavailable", err)
	}
	gs.GracefulStop() // returns: no stream is left open

	if diff := cmp.Diff([]call{{ID: "a", Success: true}}, ledger.Calls()); diff != "" {
		t.Errorf("Settle calls (-want +got):\n%s", diff)
	}
}

// TestLogs: one debug line per settled entry naming the request id and the
// result; a warning for an invalid cost header, its value quoted and cut;
// never a request header such as the API key.
func TestLogs(t *testing.T) {
	f := newFixture(t, newLedger("a", "b"))
	long := strings.Repeat("9", 70) + "TAIL"
	f.stream(t, httpLogs(true,
		entry("a", 200, reqHeader("authorization", "Bearer sk-live-secret"), cost("0.001")),
		entry("b", 200, reqHeader("authorization", "Bearer sk-live-secret"), cost(long))))

	for _, e := range f.logs.All() {
		for k, v := range e.ContextMap() {
			if s := fmt.Sprint(v); strings.Contains(s, "sk-live-secret") || strings.Contains(s, "TAIL") {
				t.Errorf("log %q field %s = %q", e.Message, k, s)
			}
		}
	}
	settled := f.logs.FilterMessage("settled").All()
	if len(settled) != 2 {
		t.Fatalf("%d settled lines, want 2: %v", len(settled), f.logs.All())
	}
	want := map[string]any{"request_id": "a", "status": uint32(200), "result": "committed", "charged_micros": int64(1000)}
	if diff := cmp.Diff(want, settled[0].ContextMap()); diff != "" {
		t.Errorf("settled line (-want +got):\n%s", diff)
	}
	warns := f.logs.FilterLevelExact(zap.WarnLevel).All()
	if len(warns) != 1 {
		t.Fatalf("%d warnings, want 1: %v", len(warns), warns)
	}
	wantWarn := map[string]any{"request_id": "b", "value": `"` + strings.Repeat("9", 64) + `"... (74 bytes)`}
	if diff := cmp.Diff(wantWarn, warns[0].ContextMap()); diff != "" {
		t.Errorf("warning (-want +got):\n%s", diff)
	}
}

func TestNew(t *testing.T) {
	if _, err := settle.New(settle.Config{}); err == nil {
		t.Error("New without a Ledger: no error")
	}

	// A second Server on the same registry (a restarted serve loop in one
	// process) shares the first one's counters.
	reg := prometheus.NewRegistry()
	for range 2 {
		if _, err := settle.New(settle.Config{Ledger: newLedger(), Metrics: reg}); err != nil {
			t.Fatalf("New on a registry that has the metrics: %v", err)
		}
	}

	// A different metric under one of its names is an error, not a panic.
	clash := prometheus.NewRegistry()
	clash.MustRegister(prometheus.NewGauge(prometheus.GaugeOpts{Name: "keygate_settled_micros_total", Help: "not ours"}))
	if _, err := settle.New(settle.Config{Ledger: newLedger(), Metrics: clash}); err == nil {
		t.Error("New on a registry with a clashing metric: no error")
	}
}
