package authz

import (
	"strings"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"

	"github.com/keygate/keygate/authz/wire"
)

// request is what the decision reads from a Check, whichever way it was
// decoded: from the wire by wire.Request on the served path, or from a
// generated CheckRequest when Server is called as a plain
// AuthorizationServer.
type request struct {
	id, method, path string
	requestID        string // the x-request-id header
	auth             string // the authorization header
	authCount        int    // more than one is ambiguous
}

func fromWire(r *wire.Request) request {
	return request{id: r.ID, method: r.Method, path: r.Path, requestID: r.RequestID,
		auth: r.Authorization, authCount: r.AuthorizationCount}
}

// settleID is the ID that the access log will name the request by:
// Envoy's stream ID, which is the x-request-id it generated or kept.
func (r *request) settleID() string {
	if r.id != "" {
		return r.id
	}
	return r.requestID
}

// fromProto reads the same fields as wire.Request.Decode: the headers map
// first, then Envoy's raw header_map.
func fromProto(h *authv3.AttributeContext_HttpRequest) request {
	r := request{id: h.GetId(), method: h.GetMethod(), path: h.GetPath()}
	if hs := h.GetHeaders(); len(hs) > 0 {
		r.requestID = hs["x-request-id"]
		if v, ok := hs["authorization"]; ok {
			r.auth, r.authCount = v, 1
			return r
		}
	}
	for _, hv := range h.GetHeaderMap().GetHeaders() {
		v := hv.GetValue()
		if raw := hv.GetRawValue(); len(raw) > 0 {
			v = string(raw)
		}
		switch {
		case strings.EqualFold(hv.GetKey(), "authorization"):
			r.auth = v
			r.authCount++
		case strings.EqualFold(hv.GetKey(), "x-request-id") && r.requestID == "":
			r.requestID = v
		}
	}
	return r
}

// bearer extracts the credential from an Authorization header value of the
// form "Bearer <token>". The scheme is case-insensitive (RFC 9110); the token
// must be a single non-empty word. It does not allocate, and reads each byte
// once: every Check starts here.
func bearer(v string) (string, bool) {
	const scheme = "bearer "
	if len(v) <= len(scheme) {
		return "", false
	}
	for i := 0; i < len(scheme)-1; i++ {
		if v[i]|0x20 != scheme[i] { // scheme is lower-case letters: only they fold onto them
			return "", false
		}
	}
	if v[len(scheme)-1] != ' ' {
		return "", false
	}
	tok := v[len(scheme):]
	i, j := 0, len(tok)
	for i < j && tok[i] == ' ' {
		i++
	}
	for j > i && (tok[j-1] == ' ' || tok[j-1] == '\t') {
		j--
	}
	if i == j {
		return "", false
	}
	tok = tok[i:j]
	for k := 0; k < len(tok); k++ {
		if c := tok[k]; c == ' ' || c == '\t' || c == ',' {
			return "", false
		}
	}
	return tok, true
}
