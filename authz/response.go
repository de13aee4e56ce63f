package authz

import (
	"encoding/json"
	"strconv"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/genproto/googleapis/rpc/code"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"

	"github.com/keygate/keygate/authz/ratelimit"
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
	Status  int    // 400, 401, 403 or 429
	Type    string // one of the type* constants
	Message string
	Reason  string // stable metric label: no_key, invalid_key, bad_path, ...
}

// The denials that never vary are built once, responses included, so that a
// flood of garbage keys costs no more than allowed traffic.
var (
	denyNoKey   = &Denial{Status: 401, Type: typeAuthentication, Message: "Invalid API key", Reason: "no_key"}
	denyBadKey  = &Denial{Status: 401, Type: typeAuthentication, Message: "Invalid API key", Reason: "invalid_key"}
	denyBadPath = &Denial{Status: 400, Type: typeInvalidRequest, Reason: "bad_path",
		Message: "The request path is not allowed: it contains dot segments, empty segments, a backslash or an encoded slash, dot or percent"}
	denyBalance = &Denial{Status: 429, Type: typeQuota, Reason: "balance",
		Message: "Your account balance is too low for this request; add credit to continue"}
	denySpendCap = &Denial{Status: 429, Type: typeQuota, Reason: "spend_cap",
		Message: "This API key has reached its spending cap"}
)

// body renders the JSON error body {"error":{"type":...,"message":...}}.
func (d *Denial) body() string {
	b, _ := json.Marshal(struct {
		Error struct {
			Type    string `json:"type"`
			Message string `json:"message"`
		} `json:"error"`
	}{Error: struct {
		Type    string `json:"type"`
		Message string `json:"message"`
	}{d.Type, d.Message}})
	return string(b)
}

// response builds the DeniedHttpResponse for d. extra headers (retry-after,
// rate-limit headers) follow the fixed ones.
func (d *Denial) response(extra ...*corev3.HeaderValueOption) *authv3.CheckResponse {
	hdrs := make([]*corev3.HeaderValueOption, 0, 2+len(extra))
	hdrs = append(hdrs, hv("content-type", "application/json"))
	if d.Status == 401 {
		hdrs = append(hdrs, hv("www-authenticate", "Bearer"))
	}
	hdrs = append(hdrs, extra...)
	c := code.Code_PERMISSION_DENIED
	if d.Status == 401 {
		c = code.Code_UNAUTHENTICATED
	}
	return &authv3.CheckResponse{
		Status: &rpcstatus.Status{Code: int32(c), Message: d.Message},
		HttpResponse: &authv3.CheckResponse_DeniedResponse{DeniedResponse: &authv3.DeniedHttpResponse{
			Status:  &typev3.HttpStatus{Code: typev3.StatusCode(d.Status)},
			Headers: hdrs,
			Body:    d.body(),
		}},
	}
}

// hv is a header that replaces any header of the same name.
func hv(k, v string) *corev3.HeaderValueOption {
	return &corev3.HeaderValueOption{
		Header:       &corev3.HeaderValue{Key: k, Value: v},
		AppendAction: corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD,
	}
}

// retrySeconds rounds d up to whole seconds, at least 1, as retry-after wants.
func retrySeconds(d time.Duration) int64 {
	s := int64((d + time.Second - 1) / time.Second)
	if s < 1 {
		s = 1
	}
	return s
}

// rateHeaders are the x-ratelimit-* headers (OpenAI's names) and the IETF
// RateLimit-Policy / RateLimit pair describing the key's bucket after this request.
func rateHeaders(r ratelimit.Rate, d ratelimit.Decision) []*corev3.HeaderValueOption {
	reset := retrySeconds(d.Reset)
	if d.Reset <= 0 {
		reset = 0
	}
	limit := strconv.FormatInt(d.Limit, 10)
	remaining := strconv.FormatInt(d.Remaining, 10)
	return []*corev3.HeaderValueOption{
		hv("x-ratelimit-limit-requests", limit),
		hv("x-ratelimit-remaining-requests", remaining),
		hv("x-ratelimit-reset-requests", strconv.FormatInt(reset, 10)+"s"),
		hv("ratelimit-policy", `"keygate";q=`+limit+";w="+strconv.FormatInt(int64(r.Per/time.Second), 10)),
		hv("ratelimit", `"keygate";r=`+remaining+";t="+strconv.FormatInt(reset, 10)),
	}
}

// allowResponse lets the request through: the key never leaves the edge and
// the identity headers overwrite anything the client sent. Envoy applies
// headers_to_remove after the headers it sets, so only authorization is
// removed here.
func allowResponse(keyID, account string, rateHdrs []*corev3.HeaderValueOption) *authv3.CheckResponse {
	return &authv3.CheckResponse{
		Status: &rpcstatus.Status{Code: int32(code.Code_OK)},
		HttpResponse: &authv3.CheckResponse_OkResponse{OkResponse: &authv3.OkHttpResponse{
			Headers:              []*corev3.HeaderValueOption{hv("x-keygate-key-id", keyID), hv("x-keygate-account", account)},
			HeadersToRemove:      removeAuthorization,
			ResponseHeadersToAdd: rateHdrs,
		}},
	}
}

// removeAuthorization is shared by every allow response; the gRPC codec only
// reads it.
var removeAuthorization = []string{"authorization"}
