package loadgen

import (
	"bytes"
	"errors"
	"fmt"
	"hash/crc32"
	"math/rand/v2"
	"strconv"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Placeholders marshaled into a Template and overwritten per request. Each
// has the length of what replaces it and cannot occur elsewhere in a message.
const (
	uuidHole   = "________-____-____-____-____________" // x-request-id: a UUIDv4
	streamHole = "~~~~~~~~~~~~~~~~~~~"                  // http.id: Envoy's stream id, 19 digits
	secretHole = "kg_######################################"
	// SecretLen is the length of a keygate secret: "kg_", 32 random
	// base62 characters and a 6-character checksum.
	SecretLen = 41
)

var errHole = errors.New("placeholder not found exactly once")

// A Spec describes one request as a client sends it through Envoy.
type Spec struct {
	Method, Path string
	// Auth is the authorization header's value; "" sends none. The text
	// "Bearer " + SecretSlot makes the secret a per-request slot.
	Auth string
}

// SecretSlot, in Spec.Auth, is replaced per request by a secret of
// SecretLen characters from the Source's secrets.
const SecretSlot = secretHole

// A Template is one encoded CheckRequest with holes for the per-request
// parts: a fresh x-request-id and stream id, and maybe the secret. Filling
// one is a copy and a few byte writes: a generator that marshaled a
// CheckRequest per call would spend its core on that instead of on load.
type Template struct {
	msg      []byte
	uuidAt   int
	streamAt int
	secretAt int // -1: no secret slot
}

// Build encodes spec the way Envoy's ext_authz filter does with its defaults:
// every request header in the headers map (pseudo-headers included), the
// peer addresses, the time, and the HTTP attributes. raw selects Envoy's
// encode_raw_headers form (header_map) instead of the headers map. client
// numbers the downstream peer so that requests come from many addresses.
func Build(spec Spec, client int, raw bool) (Template, error) {
	const host = "api.example.com"
	peer := fmt.Sprintf("192.0.2.%d", 1+client%254) // TEST-NET-1: data only, never dialed
	hdrs := [][2]string{
		{":authority", host},
		{":method", spec.Method},
		{":path", spec.Path},
		{":scheme", "https"},
		{"accept", "application/json"},
		{"accept-encoding", "gzip, deflate"},
		{"user-agent", "OpenAI/Python 1.54.4"},
		{"x-stainless-lang", "python"},
		{"x-stainless-package-version", "1.54.4"},
		{"x-stainless-os", "Linux"},
		{"x-stainless-arch", "x64"},
		{"x-stainless-runtime", "CPython"},
		{"x-stainless-runtime-version", "3.12.7"},
		{"x-stainless-retry-count", "0"},
		{"x-forwarded-for", peer},
		{"x-forwarded-proto", "https"},
		{"x-envoy-external-address", peer},
		{"x-request-id", uuidHole},
	}
	size := int64(0)
	if spec.Method == "POST" {
		size = 312
		hdrs = append(hdrs, [2]string{"content-type", "application/json"}, [2]string{"content-length", strconv.FormatInt(size, 10)})
	}
	if spec.Auth != "" {
		hdrs = append(hdrs, [2]string{"authorization", spec.Auth})
	}
	http := &authv3.AttributeContext_HttpRequest{
		Id:       streamHole,
		Method:   spec.Method,
		Path:     spec.Path,
		Host:     host,
		Scheme:   "https",
		Protocol: "HTTP/1.1",
		Size:     size,
	}
	if raw {
		hm := &corev3.HeaderMap{}
		for _, h := range hdrs {
			hm.Headers = append(hm.Headers, &corev3.HeaderValue{Key: h[0], RawValue: []byte(h[1])})
		}
		http.HeaderMap = hm
	} else {
		http.Headers = make(map[string]string, len(hdrs))
		for _, h := range hdrs {
			http.Headers[h[0]] = h[1]
		}
	}
	req := &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Source: &authv3.AttributeContext_Peer{Address: sockAddr(peer, uint32(30000+client%30000))},
		Destination: &authv3.AttributeContext_Peer{
			Address: sockAddr("192.0.2.200", 8443),
		},
		Request: &authv3.AttributeContext_Request{
			Time: timestamppb.Now(),
			Http: http,
		},
	}}
	msg, err := proto.Marshal(req)
	if err != nil {
		return Template{}, err
	}
	t := Template{msg: msg, secretAt: -1}
	if t.uuidAt, err = hole(msg, uuidHole); err != nil {
		return Template{}, err
	}
	if t.streamAt, err = hole(msg, streamHole); err != nil {
		return Template{}, err
	}
	if bytes.Contains(msg, []byte(secretHole)) {
		if t.secretAt, err = hole(msg, secretHole); err != nil {
			return Template{}, err
		}
	}
	return t, nil
}

func sockAddr(ip string, port uint32) *corev3.Address {
	return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
		Address: ip, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port},
	}}}
}

func hole(msg []byte, h string) (int, error) {
	if bytes.Count(msg, []byte(h)) != 1 {
		return 0, fmt.Errorf("%w: %q", errHole, h)
	}
	return bytes.Index(msg, []byte(h)), nil
}

