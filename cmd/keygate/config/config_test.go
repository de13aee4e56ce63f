package config

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/keygate/keygate/authz/ratelimit"
	"github.com/keygate/keygate/keystore/money"
)

func TestParseExample(t *testing.T) {
	c, err := Parse([]byte(Example))
	if err != nil {
		t.Fatal(err)
	}
	wantTiers := map[string]ratelimit.Rate{
		"free":  {N: 20, Per: time.Minute},
		"tier1": {N: 500, Per: time.Minute},
	}
	if diff := cmp.Diff(wantTiers, c.Tiers); diff != "" {
		t.Errorf("Tiers (-want +got):\n%s", diff)
	}
	if c.DefaultTier != "free" {
		t.Errorf("DefaultTier = %q, want free", c.DefaultTier)
	}
	if c.BuiltIn {
		t.Error("Parse set BuiltIn")
	}
	wantFile := File{
		DB: DefaultDB, Listen: DefaultListen, AdminListen: DefaultAdminListen, HTTPListen: DefaultHTTPListen,
		LogLevel: "info", LogFormat: "json",
	}
	gotFile := c.File
	gotFile.Tiers, gotFile.Routes, gotFile.DefaultTier = nil, nil, ""
	if diff := cmp.Diff(wantFile, gotFile); diff != "" {
		t.Errorf("defaults (-want +got):\n%s", diff)
	}

	if diff := cmp.Diff([]string{"chat:read", "chat:write", "embeddings:write", "images:write"}, c.Routes.Scopes()); diff != "" {
		t.Errorf("Scopes (-want +got):\n%s", diff)
	}
	tests := []struct {
		method, path string
		wantScope    string
		wantPrice    money.Micros
	}{
		{"POST", "/v1/chat/completions", "chat:write", 2000},
		{"GET", "/v1/chat/completions/abc", "chat:read", 0},
		{"POST", "/v1/embeddings", "embeddings:write", 100},
		{"POST", "/v1/images/generations", "images:write", 40_000},
	}
	for _, tt := range tests {
		r, ok := c.Routes.Match(tt.method, tt.path)
		if !ok {
			t.Errorf("Match(%s %s): no route", tt.method, tt.path)
			continue
		}
		if r.Scope != tt.wantScope || r.Price != tt.wantPrice {
			t.Errorf("Match(%s %s) = scope %q price %d, want %q %d", tt.method, tt.path, r.Scope, r.Price, tt.wantScope, tt.wantPrice)
		}
	}
	if r, ok := c.Routes.Match("GET", "/v1/chat/completions"); ok {
		t.Errorf("GET /v1/chat/completions matched %+v; the example has no such route", r)
	}
}

func TestParseFields(t *testing.T) {
	c, err := Parse([]byte(`
db: /var/lib/keygate/keygate.db
listen: 0.0.0.0:9191
admin_listen: 127.0.0.1:9999
http_listen: :9190
log_level: debug
log_format: console
tiers:
  free: {rate_limit: 1/s}
  bulk:
    rate_limit: 100000/d
default_tier: bulk
routes:
  - method: post
    path: /v1/x
    scope: x:write
    price_usd: 0.10     # unquoted: YAML would read a float; keygate keeps the text
  - {method: GET, path_prefix: /v1/x/, scope: x:read, price_usd: }
`))
	if err != nil {
		t.Fatal(err)
	}
	want := File{
		DB: "/var/lib/keygate/keygate.db", Listen: "0.0.0.0:9191", AdminListen: "127.0.0.1:9999", HTTPListen: ":9190",
		LogLevel: "debug", LogFormat: "console",
		Tiers:       map[string]Tier{"free": {RateLimit: "1/s"}, "bulk": {RateLimit: "100000/d"}},
		DefaultTier: "bulk",
		Routes: []Route{
			{Method: "post", Path: "/v1/x", Scope: "x:write", PriceUSD: "0.10"},
			{Method: "GET", PathPrefix: "/v1/x/", Scope: "x:read"},
		},
	}
	if diff := cmp.Diff(want, c.File); diff != "" {
		t.Errorf("File (-want +got):\n%s", diff)
	}
	if r, ok := c.Routes.Match("POST", "/v1/x"); !ok || r.Price != 100_000 {
		t.Errorf("Match(POST /v1/x) = %+v, %v; want price 100000", r, ok)
	}
}

