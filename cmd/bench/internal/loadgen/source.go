package loadgen

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
)

// Modes of a Source: which traffic a phase sends.
const (
	ModeAllowed     = "allowed"     // valid keys over a mix of routes: all allowed
	ModePriced      = "priced"      // valid keys on priced routes only: every call debits
	ModeUnknown     = "unknown"     // well-formed keys no store holds: 401
	ModeGarbage     = "garbage"     // malformed or missing credentials: 401
	ModeRateLimited = "ratelimited" // keys whose bucket is empty: 429
	ModeBadPath     = "badpath"     // valid keys, paths that try to escape the route table: 400
)

// Modes lists every mode with the HTTP status all of its requests should get
// from keygate (a no-op server allows everything).
var Modes = map[string]int{
	ModeAllowed: 200, ModePriced: 200, ModeUnknown: 401, ModeGarbage: 401, ModeRateLimited: 429, ModeBadPath: 400,
}

var errSource = errors.New("bad source")

// A Source hands out the requests of a phase: request n is template n mod T
// with secret n mod S. With T dividing S each key keeps to the same route,
// as a real client keeps to the endpoint it uses.
type Source struct {
	templates []Template
	secrets   []string
	maxLen    int
}

// NewSource checks that every secret fits a template's slot.
func NewSource(templates []Template, secrets []string) (*Source, error) {
	if len(templates) == 0 {
		return nil, fmt.Errorf("%w: no templates", errSource)
	}
	s := &Source{templates: templates, secrets: secrets}
	slot := false
	for i := range templates {
		s.maxLen = max(s.maxLen, templates[i].Len())
		slot = slot || templates[i].HasSecret()
	}
	if slot && len(secrets) == 0 {
		return nil, fmt.Errorf("%w: templates have a secret slot but there are no secrets", errSource)
	}
	for _, sec := range secrets {
		if len(sec) != SecretLen {
			return nil, fmt.Errorf("%w: secret of %d characters, want %d", errSource, len(sec), SecretLen)
		}
	}
	return s, nil
}

// MaxLen is the length of the longest request.
func (s *Source) MaxLen() int { return s.maxLen }

// Fill appends request n to dst.
func (s *Source) Fill(dst []byte, n uint64, rnd *rand.Rand) []byte {
	t := &s.templates[n%uint64(len(s.templates))]
	secret := ""
	if t.HasSecret() {
		secret = s.secrets[n%uint64(len(s.secrets))]
	}
	return t.Fill(dst, secret, rnd)
}

// allowedRoutes is the traffic mix of a key-holding client, over the routes
// of the benchmark's config: mostly priced chat completions, some
// embeddings, some free reads of stored completions.
func allowedRoutes() []Spec {
	auth := "Bearer " + SecretSlot
	chat := Spec{Method: "POST", Path: "/v1/chat/completions", Auth: auth}
	emb := Spec{Method: "POST", Path: "/v1/embeddings", Auth: auth}
	get := Spec{Method: "GET", Path: "/v1/chat/completions/chatcmpl-AbC123xYz456", Auth: auth}
	return []Spec{chat, chat, emb, chat, chat, get, chat, emb, chat, chat}
}

// pricedRoutes is allowedRoutes without the free reads: every call debits,
// so every key's account is written by the next ledger flush.
func pricedRoutes() []Spec {
	return slices.DeleteFunc(allowedRoutes(), func(s Spec) bool { return s.Method == "GET" })
}

// badPaths are requests with a valid key whose path would read differently
// upstream than in the route table.
func badPaths() []Spec {
	auth := "Bearer " + SecretSlot
	var out []Spec
	for _, p := range []string{
		"/v1/../admin",
		"/v1/%2e%2e/admin",
		"/v1/chat/completions/../../admin",
		"//v1/chat/completions",
		"/v1/chat%2Fcompletions",
		"/v1/./embeddings",
		`/v1\chat\completions`,
		"/v1/%2E%2E/%2E%2E/etc/passwd",
		"/v1/chat/completions/..;x/admin",
		"/v1/%63hat/completions",
	} {
		out = append(out, Spec{Method: "POST", Path: p, Auth: auth})
	}
	return out
}

// garbageAuth returns the authorization value of garbage request i ("" for
// none): everything that is not a well-formed keygate secret.
func garbageAuth(i int, rnd *rand.Rand) string {
	junk := func(n int) string {
		const printable = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_=+/.~!"
		var b strings.Builder
		for range n {
			b.WriteByte(printable[rnd.IntN(len(printable))])
		}
		return b.String()
	}
	switch i % 8 {
	case 0:
		return "" // no authorization header
	case 1:
		return "Bearer " + RandomSecret(rnd) // right shape, wrong checksum
	case 2:
		return "Bearer sk-proj-" + junk(48) // another vendor's key
	case 3:
		return "Basic " + junk(24)
	case 4:
		return "Bearer"
	case 5:
		return "bearer " + junk(1+rnd.IntN(64))
	case 6:
		return "Bearer kg_" + junk(rnd.IntN(20))
	default:
		return junk(16) + " " + junk(rnd.IntN(120))
	}
}

// NewModeSource builds the Source of a mode. keys are valid secrets (allowed,
// badpath), limited are secrets whose bucket is empty (ratelimited); unknown
// and garbage make their own. raw selects Envoy's header_map encoding.
func NewModeSource(mode string, keys, limited []string, raw bool, seed uint64) (*Source, error) {
	rnd := rand.New(rand.NewPCG(seed, 0x6b657967617465))
	build := func(specs []Spec) ([]Template, error) {
		ts := make([]Template, 0, len(specs))
		for i, sp := range specs {
			t, err := Build(sp, i, raw)
			if err != nil {
				return nil, err
			}
			ts = append(ts, t)
		}
		return ts, nil
	}
	switch mode {
	case ModeAllowed, ModeUnknown:
		ts, err := build(allowedRoutes())
		if err != nil {
			return nil, err
		}
		secrets := keys
		if mode == ModeUnknown {
			secrets = make([]string, 10_000)
			for i := range secrets {
				secrets[i] = WellFormedSecret(rnd)
			}
		}
		return NewSource(ts, secrets)
	case ModePriced:
		ts, err := build(pricedRoutes())
		if err != nil {
			return nil, err
		}
		return NewSource(ts, keys)
	case ModeRateLimited:
		ts, err := build(allowedRoutes()[:1])
		if err != nil {
			return nil, err
		}
		return NewSource(ts, limited)
	case ModeBadPath:
		ts, err := build(badPaths())
		if err != nil {
			return nil, err
		}
		return NewSource(ts, keys)
	case ModeGarbage:
		specs := make([]Spec, 1000)
		for i := range specs {
			specs[i] = Spec{Method: "POST", Path: "/v1/chat/completions", Auth: garbageAuth(i, rnd)}
		}
		ts, err := build(specs)
		if err != nil {
			return nil, err
		}
		return NewSource(ts, nil)
	}
	return nil, fmt.Errorf("%w: unknown mode %q", errSource, mode)
}
