package wire

import (
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/protobuf/encoding/protowire"
)

// Field numbers of a CheckResponse, from
// envoy/service/auth/v3/external_auth.proto, envoy/type/v3/http_status.proto,
// google/rpc/status.proto and envoy/config/core/v3/base.proto.
// HeaderValue's key and value are fEntryKey and fEntryValue.
const (
	fCheckStatus        = 1 // CheckResponse.status
	fCheckDenied        = 2 // CheckResponse.denied_response
	fCheckOK            = 3 // CheckResponse.ok_response
	fStatusCode         = 1 // google.rpc.Status.code
	fStatusMessage      = 2 // google.rpc.Status.message
	fDeniedStatus       = 1 // DeniedHttpResponse.status
	fDeniedHeaders      = 2 // DeniedHttpResponse.headers
	fDeniedBody         = 3 // DeniedHttpResponse.body
	fHTTPStatusCode     = 1 // HttpStatus.code
	fOKHeaders          = 2 // OkHttpResponse.headers
	fOKHeadersToRemove  = 5 // OkHttpResponse.headers_to_remove
	fOKResponseHeaders  = 6 // OkHttpResponse.response_headers_to_add
	fOptionHeader       = 1 // HeaderValueOption.header
	fOptionAppendAction = 3 // HeaderValueOption.append_action

	overwriteIfExistsOrAdd = byte(corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD) // a one-byte varint
)

// Header is a header that a response sets, replacing any header of the
// same name (OVERWRITE_IF_EXISTS_OR_ADD).
type Header struct{ Key, Value string }

// OK is the OK CheckResponse keygate sends: headers set on the request that
// goes upstream, request headers removed from it, and headers added to the
// response that comes back. It is encoded straight from these strings:
// building the generated messages, sizing them and encoding them cost
// more than the whole decision.
type OK struct {
	Headers         []Header
	HeadersToRemove []string
	ResponseHeaders []Header
}

// Encode returns o encoded, for Codec to send: the bytes proto.Marshal
// writes for o.Proto(), built without it. o is only read.
func (o *OK) Encode() *Frozen {
	n := o.size()
	b := make([]byte, 0, bytesSize(n))
	b = appendLen(append(b, tagOf(fCheckOK, protowire.BytesType)), n)
	for _, h := range o.Headers {
		b = appendOption(b, fOKHeaders, h)
	}
	for _, name := range o.HeadersToRemove {
		b = appendString(b, fOKHeadersToRemove, name)
	}
	for _, h := range o.ResponseHeaders {
		b = appendOption(b, fOKResponseHeaders, h)
	}
	return frozen(b)
}

// Proto returns o as the generated message, for callers that are not
// served by Codec.
func (o *OK) Proto() *authv3.CheckResponse {
	ok := &authv3.OkHttpResponse{
		Headers:              options(o.Headers),
		HeadersToRemove:      o.HeadersToRemove,
		ResponseHeadersToAdd: options(o.ResponseHeaders),
	}
	return &authv3.CheckResponse{HttpResponse: &authv3.CheckResponse_OkResponse{OkResponse: ok}}
}

// size is the length of the encoded OkHttpResponse.
func (o *OK) size() int {
	n := 0
	for _, h := range o.Headers {
		n += bytesSize(optionSize(h))
	}
	for _, name := range o.HeadersToRemove {
		n += bytesSize(len(name))
	}
	for _, h := range o.ResponseHeaders {
		n += bytesSize(optionSize(h))
	}
	return n
}

// Denied is a denied CheckResponse: the gRPC status that Envoy's logs and
// stats see, and the HTTP response Envoy sends back in place of the
// upstream's.
type Denied struct {
	Code    int32  // google.rpc.Code
	Message string // of the gRPC status
	Status  int32  // the HTTP status
	Headers []Header
	Body    string
}

// Encode returns d encoded, for Codec to send: the bytes proto.Marshal
// writes for d.Proto(), built without it. d is only read.
func (d *Denied) Encode() *Frozen {
	st, resp := d.statusSize(), d.responseSize()
	b := make([]byte, 0, bytesSize(st)+bytesSize(resp))
	b = appendLen(append(b, tagOf(fCheckStatus, protowire.BytesType)), st)
	b = appendVarintField(b, fStatusCode, uint64(d.Code))
	if d.Message != "" {
		b = appendString(b, fStatusMessage, d.Message)
	}
	b = appendLen(append(b, tagOf(fCheckDenied, protowire.BytesType)), resp)
	b = appendLen(append(b, tagOf(fDeniedStatus, protowire.BytesType)), varintFieldSize(uint64(d.Status)))
	b = appendVarintField(b, fHTTPStatusCode, uint64(d.Status))
	for _, h := range d.Headers {
		b = appendOption(b, fDeniedHeaders, h)
	}
	if d.Body != "" {
		b = appendString(b, fDeniedBody, d.Body)
	}
	return frozen(b)
}

