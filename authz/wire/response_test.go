package wire

import (
	"bytes"
	"strings"
	"testing"
	"unicode/utf8"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/protobuf/proto"
)

func okSeeds() []OK {
	long := strings.Repeat("v", 200) // lengths of two varint bytes
	return []OK{
		{},
		{HeadersToRemove: []string{"authorization"}},
		{
			Headers:         []Header{{"x-keygate-key-id", "key_01"}, {"x-keygate-account", "acct-1"}},
			HeadersToRemove: []string{"authorization"},
			ResponseHeaders: []Header{{"x-ratelimit-limit-requests", "60"}, {"x-ratelimit-remaining-requests", "0"}, {"x-ratelimit-reset-requests", "1s"}},
		},
		{
			Headers:         []Header{{"x-long", long}, {"x-empty", ""}, {"", "no name"}},
			HeadersToRemove: []string{"", "a", long},
			ResponseHeaders: []Header{{long, long}},
		},
	}
}

// checkEncode fails unless f, a response's Encode, writes the bytes the
// generated encoder writes for want, its Proto, and they decode back to it.
func checkEncode(t *testing.T, f *Frozen, want *authv3.CheckResponse) {
	t.Helper()
	wantBytes, err := proto.MarshalOptions{Deterministic: true}.Marshal(want)
	if err != nil {
		t.Fatalf("generated encoder: %v", err)
	}
	got := f.b
	if !bytes.Equal(got, wantBytes) {
		t.Fatalf("Encode of %v\n = %x\nthe generated encoder writes\n   %x", want, got, wantBytes)
	}
	if cap(got) != len(got) {
		t.Errorf("Encode sized its buffer %d for %d bytes", cap(got), len(got))
	}
	var back authv3.CheckResponse
	if err := proto.Unmarshal(got, &back); err != nil {
		t.Fatalf("decoding Encode's bytes: %v", err)
	}
	if !proto.Equal(&back, want) {
		t.Fatalf("Encode's bytes decode to %v, want %v", &back, want)
	}
}

func checkOK(t *testing.T, o OK) {
	t.Helper()
	checkEncode(t, o.Encode(), o.Proto())
	if o.Proto().GetOkResponse() == nil {
		t.Fatalf("%+v is not an OK response", o)
	}
}

func checkDenied(t *testing.T, d Denied) {
	t.Helper()
	checkEncode(t, d.Encode(), d.Proto())
	if d.Proto().GetDeniedResponse() == nil {
		t.Fatalf("%+v is not a denied response", d)
	}
}

func TestOKEncodeMatchesGenerated(t *testing.T) {
	for _, o := range okSeeds() {
		checkOK(t, o)
	}
}

func TestOKEncodeAllocs(t *testing.T) {
	o := okSeeds()[2]
	if n := testing.AllocsPerRun(100, func() { o.Encode() }); n > 2 {
		t.Errorf("Encode allocates %v times, want 2 (the bytes and their Frozen)", n)
	}
	f := o.Encode()
	if n := testing.AllocsPerRun(100, func() { Codec{}.Marshal(f) }); n > 0 {
		t.Errorf("sending a Frozen allocates %v times, want none", n)
	}
	out, _ := Codec{}.Marshal(f)
	if !bytes.Equal(out.Materialize(), f.b) {
		t.Errorf("Codec sends %x for a Frozen of %x", out.Materialize(), f.b)
	}
}

// FuzzOKEncode builds a response of up to three headers each way from the
// fuzzer's strings: UTF-8 ones, as proto3 strings are and as keygate's key
// IDs, account names and numbers are.
func FuzzOKEncode(f *testing.F) {
	for _, o := range okSeeds() {
		var k, v, r string
		if len(o.Headers) > 0 {
			k, v = o.Headers[0].Key, o.Headers[0].Value
		}
		if len(o.HeadersToRemove) > 0 {
			r = o.HeadersToRemove[0]
		}
		f.Add(k, v, r, uint8(len(o.Headers)|len(o.HeadersToRemove)<<2|len(o.ResponseHeaders)<<4))
	}
	f.Fuzz(func(t *testing.T, k, v, r string, shape uint8) {
		if !utf8.ValidString(k) || !utf8.ValidString(v) || !utf8.ValidString(r) {
			t.Skip("proto3 strings are UTF-8")
		}
		hs := []Header{{k, v}, {v, r}, {r, k}}
		rs := []string{r, k, v}
		checkOK(t, OK{
			Headers:         hs[:shape&3], // two bits each way: 0 to 3
			HeadersToRemove: rs[:shape>>2&3],
			ResponseHeaders: hs[:shape>>4&3],
		})
	})
}

func deniedSeeds() []Denied {
	long := strings.Repeat("é", 100) // 200 bytes: lengths of two varint bytes
	return []Denied{
		{},
		{Code: 16, Message: "Invalid API key", Status: 401,
			Headers: []Header{{"content-type", "application/json"}, {"www-authenticate", "Bearer"}},
			Body:    `{"error":{"type":"authentication_error","message":"Invalid API key"}}`},
		{Code: 7, Message: "Rate limit of 60/m exceeded", Status: 429,
			Headers: []Header{{"content-type", "application/json"}, {"retry-after", "1"}, {"x-ratelimit-remaining-requests", "0"}}},
		{Code: 14, Message: long, Status: 503, Headers: []Header{{long, ""}}, Body: long},
		{Code: -1, Status: -1}, // out of range, yet encoded as protobuf does
	}
}

func TestDeniedEncodeMatchesGenerated(t *testing.T) {
	for _, d := range deniedSeeds() {
		checkDenied(t, d)
	}
}

// FuzzDeniedEncode builds a denial from the fuzzer's codes and strings,
// with up to three headers.
func FuzzDeniedEncode(f *testing.F) {
	for _, d := range deniedSeeds() {
		var k string
		if len(d.Headers) > 0 {
			k = d.Headers[0].Key
		}
		f.Add(d.Code, d.Status, d.Message, k, d.Body, uint8(len(d.Headers)))
	}
	f.Fuzz(func(t *testing.T, code, status int32, msg, k, body string, n uint8) {
		if !utf8.ValidString(msg) || !utf8.ValidString(k) || !utf8.ValidString(body) {
			t.Skip("proto3 strings are UTF-8")
		}
		hs := []Header{{k, body}, {msg, k}, {body, msg}}
		checkDenied(t, Denied{Code: code, Message: msg, Status: status, Headers: hs[:n%4], Body: body})
	})
}