func TestParseEmpty(t *testing.T) {
	// Every field is optional: an empty file is no tiers and no routes.
	for _, give := range []string{"", "# nothing\n", "---\n", "null\n", "{}\n"} {
		c, err := Parse([]byte(give))
		if err != nil {
			t.Errorf("Parse(%q): %v", give, err)
			continue
		}
		if len(c.Tiers) != 0 || len(c.Routes.Scopes()) != 0 || c.DB != DefaultDB {
			t.Errorf("Parse(%q) = %+v, want defaults only", give, c)
		}
		if _, ok := c.TierRate("free"); ok {
			t.Errorf("Parse(%q): TierRate found a tier", give)
		}
	}
}

func TestParseErrors(t *testing.T) {
	const (
		unclean  = `is not a clean absolute path: it must start with '/' and have no query, no ".", ".." or empty segment, no backslash and no encoded '/', '.', '\' or '%'`
		usdHint  = `want digits with at most one '.', like 0.002`
		rateHint = `want N/s, N/m, N/h or N/d with N a positive whole number, like 500/m`
	)
	tests := []struct {
		name    string // testdata/bad_<name>.yaml
		wantErr string
	}{
		{"unknown_top_level", `rate_limt: unknown field (line 4; known: db, listen, admin_listen, http_listen, log_level, log_format, tiers, default_tier, routes)`},
		{"unknown_route_field", `routes[1].pathprefix: unknown field (line 7; known: method, path, path_prefix, scope, price_usd)`},
		{"unknown_tier_field", `tiers.tier1.ratelimit: unknown field (line 3; known: rate_limit)`},
		{"merged_unknown_field", "yaml: unmarshal errors:\n  line 2: field rate_limit not found in type config.Route"},
		{"price", `routes[1].price_usd: "0.0000001": more than 6 decimal places (the smallest unit is 0.000001)`},
		{"price_currency", `routes[0].price_usd: "$0.002": no currency symbols (amounts are in US dollars); ` + usdHint},
		{"price_negative", `routes[0].price_usd: "-0.002": negative amounts are not allowed`},
		{"rate", `tiers.free.rate_limit: rate limit "20/min": ` + rateHint},
		{"rate_missing", `tiers.free.rate_limit: required`},
		{"default_tier_missing", `default_tier: required when tiers are defined`},
		{"default_tier_unknown", `default_tier: "gold" is not a tier defined under tiers`},
		{"path_and_prefix", `routes[0]: set path or path_prefix, not both`},
		{"no_path", `routes[0]: path or path_prefix is required`},
		{"unclean_path", `routes[0].path_prefix: "/v1/../admin/" ` + unclean},
		{"method", `routes[0].method: "GE T" is not an HTTP method`},
		{"no_scope", `routes[0].scope: required`},
		{"duplicate_route", `routes[1]: duplicate route POST /v1/chat/completions`},
		{"duplicate_key", `tiers.free: set twice (lines 2 and 3)`},
		{"multiple_docs", `more than one YAML document; keygate reads one`},
		{"routes_not_list", `routes: want a list (line 2)`},
		{"tier_not_mapping", `tiers.free: want a mapping (line 2)`},
		{"field_not_scalar", `routes[0].method: want a single value, not a list or mapping (line 2)`},
		{"top_level_list", `top level: want a mapping (line 1)`},
		{"log_level", `log_level: "verbose" is not one of debug, info, warn, error`},
		{"log_format", `log_format: "text" is not json or console`},
		{"syntax", `yaml: line 1: did not find expected ',' or '}'`},
	}
	tested := map[string]bool{}
	for _, tt := range tests {
		file := filepath.Join("testdata", "bad_"+tt.name+".yaml")
		tested[file] = true
		t.Run(tt.name, func(t *testing.T) {
			data, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			c, err := Parse(data)
			if err == nil {
				t.Fatalf("Parse(%s) = %+v, want error %q", file, c, tt.wantErr)
			}
			if err.Error() != tt.wantErr {
				t.Errorf("Parse(%s) error:\n got %s\nwant %s", file, err, tt.wantErr)
			}
			// Load names the file before the same message.
			if _, err := Load(file); err == nil || err.Error() != file+": "+tt.wantErr {
				t.Errorf("Load(%s) error:\n got %v\nwant %s: %s", file, err, file, tt.wantErr)
			}
		})
	}
	files, err := filepath.Glob("testdata/bad_*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if !tested[f] {
			t.Errorf("%s has no case in TestParseErrors", f)
		}
	}
}

