// Package settle serves Envoy's gRPC access-log service
// (envoy.service.accesslog.v3.AccessLogService) and turns the final log entry
// of each HTTP request into a settlement of the spend reserved for it at
// Check time: a 2xx response commits the charge, at the cost the upstream
// reported in the x-keygate-cost-usd response header when it did; anything
// else, no response at all included, releases it.
//
// Envoy logs every request, including those keygate denied or never
// reserved, and may log one request several times (at its start, periodically
// for long streams, per upstream attempt). So the stream is read defensively:
// an entry that is not a request's final one, a TCP entry, an entry without a
// request id and an entry of a request keygate denied are skipped and
// counted; an id the ledger does not know changes nothing. None of them ends
// the stream, which Envoy keeps open for the life of the connection.
package settle

import (
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"sync"

	accesslogdatav3 "github.com/envoyproxy/go-control-plane/envoy/data/accesslog/v3"
	accesslogv3 "github.com/envoyproxy/go-control-plane/envoy/service/accesslog/v3"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/money"
)

// CostHeader is the response header in which an upstream reports what a
// request really cost, in US dollars ("0.0042"). Envoy logs it only when its
// access logger lists it in additional_response_headers_to_log.
const CostHeader = "x-keygate-cost-usd"

// requestIDHeader is where the request id is looked for when the entry's
// request_id field is empty (it is only there if the logger lists it in
// additional_request_headers_to_log).
const requestIDHeader = "x-request-id"

// extAuthzDenied is the response_code_details of a request that Envoy's
// ext_authz filter refused because keygate said no; a Check that failed
// (timeout, keygate unreachable, an invalid answer) has ext_authz_error or
// ext_authz_invalid instead. Either way Envoy sets the UAEX response flag.
const extAuthzDenied = "ext_authz_denied"

// maxLoggedValue bounds how much of an invalid cost header reaches the log.
const maxLoggedValue = 64

var (
	errNoLedger = errors.New("settle: Config.Ledger is required")
	// errClosed ends the streams of a closed Server. Unavailable: Envoy
	// opens a new stream, to the next keygate.
	errClosed = status.Error(codes.Unavailable, "keygate is stopping")
)

// Ledger ends reservations. *keystore.Store implements it. It is called from
// every access-log stream at once, so it must be safe for concurrent use.
type Ledger interface {
	// Settle ends the reservation of requestID: success charges cost
	// (clamped by the ledger) when hasCost, else the reserved price; a
	// failure releases it. It reports what it did and the amount charged;
	// SettleUnknown when requestID holds no open reservation.
	Settle(requestID string, success bool, cost money.Micros, hasCost bool) (keystore.Settled, money.Micros)
}

// Config is what New needs. Ledger is required.
type Config struct {
	Ledger  Ledger
	Log     *zap.Logger           // nil: no logs
	Metrics prometheus.Registerer // nil: no metrics
}

// Server implements envoy.service.accesslog.v3.AccessLogService over a
// Ledger.
type Server struct {
	accesslogv3.UnimplementedAccessLogServiceServer

	ledger    Ledger
	log       *zap.Logger
	m         *metrics
	closing   chan struct{} // closed by Close
	closeOnce sync.Once
}

var _ accesslogv3.AccessLogServiceServer = (*Server)(nil)

// New returns a Server that settles with c.Ledger.
func New(c Config) (*Server, error) {
	if c.Ledger == nil {
		return nil, errNoLedger
	}
	log := c.Log
	if log == nil {
		log = zap.NewNop()
	}
	m, err := newMetrics(c.Metrics)
	if err != nil {
		return nil, err
	}
	return &Server{ledger: c.Ledger, log: log, m: m, closing: make(chan struct{})}, nil
}

// Close ends every access-log stream, open or opened later, with
// Unavailable. Envoy never ends one on its own, so a graceful stop of the
// gRPC server would wait on them until its deadline; call Close first. The
// message a stream is settling is settled whole; entries Envoy sent that
// keygate has not read are lost with the stream, and their reservations
// expire.
func (s *Server) Close() {
	s.closeOnce.Do(func() { close(s.closing) })
}

// Register adds the access-log service to g, beside ext_authz on keygate's
// --listen port, where the shipped Envoy config sends its access log.
func (s *Server) Register(g *grpc.Server) {
	accesslogv3.RegisterAccessLogServiceServer(g, s)
}

// StreamAccessLogs implements AccessLogService: it settles each final HTTP
// entry as it arrives. Envoy names itself in the first message only, and
// never closes the stream on its own; when a client does, the stream ends
// with an empty response and no error. An error from the transport (Envoy
// gone, the server stopping) ends it with that error, and Close with
// Unavailable.
func (s *Server) StreamAccessLogs(stream accesslogv3.AccessLogService_StreamAccessLogsServer) error {
	select {
	case <-s.closing:
		return errClosed
	default:
	}
	// Recv blocks until Envoy sends, which may be never on an idle stream,
	// so it runs apart, and Close can end the stream between two messages.
	// The receiver stops when Recv fails, which it does once this handler
	// has returned, at the latest.
	msgs := make(chan *accesslogv3.StreamAccessLogsMessage)
	recvErr := make(chan error, 1)
	done := make(chan struct{})
	defer close(done)
	go func() {
		for {
			msg, err := stream.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			select {
			case msgs <- msg:
			case <-done:
				return
			}
		}
	}()

	first := true
	for {
		var msg *accesslogv3.StreamAccessLogsMessage
		select {
		case <-s.closing:
			return errClosed
		case err := <-recvErr:
			if errors.Is(err, io.EOF) {
				return stream.SendAndClose(&accesslogv3.StreamAccessLogsResponse{})
			}
			return err
		case msg = <-msgs:
		}
		if first {
			first = false
			if ce := s.log.Check(zap.DebugLevel, "access log stream"); ce != nil {
				id := msg.GetIdentifier()
				ce.Write(zap.String("log_name", id.GetLogName()), zap.String("node", id.GetNode().GetId()))
			}
		}
		switch logs := msg.GetLogEntries().(type) {
		case *accesslogv3.StreamAccessLogsMessage_HttpLogs:
			for _, e := range logs.HttpLogs.GetLogEntry() {
				s.entry(e)
			}
		case *accesslogv3.StreamAccessLogsMessage_TcpLogs:
			s.m.ignored[ignoredTCP].Add(float64(len(logs.TcpLogs.GetLogEntry())))
		}
	}
}

