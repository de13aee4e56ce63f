package authz

import (
	"encoding/json"
	"strconv"
	"time"
	"unsafe"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/genproto/googleapis/rpc/code"

	"github.com/keygate/keygate/authz/ratelimit"
	"github.com/keygate/keygate/authz/wire"
)

// Error types of the JSON body, as the API's clients parse them.
const (
	typeAuthentication = "authentication_error"
	typeInvalidRequest = "invalid_request_error"
	typePermission     = "permission_error"
	typeRateLimit      = "rate_limit_error"
	typeQuota          = "insufficient_quota"
)

// A Denial is a refused request: the HTTP status Envoy sends back and the JSON
// body clients parse. Denials are counted in metrics, not logged as errors.
type Denial struct {
	Status  int    // 400, 401, 403, 429 or 503
	Type    string // one of the type* constants
	Message string
	Reason  string // stable metric label: no_key, invalid_key, bad_path, ...

	// rateLimited adds retry-after and the rate-limit headers, from the grant.
	rateLimited bool
	// unavailable marks a refusal because a service keygate needs is down:
	// retry-after: 1 and gRPC code UNAVAILABLE.
	unavailable bool
	// encoded is the JSON body, when built ahead.
	encoded string

	// fixed is the whole response of a denial that never varies, built once
	// so that a flood of garbage keys costs no more than allowed traffic,
	// and frozen is the same response already encoded for the wire. The
	// gRPC codec only reads them, so every Check may share them.
	fixed  *authv3.CheckResponse
	frozen *wire.Frozen
}

// fixed returns d with its response prebuilt and encoded.
func fixed(d *Denial) *Denial {
	d.encoded = d.body()
	h := d.headers(grant{}, nil) // a fixed denial has no per-request values
	resp := d.denied(&h)
	d.fixed, d.frozen = resp.Proto(), resp.Encode()
	return d
}

var (
	denyNoKey   = fixed(&Denial{Status: 401, Type: typeAuthentication, Message: "Invalid API key", Reason: "no_key"})
	denyBadKey  = fixed(&Denial{Status: 401, Type: typeAuthentication, Message: "Invalid API key", Reason: "invalid_key"})
	denyBadPath = fixed(&Denial{Status: 400, Type: typeInvalidRequest, Reason: "bad_path",
		Message: "The request path is not allowed: it contains a dot segment, an empty segment, a backslash, a control character or a needless percent-encoding"})
	denyBalance = fixed(&Denial{Status: 429, Type: typeQuota, Reason: "balance",
		Message: "Your account balance is too low for this request; add credit to continue"})
	denySpendCap = fixed(&Denial{Status: 429, Type: typeQuota, Reason: "spend_cap",
		Message: "This API key has reached its spending cap"})
	denyDuplicate = fixed(&Denial{Status: 400, Type: typeInvalidRequest, Reason: "duplicate_request",
		Message: "Another request with this request id is still in flight; give each request its own x-request-id"})
	denyRequestID = fixed(&Denial{Status: 400, Type: typeInvalidRequest, Reason: "bad_request_id",
		Message: "The request id cannot be used to settle this request: it is longer than 128 bytes"})
	denyMalformed = fixed(&Denial{Status: 400, Type: typeInvalidRequest, Reason: "malformed",
		Message: "The authorization request could not be decoded"})
	// denyBilling answers a Check whose spend the ledger could not decide.
	denyBilling = fixed(&Denial{Status: 503, Type: "service_unavailable", Reason: "billing_unavailable",
		unavailable: true, Message: "Billing is temporarily unavailable; retry shortly"})
	// denyInternal answers a Check that hit a bug: refused, never allowed.
	denyInternal = fixed(&Denial{Status: 503, Type: "api_error", Reason: "internal",
		Message: "The authorization service failed on this request"})
)

func scopeDenial(scope string) *Denial {
	return fixed(&Denial{Status: 403, Type: typePermission, Reason: "scope",
		Message: "This API key does not have the required scope: " + scope})
}

// response returns the CheckResponse for d; g supplies the rate-limit state
// of a rate-limit denial.
func (d *Denial) response(g grant) *authv3.CheckResponse {
	if d.fixed != nil {
		return d.fixed
	}
	h := d.headers(g, new(denialDigits))
	resp := d.denied(&h)
	return resp.Proto()
}

// encode is response(g) encoded for the wire: the served path's denial.
// Only a 429, whose retry-after and rate-limit headers vary, and a
// no-route 403, which names the request, are encoded anew.
func (d *Denial) encode(g grant) *wire.Frozen {
	if d.frozen != nil {
		return d.frozen
	}
	var digits denialDigits
	h := d.headers(g, &digits)
	resp := d.denied(&h)
	return resp.Encode()
}

// denied is d's response, with the headers h.
func (d *Denial) denied(h *denialHeaders) wire.Denied {
	body := d.encoded
	if body == "" {
		body = d.body()
	}
	c := code.Code_PERMISSION_DENIED
	switch {
	case d.Status == 401:
		c = code.Code_UNAUTHENTICATED
	case d.unavailable:
		c = code.Code_UNAVAILABLE
	}
	return wire.Denied{Code: int32(c), Message: d.Message, Status: int32(d.Status), Headers: h.h[:h.n], Body: body}
}

