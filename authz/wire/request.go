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
	var f found
	if err := f.checkRequest(b); err != nil {
		return err
	}
	auth, authN := f.rawAuth, f.rawAuthN
	if f.hasMapAuth {
		auth, authN = f.mapAuth, 1
	}
	reqID := f.rawReqID
	if f.hasMapReq {
		reqID = f.mapReqID
	}
	*r = Request{AuthorizationCount: authN}
	r.buf = make([]byte, 0, len(f.id)+len(f.method)+len(f.path)+len(auth)+len(reqID))
	r.ID = r.keep(f.id)
	r.Method = r.keep(f.method)
	r.Path = r.keep(f.path)
	r.Authorization = r.keep(auth)
	r.RequestID = r.keep(reqID)
	return nil
}

// found is what Decode has read so far: views into the message's bytes.
// Each level of the path CheckRequest.attributes.request.http is its own
// loop over the fields of that message (see field), with no callbacks: a
// Check decodes a dozen headers, and this is the first thing it does.
type found struct {
	id, method, path      []byte
	mapAuth, mapReqID     []byte
	hasMapAuth, hasMapReq bool
	rawAuth, rawReqID     []byte
	rawAuthN              int
}

func (f *found) checkRequest(b []byte) error {
	for len(b) > 0 {
		num, v, isBytes, n := field(b)
		if n < 0 {
			return ErrMalformed
		}
		b = b[n:]
		if isBytes && num == fCheckAttributes {
			if err := f.attributes(v); err != nil {
				return err
			}
		}
	}
	return nil
}

func (f *found) attributes(b []byte) error {
	for len(b) > 0 {
		num, v, isBytes, n := field(b)
		if n < 0 {
			return ErrMalformed
		}
		b = b[n:]
		if isBytes && num == fAttrRequest {
			if err := f.request(v); err != nil {
				return err
			}
		}
	}
	return nil
}

func (f *found) request(b []byte) error {
	for len(b) > 0 {
		num, v, isBytes, n := field(b)
		if n < 0 {
			return ErrMalformed
		}
		b = b[n:]
		if isBytes && num == fRequestHTTP {
			if err := f.http(v); err != nil {
				return err
			}
		}
	}
	return nil
}

func (f *found) http(b []byte) error {
	for len(b) > 0 {
		num, v, isBytes, n := field(b)
		if n < 0 {
			return ErrMalformed
		}
		b = b[n:]
		if !isBytes {
			continue
		}
		switch num {
		case fHTTPID:
			f.id = v
		case fHTTPMethod:
			f.method = v
		case fHTTPPath:
			f.path = v
		case fHTTPHeaders:
			k, val, _, err := entry(v)
			if err != nil {
				return err
			}
			switch string(k) { // no allocation: compared in place
			case "authorization":
				f.mapAuth, f.hasMapAuth = val, true
			case "x-request-id":
				f.mapReqID, f.hasMapReq = val, true
			}
		case fHTTPHeaderMap:
			if err := f.headerMap(v); err != nil {
				return err
			}
		}
	}
	return nil
}

func (f *found) headerMap(b []byte) error {
	for len(b) > 0 {
		num, v, isBytes, n := field(b)
		if n < 0 {
			return ErrMalformed
		}
		b = b[n:]
		if !isBytes || num != fHeaderMapList {
			continue
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
			f.rawAuth = val
			f.rawAuthN++
		case equalFold(k, "x-request-id"):
			f.rawReqID = val
		}
	}
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

// field reads the field at the start of b: its number, its value if it is
// length-delimited (isBytes; fields of other wire types are skipped), and
// how many bytes it takes, or n < 0 if it is malformed. Every length is
// checked against b.
func field(b []byte) (num protowire.Number, v []byte, isBytes bool, n int) {
	// The common case first: a length-delimited field whose number and
	// length take one byte each (every header shorter than 128 bytes).
	if len(b) >= 2 && b[0] < 0x80 && b[0]&7 == byte(protowire.BytesType) && b[0] >= 8 && b[1] < 0x80 {
		if end := 2 + int(b[1]); end <= len(b) {
			return protowire.Number(b[0] >> 3), b[2:end], true, end
		}
		return 0, nil, false, -1
	}
	num, typ, n := protowire.ConsumeTag(b)
	if n < 0 {
		return 0, nil, false, -1
	}
	if typ != protowire.BytesType {
		m := protowire.ConsumeFieldValue(num, typ, b[n:])
		if m < 0 {
			return 0, nil, false, -1
		}
		return num, nil, false, n + m
	}
	v, m := protowire.ConsumeBytes(b[n:])
	if m < 0 {
		return 0, nil, false, -1
	}
	return num, v, true, n + m
}

// entry reads a map entry {1: key, 2: value} or a HeaderValue {1: key,
// 2: value, 3: raw_value}.
func entry(b []byte) (key, value, raw []byte, err error) {
	for len(b) > 0 {
		num, v, isBytes, n := field(b)
		if n < 0 {
			return nil, nil, nil, ErrMalformed
		}
		b = b[n:]
		if !isBytes {
			continue
		}
		switch num {
		case fEntryKey:
			key = v
		case fEntryValue:
			value = v
		case fHeaderRawValue:
			raw = v
		}
	}
	return key, value, raw, nil
}

func equalFold(b []byte, s string) bool {
	return len(b) == len(s) && strings.EqualFold(unsafe.String(unsafe.SliceData(b), len(b)), s)
}
