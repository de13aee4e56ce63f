package authz

import (
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
)

// header returns the value of the named header (name in lower case) from the
// Check's headers map or, when Envoy sends raw headers, from its header_map.
// ok is false when the header is absent or, in a header_map, repeated: two
// authorization headers are ambiguous and refused rather than guessed at.
func header(h *authv3.AttributeContext_HttpRequest, name string) (string, bool) {
	if v, ok := h.GetHeaders()[name]; ok {
		return v, true
	}
	var (
		val   string
		found bool
	)
	for _, hv := range h.GetHeaderMap().GetHeaders() {
		if !strings.EqualFold(hv.GetKey(), name) {
			continue
		}
		if found {
			return "", false
		}
		val, found = rawValue(hv), true
	}
	return val, found
}

func rawValue(hv *corev3.HeaderValue) string {
	if raw := hv.GetRawValue(); raw != nil {
		return string(raw)
	}
	return hv.GetValue()
}

// bearer extracts the credential from an Authorization header value of the
// form "Bearer <token>". The scheme is case-insensitive (RFC 9110); the token
// must be a single non-empty word. It does not allocate.
func bearer(v string) (string, bool) {
	const scheme = "bearer "
	if len(v) <= len(scheme) || !strings.EqualFold(v[:len(scheme)], scheme) {
		return "", false
	}
	tok := strings.TrimLeft(v[len(scheme):], " ")
	tok = strings.TrimRight(tok, " \t")
	if tok == "" || strings.ContainsAny(tok, " \t,") {
		return "", false
	}
	return tok, true
}