// Proto returns d as the generated message, for callers that are not
// served by Codec.
func (d *Denied) Proto() *authv3.CheckResponse {
	return &authv3.CheckResponse{
		Status: &rpcstatus.Status{Code: d.Code, Message: d.Message},
		HttpResponse: &authv3.CheckResponse_DeniedResponse{DeniedResponse: &authv3.DeniedHttpResponse{
			Status:  &typev3.HttpStatus{Code: typev3.StatusCode(d.Status)},
			Headers: options(d.Headers),
			Body:    d.Body,
		}},
	}
}

// statusSize is the length of the encoded google.rpc.Status.
func (d *Denied) statusSize() int {
	n := varintFieldSize(uint64(d.Code))
	if d.Message != "" {
		n += bytesSize(len(d.Message))
	}
	return n
}

// responseSize is the length of the encoded DeniedHttpResponse.
func (d *Denied) responseSize() int {
	n := bytesSize(varintFieldSize(uint64(d.Status)))
	for _, h := range d.Headers {
		n += bytesSize(optionSize(h))
	}
	if d.Body != "" {
		n += bytesSize(len(d.Body))
	}
	return n
}

func options(hs []Header) []*corev3.HeaderValueOption {
	if len(hs) == 0 {
		return nil
	}
	out := make([]*corev3.HeaderValueOption, len(hs))
	for i, h := range hs {
		out[i] = &corev3.HeaderValueOption{
			Header:       &corev3.HeaderValue{Key: h.Key, Value: h.Value},
			AppendAction: corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD,
		}
	}
	return out
}

// Proto3 leaves out a string that is empty, and so do valueSize and
// appendOption, so that the bytes are the generated encoder's.

func valueSize(h Header) int {
	n := 0
	if h.Key != "" {
		n += bytesSize(len(h.Key))
	}
	if h.Value != "" {
		n += bytesSize(len(h.Value))
	}
	return n
}

// optionSize is the length of h encoded as a HeaderValueOption: its
// HeaderValue, and an append_action of one byte.
func optionSize(h Header) int { return bytesSize(valueSize(h)) + 2 }

// appendOption appends h as a HeaderValueOption in field num.
func appendOption(b []byte, num protowire.Number, h Header) []byte {
	b = appendLen(append(b, tagOf(num, protowire.BytesType)), optionSize(h))
	b = appendLen(append(b, tagOf(fOptionHeader, protowire.BytesType)), valueSize(h))
	if h.Key != "" {
		b = appendString(b, fEntryKey, h.Key)
	}
	if h.Value != "" {
		b = appendString(b, fEntryValue, h.Value)
	}
	return append(b, tagOf(fOptionAppendAction, protowire.VarintType), overwriteIfExistsOrAdd)
}

// The helpers below are protowire's, narrowed to what an OK holds so that
// they inline: every field number is below 16, so every tag is one byte,
// and a length is one byte below 128.

func tagOf(num protowire.Number, typ protowire.Type) byte { return byte(num)<<3 | byte(typ) }

// bytesSize is the encoded size of a length-delimited field of n bytes.
func bytesSize(n int) int { return 1 + sizeLen(n) + n }

func sizeLen(n int) int {
	if n < 0x80 {
		return 1
	}
	return protowire.SizeVarint(uint64(n))
}

func appendLen(b []byte, n int) []byte {
	if n < 0x80 {
		return append(b, byte(n))
	}
	return protowire.AppendVarint(b, uint64(n))
}

// varintFieldSize is the encoded size of a varint field of value v, which
// proto3 leaves out when it is 0. A negative int32 is sign-extended to
// 64 bits first, as protobuf encodes it.
func varintFieldSize(v uint64) int {
	if v == 0 {
		return 0
	}
	return 1 + protowire.SizeVarint(v)
}

func appendVarintField(b []byte, num protowire.Number, v uint64) []byte {
	if v == 0 {
		return b
	}
	return protowire.AppendVarint(append(b, tagOf(num, protowire.VarintType)), v)
}

// appendString appends s as field num.
func appendString(b []byte, num protowire.Number, s string) []byte {
	return append(appendLen(append(b, tagOf(num, protowire.BytesType)), len(s)), s...)
}