func TestParseAliases(t *testing.T) {
	// Anchors and merge keys are YAML the strict decoder understands; the
	// path checker leaves them to it.
	c, err := Parse([]byte(`
routes:
  - &chat {method: POST, path: /v1/chat/completions, scope: chat:write, price_usd: "0.002"}
  - {<<: *chat, path: /v1/chat/other}
`))
	if err != nil {
		t.Fatal(err)
	}
	if r, ok := c.Routes.Match("POST", "/v1/chat/other"); !ok || r.Scope != "chat:write" || r.Price != 2000 {
		t.Errorf("merged route = %+v, %v", r, ok)
	}
}

func TestParseAliasBomb(t *testing.T) {
	// Merge keys that each merge the previous mapping ten times expand
	// exponentially. The path checker does not follow them, and the decoder
	// refuses the excessive aliasing instead of expanding it.
	var b strings.Builder
	b.WriteString("routes:\n  - &a0 {method: GET, path: /x, scope: s}\n")
	for i := 1; i < 20; i++ {
		prev := "*a" + strconv.Itoa(i-1)
		b.WriteString("  - &a" + strconv.Itoa(i) + " {<<: [" + strings.Repeat(prev+", ", 9) + prev + "]}\n")
	}
	_, err := Parse([]byte(b.String()))
	if err == nil || !strings.Contains(err.Error(), "excessive aliasing") {
		t.Fatalf("Parse(alias bomb) = %v, want the decoder's excessive aliasing error", err)
	}
}

func TestLoad(t *testing.T) {
	c, err := Load("")
	if err != nil {
		t.Fatal(err)
	}
	if !c.BuiltIn {
		t.Error(`Load("").BuiltIn = false`)
	}
	if _, ok := c.Routes.Match("POST", "/v1/chat/completions"); !ok {
		t.Error(`Load(""): the example's routes are missing`)
	}

	path := filepath.Join(t.TempDir(), "keygate.yaml")
	if err := os.WriteFile(path, []byte(Example), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err = Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if c.BuiltIn {
		t.Errorf("Load(%s).BuiltIn = true", path)
	}

	if _, err := Load(filepath.Join(t.TempDir(), "missing.yaml")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Load(missing) = %v, want fs.ErrNotExist", err)
	}
}

func TestTierRate(t *testing.T) {
	c, err := Parse([]byte(Example))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		tier string
		want ratelimit.Rate
	}{
		{"tier1", ratelimit.Rate{N: 500, Per: time.Minute}},
		{"free", ratelimit.Rate{N: 20, Per: time.Minute}},
		{"", ratelimit.Rate{N: 20, Per: time.Minute}},     // no tier: the default
		{"gold", ratelimit.Rate{N: 20, Per: time.Minute}}, // unknown tier: the default
	}
	for _, tt := range tests {
		got, ok := c.TierRate(tt.tier)
		if !ok || got != tt.want {
			t.Errorf("TierRate(%q) = %v, %v; want %v, true", tt.tier, got, ok, tt.want)
		}
	}
}

// FuzzParse checks that Parse never panics, and that what it accepts is
// usable: a route table, and a default tier whenever there are tiers. The
// seeds are the example, every bad_*.yaml fixture, and testdata/fuzz/FuzzParse.
func FuzzParse(f *testing.F) {
	f.Add(Example)
	files, err := filepath.Glob("testdata/bad_*.yaml")
	if err != nil {
		f.Fatal(err)
	}
	for _, file := range files {
		data, err := os.ReadFile(file)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(string(data))
	}
	f.Fuzz(func(t *testing.T, data string) {
		c, err := Parse([]byte(data))
		if err != nil {
			if c != nil {
				t.Fatalf("Parse returned a config with error %v", err)
			}
			return
		}
		if c.Routes == nil || c.Tiers == nil {
			t.Fatalf("Parse(%q) = %+v: a nil table", data, c)
		}
		if len(c.Tiers) > 0 {
			if _, ok := c.TierRate(""); !ok {
				t.Fatalf("Parse(%q): tiers but no default tier", data)
			}
		}
		for name, r := range c.Tiers {
			if r.IsZero() {
				t.Fatalf("Parse(%q): tier %q has no rate", data, name)
			}
		}
	})
}