// denialHeaders are a denial's headers: content-type, and www-authenticate,
// retry-after and the rate-limit headers where they apply.
type denialHeaders struct {
	h [3 + numRateHeaders]wire.Header
	n int
}

// denialDigits holds the numbers in a rate-limit denial's headers.
type denialDigits struct {
	retry [20]byte
	rate  rateDigits
}

// headers returns d's headers for g. The values of a rate-limit denial's
// are over digits, which must outlive them. It returns a value the caller
// keeps, rather than filling a pointer, so that nothing of it escapes to
// the heap.
func (d *Denial) headers(g grant, digits *denialDigits) denialHeaders {
	h := denialHeaders{h: [3 + numRateHeaders]wire.Header{{Key: "content-type", Value: "application/json"}}, n: 1}
	if d.Status == 401 {
		h.h[h.n] = wire.Header{Key: "www-authenticate", Value: "Bearer"}
		h.n++
	}
	if d.unavailable {
		h.h[h.n] = wire.Header{Key: "retry-after", Value: "1"}
		h.n++
	}
	if d.rateLimited {
		retry := strconv.AppendInt(digits.retry[:0], retrySeconds(g.lim.RetryAfter), 10)
		h.h[h.n] = wire.Header{Key: "retry-after", Value: unsafe.String(&digits.retry[0], len(retry))}
		h.n++
		rate := rateHeaders(g.lim, &digits.rate)
		h.n += copy(h.h[h.n:], rate[:])
	}
	return h
}

// body renders the JSON error body {"error":{"type":...,"message":...}}.
func (d *Denial) body() string {
	type detail struct {
		Type    string `json:"type"`
		Message string `json:"message"`
	}
	b, _ := json.Marshal(struct {
		Error detail `json:"error"`
	}{detail{d.Type, d.Message}})
	return string(b)
}

// retrySeconds rounds d up to whole seconds, at least 1, as retry-after wants.
func retrySeconds(d time.Duration) int64 {
	s := int64((d + time.Second - 1) / time.Second)
	if s < 1 {
		s = 1
	}
	return s
}

const numRateHeaders = 3

// rateDigits holds the values of the x-ratelimit-* headers: three int64s
// in decimal and an "s".
type rateDigits [numRateHeaders * 24]byte

// rateHeaders returns the x-ratelimit-* headers (the names OpenAI's
// clients read) for the key's bucket after this request. Their values are
// strings over digits, which must outlive them: the headers cost no
// allocation of their own.
func rateHeaders(d ratelimit.Decision, digits *rateDigits) [numRateHeaders]wire.Header {
	var reset int64
	if d.Reset > 0 {
		reset = retrySeconds(d.Reset)
	}
	// Each value is at most 20 digits and an "s": append never outgrows
	// digits, so the strings below stay over it.
	b := strconv.AppendInt(digits[:0], d.Limit, 10)
	n1 := len(b)
	b = strconv.AppendInt(b, d.Remaining, 10)
	n2 := len(b)
	b = append(strconv.AppendInt(b, reset, 10), 's')
	return [numRateHeaders]wire.Header{
		{Key: "x-ratelimit-limit-requests", Value: digitString(digits, 0, n1)},
		{Key: "x-ratelimit-remaining-requests", Value: digitString(digits, n1, n2)},
		{Key: "x-ratelimit-reset-requests", Value: digitString(digits, n2, len(b))},
	}
}

// digitString returns digits[lo:hi] as a string that shares its bytes.
func digitString(digits *rateDigits, lo, hi int) string {
	return unsafe.String(&digits[lo], hi-lo)
}

// allowHeaders are an allow response's headers: the key never leaves the
// edge, and the identity headers overwrite anything the client sent. Envoy
// applies headers_to_remove after the headers it sets, so only
// authorization is removed.
type allowHeaders struct {
	set  [2]wire.Header
	rate [numRateHeaders]wire.Header // when the key has a rate limit
	n    int                         // how many of rate
}

// allowFor returns g's allow headers. Their rate-limit values are over
// digits, which must outlive them. It fills a value the caller keeps,
// rather than a pointer, so that nothing of it escapes to the heap.
func allowFor(g grant, digits *rateDigits) allowHeaders {
	h := allowHeaders{set: [2]wire.Header{
		{Key: "x-keygate-key-id", Value: g.key.ID},
		{Key: "x-keygate-account", Value: g.key.Account()},
	}}
	if !g.rate.IsZero() { // an unlimited key has no bucket to describe
		h.rate, h.n = rateHeaders(g.lim, digits), numRateHeaders
	}
	return h
}

// ok is the response, over h.
func (h *allowHeaders) ok() wire.OK {
	return wire.OK{Headers: h.set[:], HeadersToRemove: removeAuthorization, ResponseHeaders: h.rate[:h.n]}
}

// encodeAllow is the served path's allow response, encoded for the wire:
// it allocates the bytes and their wire.Frozen, nothing else.
func encodeAllow(g grant) *wire.Frozen {
	var digits rateDigits
	h := allowFor(g, &digits)
	ok := h.ok()
	return ok.Encode()
}

// allowResponse is the allow response as the generated message.
func allowResponse(g grant) *authv3.CheckResponse {
	h := allowFor(g, new(rateDigits))
	ok := h.ok()
	return ok.Proto()
}

// removeAuthorization is shared by every allow response; nothing writes
// to it.
var removeAuthorization = []string{"authorization"}
