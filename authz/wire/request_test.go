package wire

import (
	"strings"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

func httpReq(h *authv3.AttributeContext_HttpRequest) *authv3.CheckRequest {
	return &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Source:            &authv3.AttributeContext_Peer{Principal: "spiffe://x"},
		Request:           &authv3.AttributeContext_Request{Time: timestamppb.Now(), Http: h},
		ContextExtensions: map[string]string{"authorization": "not a header"},
	}}
}

func seeds() []*authv3.CheckRequest {
	return []*authv3.CheckRequest{
		{},
		{Attributes: &authv3.AttributeContext{}},
		httpReq(&authv3.AttributeContext_HttpRequest{
			Id: "r-1", Method: "POST", Path: "/v1/chat/completions?stream=true", Host: "api",
			Headers: map[string]string{"authorization": "Bearer kg_x", "x-request-id": "r-1", ":path": "/v1/chat/completions", "user-agent": "x"},
		}),
		httpReq(&authv3.AttributeContext_HttpRequest{
			Method: "GET", Path: "/v1/x",
			HeaderMap: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{
				{Key: ":path", RawValue: []byte("/v1/x")},
				{Key: "Authorization", RawValue: []byte("Bearer \xff\xfekg_raw")},
				{Key: "x-request-id", Value: "r-2"},
			}},
		}),
		httpReq(&authv3.AttributeContext_HttpRequest{
			Method: "GET", Path: "/v1/x",
			HeaderMap: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{
				{Key: "authorization", RawValue: []byte("Bearer a")},
				{Key: "authorization", Value: "Bearer b"},
			}},
		}),
		httpReq(&authv3.AttributeContext_HttpRequest{
			Method: "GET", Path: "/v1/x",
			Headers:   map[string]string{"authorization": "Bearer map"},
			HeaderMap: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{{Key: "authorization", Value: "Bearer raw"}}},
		}),
	}
}

// reference reads the fields through the generated code, as the generic
// path does.
func reference(m *authv3.CheckRequest) Request {
	h := m.GetAttributes().GetRequest().GetHttp()
	r := Request{ID: h.GetId(), Method: h.GetMethod(), Path: h.GetPath()}
	if v, ok := h.GetHeaders()["authorization"]; ok {
		r.Authorization, r.AuthorizationCount = v, 1
	} else {
		for _, hv := range h.GetHeaderMap().GetHeaders() {
			if strings.EqualFold(hv.GetKey(), "authorization") {
				r.Authorization = hv.GetValue()
				if len(hv.GetRawValue()) > 0 {
					r.Authorization = string(hv.GetRawValue())
				}
				r.AuthorizationCount++
			}
		}
	}
	if v, ok := h.GetHeaders()["x-request-id"]; ok {
		r.RequestID = v
	} else {
		for _, hv := range h.GetHeaderMap().GetHeaders() {
			if strings.EqualFold(hv.GetKey(), "x-request-id") {
				r.RequestID = hv.GetValue()
				if len(hv.GetRawValue()) > 0 {
					r.RequestID = string(hv.GetRawValue())
				}
			}
		}
	}
	return r
}

func same(a, b Request) bool {
	return a.ID == b.ID && a.Method == b.Method && a.Path == b.Path && a.Authorization == b.Authorization &&
		a.AuthorizationCount == b.AuthorizationCount && a.RequestID == b.RequestID
}

func TestDecodeMatchesGenerated(t *testing.T) {
	for i, m := range seeds() {
		b, err := proto.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		var got Request
		if err := got.Decode(b); err != nil {
			t.Fatalf("seed %d: %v", i, err)
		}
		if want := reference(m); !same(got, want) {
			t.Errorf("seed %d: Decode = %+v, generated code reads %+v", i, got, want)
		}
	}
}

func TestDecodeCopies(t *testing.T) {
	b, _ := proto.Marshal(seeds()[2])
	var r Request
	if err := r.Decode(b); err != nil {
		t.Fatal(err)
	}
	for i := range b {
		b[i] = 'X'
	}
	if r.Authorization != "Bearer kg_x" || r.Path != "/v1/chat/completions?stream=true" {
		t.Fatalf("strings changed with the frame: %+v", r)
	}
}

func TestDecodeMalformed(t *testing.T) {
	good, _ := proto.Marshal(seeds()[2])
	for _, b := range [][]byte{
		{0x0a},             // attributes: length missing
		{0x0a, 0x05, 0x22}, // length past the end
		good[:len(good)-3], // truncated
		{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01}, // overlong tag
	} {
		var r Request
		if err := r.Decode(b); err == nil {
			t.Errorf("Decode(%x) accepted a malformed message: %+v", b, r)
		}
	}
}

// FuzzDecode: whenever the generated code accepts a message, Decode reads
// the same fields from it; Decode never panics.
func FuzzDecode(f *testing.F) {
	for _, m := range seeds() {
		b, _ := proto.Marshal(m)
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		var got Request
		err := got.Decode(b)
		var m authv3.CheckRequest
		if proto.Unmarshal(b, &m) != nil {
			return // invalid UTF-8 or wire types the generic code refuses; Decode may be laxer
		}
		if err != nil {
			t.Fatalf("Decode refused what proto.Unmarshal accepts: %v", err)
		}
		if want := reference(&m); !same(got, want) {
			t.Fatalf("Decode = %+v, generated code reads %+v", got, want)
		}
	})
}

func TestCodecRoundTrip(t *testing.T) {
	resp := &authv3.CheckResponse{HttpResponse: &authv3.CheckResponse_OkResponse{OkResponse: &authv3.OkHttpResponse{
		HeadersToRemove: []string{"authorization"},
		Headers:         []*corev3.HeaderValueOption{{Header: &corev3.HeaderValue{Key: "x-keygate-key-id", Value: "key_1"}}},
	}}}
	out, err := Codec{}.Marshal(resp)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Free()
	var back authv3.CheckResponse
	if err := (Codec{}).Unmarshal(out, &back); err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(resp, &back) {
		t.Fatalf("round trip: %v != %v", &back, resp)
	}
	in, _ := proto.Marshal(seeds()[2])
	var r Request
	if err := (Codec{}).Unmarshal(mem.BufferSlice{mem.SliceBuffer(in)}, &r); err != nil || r.Method != "POST" || r.Malformed {
		t.Fatalf("Unmarshal into *Request: %v %+v", err, r)
	}
	var bad Request
	if err := (Codec{}).Unmarshal(mem.BufferSlice{mem.SliceBuffer([]byte{0x0a, 0x05})}, &bad); err != nil || !bad.Malformed {
		t.Fatalf("Unmarshal of garbage into *Request: err %v, Malformed %v; want nil and true", err, bad.Malformed)
	}
}

func BenchmarkDecode(b *testing.B) {
	frame, _ := proto.Marshal(seeds()[2])
	b.Run("wire", func(b *testing.B) {
		b.ReportAllocs()
		for i := 0; i < b.N; i++ {
			var r Request
			if err := r.Decode(frame); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("generated", func(b *testing.B) {
		b.ReportAllocs()
		for i := 0; i < b.N; i++ {
			var m authv3.CheckRequest
			if err := proto.Unmarshal(frame, &m); err != nil {
				b.Fatal(err)
			}
		}
	})
}