// entry settles one HTTP log entry, or counts why it does not.
func (s *Server) entry(e *accesslogdatav3.HTTPAccessLogEntry) {
	common := e.GetCommonProperties()
	if !final(common) {
		s.m.ignored[ignoredNotFinal].Inc()
		return
	}
	// keygate denied this request, so it reserved nothing for it. A
	// reservation under its id can only be another request's: one with the
	// same x-request-id, which is why keygate denied this one (400).
	// Settling from this entry would release that request's reservation.
	// (When ext_authz failed instead, a timed-out Check may have reserved:
	// that entry settles, and releases.)
	if common.GetResponseFlags().GetUnauthorizedDetails() != nil &&
		e.GetResponse().GetResponseCodeDetails() == extAuthzDenied {
		s.m.ignored[ignoredDenied].Inc()
		return
	}
	id := e.GetRequest().GetRequestId()
	if id == "" {
		id, _ = header(e.GetRequest().GetRequestHeaders(), requestIDHeader)
	}
	if id == "" {
		s.m.ignored[ignoredNoRequestID].Inc()
		return
	}

	code := e.GetResponse().GetResponseCode().GetValue() // 0: no response (reset, timeout)
	success := code >= 200 && code <= 299
	var cost money.Micros
	var hasCost bool
	if v, ok := header(e.GetResponse().GetResponseHeaders(), CostHeader); ok {
		if cost, hasCost = ParseCost(v); !hasCost {
			s.m.costInvalid.Inc()
			s.log.Warn("invalid cost header ignored; the route's price applies",
				zap.String("request_id", id), zap.String("value", quoteTruncated(v)))
		}
	}

	result, charged := s.ledger.Settle(id, success, cost, hasCost)
	s.m.settled(result).Inc()
	if result == keystore.SettleCommitted && charged > 0 {
		s.m.micros.Add(float64(charged))
	}
	if ce := s.log.Check(zap.DebugLevel, "settled"); ce != nil {
		ce.Write(zap.String("request_id", id), zap.Uint32("status", code),
			zap.Stringer("result", result), zap.Int64("charged_micros", int64(charged)))
	}
}

// final reports whether an entry is the last one Envoy writes for its
// request: the one logged when the downstream stream ends. Envoys older than
// access_log_type leave it unset and mark periodic and other early entries
// with the deprecated intermediate_log_entry instead.
func final(c *accesslogdatav3.AccessLogCommon) bool {
	switch c.GetAccessLogType() {
	case accesslogdatav3.AccessLogType_DownstreamEnd:
		return true
	case accesslogdatav3.AccessLogType_NotSet:
		//lint:ignore SA1019 the only mark of an early entry from an Envoy older than access_log_type
		return !c.GetIntermediateLogEntry()
	}
	return false
}

// header returns the value of the header name in m, matched without regard
// to case. Envoy keys the map by the lower-cased names its config lists and
// joins repeated headers with ","; if m somehow holds several spellings of
// name, their values are joined the same way, in the order of their keys.
func header(m map[string]string, name string) (string, bool) {
	if v, ok := m[name]; ok {
		return v, true
	}
	var keys []string
	for k := range m {
		if strings.EqualFold(k, name) {
			keys = append(keys, k)
		}
	}
	if len(keys) == 0 {
		return "", false
	}
	slices.Sort(keys)
	vals := make([]string, len(keys))
	for i, k := range keys {
		vals[i] = m[k]
	}
	return strings.Join(vals, ","), true
}

// ParseCost parses the value of CostHeader: a non-negative decimal amount of
// US dollars with at most six decimal places, as money.ParseUSD reads it
// ("0.0042", "1", ".5"; zeros past the sixth place are exact and accepted).
// Whitespace around the value, which HTTP does not count as part of it, is
// allowed. Anything else (a sign, an exponent, a currency symbol, a seventh
// significant decimal, a list of values) is refused with false: a cost is
// charged exactly as reported, or not at all. Clamping to the route's
// max_price_usd is the ledger's business.
func ParseCost(v string) (money.Micros, bool) {
	m, err := money.ParseUSD(strings.Trim(v, " \t"))
	if err != nil {
		return 0, false
	}
	return m, true
}

// quoteTruncated quotes v for a log line, cut to maxLoggedValue bytes: the
// header is the upstream's, not keygate's, and may be anything.
func quoteTruncated(v string) string {
	if len(v) <= maxLoggedValue {
		return strconv.Quote(v)
	}
	return strconv.Quote(v[:maxLoggedValue]) + fmt.Sprintf("... (%d bytes)", len(v))
}