// Fill appends the template to dst with a fresh x-request-id and stream id
// drawn from rnd and, if it has a secret slot, secret (SecretLen bytes).
func (t *Template) Fill(dst []byte, secret string, rnd *rand.Rand) []byte {
	start := len(dst)
	dst = append(dst, t.msg...)
	m := dst[start:]
	putUUID(m[t.uuidAt:t.uuidAt+len(uuidHole)], rnd.Uint64(), rnd.Uint64())
	// A stream id of 19 digits: 10^18 ≤ id < 10^19.
	id := 1_000_000_000_000_000_000 + rnd.Uint64N(9_000_000_000_000_000_000)
	strconv.AppendUint(m[t.streamAt:t.streamAt], id, 10)
	if t.secretAt >= 0 {
		copy(m[t.secretAt:t.secretAt+SecretLen], secret)
	}
	return dst
}

// HasSecret reports whether the template has a secret slot.
func (t *Template) HasSecret() bool { return t.secretAt >= 0 }

// Len is the length of a filled template.
func (t *Template) Len() int { return len(t.msg) }

// putUUID writes a version 4 UUID made of hi and lo into b (36 bytes).
func putUUID(b []byte, hi, lo uint64) {
	const hexd = "0123456789abcdef"
	hi = hi&^(0xf<<12) | 0x4<<12 // version 4
	lo = lo&^(0x3<<62) | 0x2<<62 // RFC 4122 variant
	j := 0
	for i := 0; i < 32; i++ {
		if j == 8 || j == 13 || j == 18 || j == 23 {
			b[j] = '-'
			j++
		}
		var nib uint64
		if i < 16 {
			nib = hi >> (60 - 4*i) & 0xf
		} else {
			nib = lo >> (60 - 4*(i-16)) & 0xf
		}
		b[j] = hexd[nib]
		j++
	}
}

const base62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

// WellFormedSecret returns a secret that keygate's format check accepts (the
// right prefix, length, alphabet and checksum) but that no store holds: what
// an attacker who knows the format sends, so that every one of them costs a
// hash and an index probe rather than a checksum.
func WellFormedSecret(rnd *rand.Rand) string {
	b := make([]byte, 0, SecretLen)
	b = append(b, "kg_"...)
	for range 32 {
		b = append(b, base62[rnd.IntN(62)])
	}
	sum := crc32.ChecksumIEEE(b[3:])
	var tail [6]byte
	for i := 5; i >= 0; i-- {
		tail[i] = base62[sum%62]
		sum /= 62
	}
	return string(append(b, tail[:]...))
}

// RandomSecret returns "kg_" and 38 random base62 characters: the right
// shape, but (with probability 1 - 2^-32) a wrong checksum.
func RandomSecret(rnd *rand.Rand) string {
	b := []byte("kg_")
	for range 38 {
		b = append(b, base62[rnd.IntN(62)])
	}
	return string(b)
}

// Outcome is what a CheckResponse decided.
type Outcome struct {
	Allowed bool
	// HTTPStatus is 200 when allowed, else the denial's status (403 when
	// the denial names none, as Envoy does).
	HTTPStatus int
	Code       int32 // google.rpc.Code of the response's status
}

var errDecode = errors.New("malformed CheckResponse")

// DecodeOutcome reads the decision out of an encoded CheckResponse without
// unmarshaling it: the status code, and which of denied_response (2) or
// ok_response (3) is set.
func DecodeOutcome(b []byte) (Outcome, error) {
	var (
		o                 Outcome
		denied, ok        bool
		deniedStatus      int
		deniedStatusGiven bool
	)
	err := fields(b, func(num protowire.Number, v []byte, x uint64) error {
		switch num {
		case 1: // status: google.rpc.Status
			return fields(v, func(num protowire.Number, _ []byte, x uint64) error {
				if num == 1 {
					o.Code = int32(x)
				}
				return nil
			})
		case 2: // denied_response
			denied = true
			return fields(v, func(num protowire.Number, v []byte, _ uint64) error {
				if num != 1 { // status: envoy.type.v3.HttpStatus
					return nil
				}
				return fields(v, func(num protowire.Number, _ []byte, x uint64) error {
					if num == 1 {
						deniedStatus, deniedStatusGiven = int(x), true
					}
					return nil
				})
			})
		case 3: // ok_response
			ok = true
		}
		return nil
	})
	if err != nil {
		return Outcome{}, err
	}
	switch {
	case ok || (!denied && o.Code == 0):
		o.Allowed, o.HTTPStatus = true, 200
	case deniedStatusGiven && deniedStatus != 0:
		o.HTTPStatus = deniedStatus
	default:
		o.HTTPStatus = 403
	}
	return o, nil
}

// fields calls fn for every field of the message b: v for length-delimited
// fields, x for varints; other wire types are skipped.
func fields(b []byte, fn func(num protowire.Number, v []byte, x uint64) error) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return errDecode
		}
		b = b[n:]
		var (
			v []byte
			x uint64
		)
		switch typ {
		case protowire.BytesType:
			v, n = protowire.ConsumeBytes(b)
		case protowire.VarintType:
			x, n = protowire.ConsumeVarint(b)
		default:
			n = protowire.ConsumeFieldValue(num, typ, b)
		}
		if n < 0 {
			return errDecode
		}
		b = b[n:]
		if typ == protowire.BytesType || typ == protowire.VarintType {
			if err := fn(num, v, x); err != nil {
				return err
			}
		}
	}
	return nil
}
