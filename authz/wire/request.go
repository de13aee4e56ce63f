// Package wire reads and writes the ext_authz messages on keygate's hot path
// without the generic protobuf machinery. A Check needs five strings out of a
// CheckRequest that carries every header of the HTTP request; decoding the
// whole message into maps and structs costs more than the decision itself,
// so Request reads just those fields straight off the wire.
package wire

import (
	"errors"
	"strings"
	"unsafe"

	"google.golang.org/protobuf/encoding/protowire"
)

// Field numbers on the path CheckRequest.attributes.request.http, from
// envoy/service/auth/v3/{external_auth,attribute_context}.proto and
// envoy/config/core/v3/base.proto.
const (
	fCheckAttributes = 1  // CheckRequest.attributes
	fAttrRequest     = 4  // AttributeContext.request
	fRequestHTTP     = 2  // AttributeContext.Request.http
	fHTTPID          = 1  // HttpRequest.id
	fHTTPMethod      = 2  // HttpRequest.method
	fHTTPHeaders     = 3  // HttpRequest.headers: map<string,string>
	fHTTPPath        = 4  // HttpRequest.path
	fHTTPHeaderMap   = 13 // HttpRequest.header_map
	fHeaderMapList   = 1  // HeaderMap.headers: repeated HeaderValue
	fEntryKey        = 1  // map entry key, HeaderValue.key
	fEntryValue      = 2  // map entry value, HeaderValue.value
	fHeaderRawValue  = 3  // HeaderValue.raw_value
)

// ErrMalformed is returned for bytes that are not a well-formed protobuf
// message along the fields Request reads.
var ErrMalformed = errors.New("malformed CheckRequest")

// Request is the part of a CheckRequest that keygate decides on.
type Request struct {
	ID     string // attributes.request.http.id
	Method string
	Path   string // with its query string

	// Authorization is the authorization header's value. AuthorizationCount
	// counts them: the headers map holds at most one; Envoy's raw header_map
	// may repeat a header, which is ambiguous and refused by the caller.
	Authorization      string
	AuthorizationCount int
	RequestID          string // the x-request-id header

	// Malformed is set by Codec when the bytes could not be decoded: the
	// Check is then answered with a denial rather than a gRPC error.
	Malformed bool

	buf []byte // backs the strings above
}

// Decode parses a serialized envoy.service.auth.v3.CheckRequest, skipping
// every field keygate does not use. It reads what proto.Unmarshal followed by
// the same getters would: for repeated singular fields the last wins, and the
// headers map is preferred over header_map, which Envoy fills only when
// told to send raw headers. The strings are copied, so b may be reused.
func (r *Request) Decode(b []byte) error {
	var (
		id, method, path       []byte
		mapAuth, mapReqID      []byte
		hasMapAuth, hasMapReq  bool
		rawAuth, rawReqID      []byte
		rawAuthN, rawReqIDSeen int
	)
	err := walk(b, func(n protowire.Number, v []byte) error {
		if n != fCheckAttributes {
			return nil
		}
		return walk(v, func(n protowire.Number, v []byte) error {
			if n != fAttrRequest {
				return nil
			}
			return walk(v, func(n protowire.Number, v []byte) error {
				if n != fRequestHTTP {
					return nil
				}
				return walk(v, func(n protowire.Number, v []byte) error {
					switch n {
					case fHTTPID:
						id = v
					case fHTTPMethod:
						method = v
					case fHTTPPath:
						path = v
					case fHTTPHeaders:
						k, val, _, err := entry(v)
						if err != nil {
							return err
						}
						switch string(k) { // no allocation: compared in place
						case "authorization":
							mapAuth, hasMapAuth = val, true
						case "x-request-id":
							mapReqID, hasMapReq = val, true
						}
					case fHTTPHeaderMap:
						return walk(v, func(n protowire.Number, v []byte) error {
							if n != fHeaderMapList {
								return nil
							}
							k, val, raw, err := entry(v)
							if err != nil {
								return err
							}
							if len(raw) > 0 {
								val = raw
							}
							switch {
							case equalFold(k, "authorization"):
								rawAuth = val
								rawAuthN++
							case equalFold(k, "x-request-id"):
								rawReqID = val
								rawReqIDSeen++
							}
							return nil
						})
					}
					return nil
				})
			})
		})
	})
	if err != nil {
		return err
	}
	auth, authN := rawAuth, rawAuthN
	if hasMapAuth {
		auth, authN = mapAuth, 1
	}
	reqID := rawReqID
	if hasMapReq {
		reqID = mapReqID
	}
	*r = Request{AuthorizationCount: authN}
	r.buf = make([]byte, 0, len(id)+len(method)+len(path)+len(auth)+len(reqID))
	r.ID = r.keep(id)
	r.Method = r.keep(method)
	r.Path = r.keep(path)
	r.Authorization = r.keep(auth)
	r.RequestID = r.keep(reqID)
	return nil
}

// keep copies v into r's buffer and returns it as a string. The buffer was
// sized for every value up front, so append never moves earlier strings.
func (r *Request) keep(v []byte) string {
	if len(v) == 0 {
		return ""
	}
	start := len(r.buf)
	r.buf = append(r.buf, v...)
	return unsafe.String(&r.buf[start], len(v))
}

// walk calls fn with each length-delimited field of the message b; fields of
// other wire types are skipped. Every length is checked against b.
func walk(b []byte, fn func(protowire.Number, []byte) error) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return ErrMalformed
		}
		b = b[n:]
		if typ != protowire.BytesType {
			m := protowire.ConsumeFieldValue(num, typ, b)
			if m < 0 {
				return ErrMalformed
			}
			b = b[m:]
			continue
		}
		v, m := protowire.ConsumeBytes(b)
		if m < 0 {
			return ErrMalformed
		}
		if err := fn(num, v); err != nil {
			return err
		}
		b = b[m:]
	}
	return nil
}

// entry reads a map entry {1: key, 2: value} or a HeaderValue {1: key,
// 2: value, 3: raw_value}.
func entry(b []byte) (key, value, raw []byte, err error) {
	err = walk(b, func(n protowire.Number, v []byte) error {
		switch n {
		case fEntryKey:
			key = v
		case fEntryValue:
			value = v
		case fHeaderRawValue:
			raw = v
		}
		return nil
	})
	return key, value, raw, err
}

func equalFold(b []byte, s string) bool {
	return len(b) == len(s) && strings.EqualFold(unsafe.String(unsafe.SliceData(b), len(b)), s)
}
