package loadgen

import (
	"math/rand/v2"
	"regexp"
	"slices"
	"testing"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/genproto/googleapis/rpc/code"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/protobuf/proto"
)

var (
	uuidRE   = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)
	streamRE = regexp.MustCompile(`^[1-9][0-9]{18}$`)
)

func TestHoleLengths(t *testing.T) {
	if len(secretHole) != SecretLen || len(uuidHole) != 36 || len(streamHole) != 19 {
		t.Errorf("hole lengths %d %d %d, want %d 36 19", len(secretHole), len(uuidHole), len(streamHole), SecretLen)
	}
}

func fill(t *testing.T, tp Template, secret string, rnd *rand.Rand) *authv3.CheckRequest {
	t.Helper()
	var req authv3.CheckRequest
	if err := proto.Unmarshal(tp.Fill(nil, secret, rnd), &req); err != nil {
		t.Fatal(err)
	}
	return &req
}

func TestBuildAndFill(t *testing.T) {
	rnd := rand.New(rand.NewPCG(1, 1))
	secret := WellFormedSecret(rnd)
	for _, raw := range []bool{false, true} {
		tp, err := Build(Spec{Method: "POST", Path: "/v1/embeddings", Auth: "Bearer " + SecretSlot}, 7, raw)
		if err != nil {
			t.Fatal(err)
		}
		if !tp.HasSecret() {
			t.Fatal("no secret slot")
		}
		seen := map[string]bool{}
		for range 1000 {
			h := fill(t, tp, secret, rnd).GetAttributes().GetRequest().GetHttp()
			hdr := func(name string) string {
				if !raw {
					return h.GetHeaders()[name]
				}
				for _, hv := range h.GetHeaderMap().GetHeaders() {
					if hv.GetKey() == name {
						return string(hv.GetRawValue())
					}
				}
				return ""
			}
			rid := hdr("x-request-id")
			if !uuidRE.MatchString(rid) {
				t.Fatalf("x-request-id %q is not a UUIDv4", rid)
			}
			if seen[rid] {
				t.Fatalf("x-request-id %q repeated", rid)
			}
			seen[rid] = true
			if !streamRE.MatchString(h.GetId()) {
				t.Fatalf("http.id %q is not a 19-digit stream id", h.GetId())
			}
			if got := hdr("authorization"); got != "Bearer "+secret {
				t.Fatalf("authorization = %q", got)
			}
			if h.GetMethod() != "POST" || h.GetPath() != "/v1/embeddings" || hdr(":path") != "/v1/embeddings" ||
				hdr(":method") != "POST" || hdr("content-length") != "312" || h.GetSize() != 312 {
				t.Fatalf("request attributes wrong: %v", h)
			}
			if (len(h.GetHeaders()) > 0) == raw || (h.GetHeaderMap() != nil) != raw {
				t.Fatalf("raw=%v but headers map %d entries, header_map %v", raw, len(h.GetHeaders()), h.GetHeaderMap() != nil)
			}
		}
	}
}

func TestBuildWithoutAuth(t *testing.T) {
	tp, err := Build(Spec{Method: "GET", Path: "/"}, 0, false)
	if err != nil {
		t.Fatal(err)
	}
	if tp.HasSecret() {
		t.Error("secret slot without Auth")
	}
	h := fill(t, tp, "", rand.New(rand.NewPCG(1, 2))).GetAttributes().GetRequest().GetHttp()
	if _, ok := h.GetHeaders()["authorization"]; ok {
		t.Error("authorization header sent")
	}
}

func TestSecrets(t *testing.T) {
	rnd := rand.New(rand.NewPCG(9, 9))
	valid := regexp.MustCompile(`^kg_[0-9A-Za-z]{38}$`)
	for range 100 {
		if s := WellFormedSecret(rnd); !valid.MatchString(s) {
			t.Errorf("WellFormedSecret() = %q", s)
		}
		if s := RandomSecret(rnd); !valid.MatchString(s) {
			t.Errorf("RandomSecret() = %q", s)
		}
	}
}

func TestNewModeSource(t *testing.T) {
	rnd := rand.New(rand.NewPCG(2, 3))
	keys := []string{WellFormedSecret(rnd), WellFormedSecret(rnd)}
	for mode, status := range Modes {
		s, err := NewModeSource(mode, keys, keys, false, 1)
		if err != nil {
			t.Fatalf("%s: %v", mode, err)
		}
		for n := range uint64(200) {
			var req authv3.CheckRequest
			if err := proto.Unmarshal(s.Fill(nil, n, rnd), &req); err != nil {
				t.Fatalf("%s: %v", mode, err)
			}
			auth := req.GetAttributes().GetRequest().GetHttp().GetHeaders()["authorization"]
			usesKey := auth == "Bearer "+keys[0] || auth == "Bearer "+keys[1]
			if wantKey := status != 401; usesKey != wantKey {
				t.Fatalf("%s: authorization %q: uses a valid key = %v", mode, auth, usesKey)
			}
			path := req.GetAttributes().GetRequest().GetHttp().GetPath()
			isBad := slices.ContainsFunc(badPaths(), func(s Spec) bool { return s.Path == path })
			if isBad != (mode == ModeBadPath) {
				t.Fatalf("%s: path %q", mode, path)
			}
		}
	}
	if _, err := NewModeSource("nope", keys, keys, false, 1); err == nil {
		t.Error("unknown mode accepted")
	}
	if _, err := NewModeSource(ModeAllowed, nil, nil, false, 1); err == nil {
		t.Error("allowed mode without keys accepted")
	}
	if _, err := NewModeSource(ModeAllowed, []string{"short"}, nil, false, 1); err == nil {
		t.Error("secret of the wrong length accepted")
	}
}

func TestDecodeOutcome(t *testing.T) {
	tests := []struct {
		name string
		give *authv3.CheckResponse
		want Outcome
	}{
		{"ok response", &authv3.CheckResponse{
			Status:       &rpcstatus.Status{Code: int32(code.Code_OK)},
			HttpResponse: &authv3.CheckResponse_OkResponse{OkResponse: &authv3.OkHttpResponse{}},
		}, Outcome{Allowed: true, HTTPStatus: 200}},
		{"status only", &authv3.CheckResponse{}, Outcome{Allowed: true, HTTPStatus: 200}},
		{"denied 401", &authv3.CheckResponse{
			Status: &rpcstatus.Status{Code: int32(code.Code_UNAUTHENTICATED), Message: "Invalid API key"},
			HttpResponse: &authv3.CheckResponse_DeniedResponse{DeniedResponse: &authv3.DeniedHttpResponse{
				Status: &typev3.HttpStatus{Code: typev3.StatusCode_Unauthorized}, Body: `{"error":{}}`,
			}},
		}, Outcome{HTTPStatus: 401, Code: int32(code.Code_UNAUTHENTICATED)}},
		{"denied without status", &authv3.CheckResponse{
			Status:       &rpcstatus.Status{Code: int32(code.Code_PERMISSION_DENIED)},
			HttpResponse: &authv3.CheckResponse_DeniedResponse{DeniedResponse: &authv3.DeniedHttpResponse{}},
		}, Outcome{HTTPStatus: 403, Code: int32(code.Code_PERMISSION_DENIED)}},
		{"code only", &authv3.CheckResponse{Status: &rpcstatus.Status{Code: int32(code.Code_PERMISSION_DENIED)}},
			Outcome{HTTPStatus: 403, Code: int32(code.Code_PERMISSION_DENIED)}},
	}
	for _, tt := range tests {
		b, err := proto.Marshal(tt.give)
		if err != nil {
			t.Fatal(err)
		}
		got, err := DecodeOutcome(b)
		if err != nil {
			t.Errorf("%s: %v", tt.name, err)
			continue
		}
		if got != tt.want {
			t.Errorf("%s: got %+v, want %+v", tt.name, got, tt.want)
		}
	}
	if _, err := DecodeOutcome([]byte{0x0a, 0x05, 0x08}); err == nil {
		t.Error("truncated message decoded")
	}
}
