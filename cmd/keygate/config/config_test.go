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
	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/money"
)

// The explanations that end the messages of several tests.
const (
	durationHint = `want a number and a unit (ns, us, ms, s, m, h or d), like 30s, 1h30m, 2160h or 90d`
	urlHint      = `is not an absolute http or https URL, like https://hooks.example.com/keygate`
	fractionHint = `is not a fraction of the spend cap in (0, 1], like 0.8 for 80%`
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
		Settle: SettleOnCheck, SettleTimeout: "5m",
		Alerts: Alerts{Thresholds: []float64{0.5, 0.8, 1.0}},
		Store:  StoreBBolt,
	}
	gotFile := c.File
	gotFile.Tiers, gotFile.Routes, gotFile.DefaultTier = nil, nil, ""
	if diff := cmp.Diff(wantFile, gotFile); diff != "" {
		t.Errorf("defaults (-want +got):\n%s", diff)
	}

	if c.SettleTimeout != DefaultSettleTimeout {
		t.Errorf("SettleTimeout = %v, want %v", c.SettleTimeout, DefaultSettleTimeout)
	}
	if diff := cmp.Diff(keystore.DefaultAlertThresholds, c.Alerts.Thresholds); diff != "" {
		t.Errorf("Alerts.Thresholds, want keystore's defaults (-want +got):\n%s", diff)
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
		if r.Scope != tt.wantScope || r.Price != tt.wantPrice || r.MaxPrice != tt.wantPrice {
			t.Errorf("Match(%s %s) = scope %q price %d max %d, want %q %d %[7]d", tt.method, tt.path, r.Scope, r.Price, r.MaxPrice, tt.wantScope, tt.wantPrice)
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
    max_price_usd: "0.25"
  - {method: GET, path_prefix: /v1/x/, scope: x:read, price_usd: }
settle: on_response
settle_timeout: 1d12h
alerts:
  webhook_url: https://hooks.example.com/keygate
  thresholds: [1.0, 0.25, 0.9]
  secret: s3cr3t
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
			{Method: "post", Path: "/v1/x", Scope: "x:write", PriceUSD: "0.10", MaxPriceUSD: "0.25"},
			{Method: "GET", PathPrefix: "/v1/x/", Scope: "x:read"},
		},
		Settle:        SettleOnResponse,
		SettleTimeout: "1d12h",
		Alerts: Alerts{
			WebhookURL: "https://hooks.example.com/keygate",
			Thresholds: []float64{0.25, 0.9, 1.0}, // sorted
			Secret:     "s3cr3t",
		},
		Store: StoreBBolt,
	}
	if diff := cmp.Diff(want, c.File); diff != "" {
		t.Errorf("File (-want +got):\n%s", diff)
	}
	if c.SettleTimeout != 36*time.Hour {
		t.Errorf("SettleTimeout = %v, want 36h", c.SettleTimeout)
	}
	if r, ok := c.Routes.Match("POST", "/v1/x"); !ok || r.Price != 100_000 || r.MaxPrice != 250_000 {
		t.Errorf("Match(POST /v1/x) = %+v, %v; want price 100000, max 250000", r, ok)
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
		{"unknown_top_level", `rate_limt: unknown field (line 4; known: db, listen, admin_listen, http_listen, log_level, log_format, tiers, default_tier, routes, settle, settle_timeout, alerts, store, redis, redis_outage)`},
		{"unknown_route_field", `routes[1].pathprefix: unknown field (line 7; known: method, path, path_prefix, scope, price_usd, max_price_usd)`},
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

		{"route_empty_entry", `routes[1]: empty list entry (line 3)`},

		{"settle", `settle: "on_reponse" is not on_check or on_response`},
		{"settle_timeout_zero", `settle_timeout: must be more than 0: a reservation needs time for its access-log entry to arrive`},
		{"settle_timeout_long", `settle_timeout: "31d" is longer than 30d, the most keygate accepts: a reservation holds the customer's money until it settles`},
		{"settle_timeout_syntax", `settle_timeout: duration "300": ` + durationHint},
		{"settle_timeout_negative", `settle_timeout: duration "-5m": negative durations are not allowed`},

		{"max_price_without_price", `routes[1].max_price_usd: set on a route without a price_usd above 0; only a priced route is charged, and its price_usd is what a Check reserves`},
		{"max_price_below_price", `routes[1].max_price_usd: 0.001 is below the route's price_usd, 0.002`},
		{"max_price_zero", `routes[0].max_price_usd: 0.00 is below the route's price_usd, 0.002`},
		{"max_price_syntax", `routes[0].max_price_usd: "$0.05": no currency symbols (amounts are in US dollars); ` + usdHint},

		{"alerts_url_scheme", `alerts.webhook_url: "ftp://hooks.example.com/keygate" ` + urlHint},
		{"alerts_url_relative", `alerts.webhook_url: "hooks.example.com/keygate" ` + urlHint},
		{"alerts_url_password", `alerts.webhook_url: "mailto://user:xxxxx@" ` + urlHint},
		{"alerts_url_syntax", `alerts.webhook_url: not a URL: invalid character " " in host name`},
		{"alerts_threshold_range", `alerts.thresholds[1]: 80 ` + fractionHint},
		{"alerts_threshold_zero", `alerts.thresholds[0]: 0 ` + fractionHint},
		{"alerts_threshold_nan", `alerts.thresholds[0]: NaN ` + fractionHint},
		{"alerts_threshold_duplicate", `alerts.thresholds[2]: 0.5 is listed twice (also thresholds[1])`},
		{"alerts_threshold_percent", `alerts.thresholds[0]: "50%" is not a number, like 0.8 (line 2)`},
		{"alerts_threshold_quoted", `alerts.thresholds[0]: "0.5" is not a number, like 0.8 (line 2)`},
		{"alerts_threshold_mapping", `alerts.thresholds[0]: want a number, not a list or mapping (line 3)`},
		{"alerts_thresholds_not_list", `alerts.thresholds: want a list (line 2)`},
		{"alerts_unknown_field", `alerts.threshold: unknown field (line 3; known: webhook_url, thresholds, secret)`},
		{"alerts_not_mapping", `alerts: want a mapping (line 1)`},
		{"alerts_secret_without_url", `alerts.secret: set without alerts.webhook_url; it signs webhook deliveries`},
		{"alerts_secret_space", `alerts.secret: has leading or trailing white space (a file's final newline?); signatures made with it would not match the receiver's`},
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

func TestParseSettle(t *testing.T) {
	tests := []struct {
		give        string
		wantMode    SettleMode
		wantTimeout time.Duration
	}{
		{"", SettleOnCheck, 5 * time.Minute},
		{"settle: on_check\n", SettleOnCheck, 5 * time.Minute},
		{"settle: on_response\n", SettleOnResponse, 5 * time.Minute},
		{"settle:\nsettle_timeout:\n", SettleOnCheck, 5 * time.Minute}, // null: the defaults
		{"settle: on_response\nsettle_timeout: 90s\n", SettleOnResponse, 90 * time.Second},
		{"settle_timeout: 1ns\n", SettleOnCheck, time.Nanosecond},
		{"settle_timeout: 1h30m\n", SettleOnCheck, 90 * time.Minute},
		{"settle_timeout: 1.5d\n", SettleOnCheck, 36 * time.Hour},
		{"settle_timeout: 30d\n", SettleOnCheck, MaxSettleTimeout}, // the longest
		{"settle_timeout: 720h\n", SettleOnCheck, MaxSettleTimeout},
	}
	for _, tt := range tests {
		c, err := Parse([]byte(tt.give))
		if err != nil {
			t.Errorf("Parse(%q): %v", tt.give, err)
			continue
		}
		if c.Settle != tt.wantMode || c.SettleTimeout != tt.wantTimeout {
			t.Errorf("Parse(%q) = settle %q timeout %v, want %q %v", tt.give, c.Settle, c.SettleTimeout, tt.wantMode, tt.wantTimeout)
		}
	}

	// The errors a line of YAML can produce beyond the fixtures: the
	// boundaries and the modes' spelling.
	errs := []struct{ give, wantErr string }{
		{"settle: ON_CHECK\n", `settle: "ON_CHECK" is not on_check or on_response`},
		{"settle: on-response\n", `settle: "on-response" is not on_check or on_response`},
		{"settle: [on_check]\n", `settle: want a single value, not a list or mapping (line 1)`},
		{"settle_timeout: 0\n", `settle_timeout: must be more than 0: a reservation needs time for its access-log entry to arrive`},
		{"settle_timeout: 720h1ns\n", `settle_timeout: "720h1ns" is longer than 30d, the most keygate accepts: a reservation holds the customer's money until it settles`},
		{"settle_timeout: 99999999d\n", `settle_timeout: duration "99999999d": too large (the longest is 2562047h47m16.854775807s, about 106751 days)`},
		{"settle_timeout: 5 minutes\n", `settle_timeout: duration "5 minutes": want a number and a unit (ns, us, ms, s, m, h or d), like 30s, 1h30m, 2160h or 90d`},
	}
	for _, tt := range errs {
		if _, err := Parse([]byte(tt.give)); err == nil || err.Error() != tt.wantErr {
			t.Errorf("Parse(%q) error:\n got %v\nwant %s", tt.give, err, tt.wantErr)
		}
	}
}

func TestParseMaxPrice(t *testing.T) {
	tests := []struct {
		name               string
		route              string // one route's flow mapping fields after method, path and scope
		wantPrice, wantMax money.Micros
	}{
		{"defaults to the price", `price_usd: "0.002"`, 2000, 2000},
		{"above the price", `price_usd: "0.002", max_price_usd: "0.05"`, 2000, 50_000},
		{"equal to the price", `price_usd: "0.002", max_price_usd: "0.002000"`, 2000, 2000},
		{"unquoted", `price_usd: 0.002, max_price_usd: 1`, 2000, 1_000_000},
		{"null is omitted", `price_usd: "0.002", max_price_usd: `, 2000, 2000},
		{"no price at all", ``, 0, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			give := "routes:\n  - {method: POST, path: /v1/x, scope: x:write, " + tt.route + "}\n"
			c, err := Parse([]byte(give))
			if err != nil {
				t.Fatalf("Parse(%q): %v", give, err)
			}
			r, ok := c.Routes.Match("POST", "/v1/x")
			if !ok || r.Price != tt.wantPrice || r.MaxPrice != tt.wantMax {
				t.Errorf("Match(POST /v1/x) = %+v, %v; want price %d max %d", r, ok, tt.wantPrice, tt.wantMax)
			}
		})
	}

	errs := []struct{ name, route, wantErr string }{
		{"null price", `price_usd: , max_price_usd: "0.01"`, `routes[0].max_price_usd: set on a route without a price_usd above 0; only a priced route is charged, and its price_usd is what a Check reserves`},
		{"zero price", `price_usd: "0", max_price_usd: "0.01"`, `routes[0].max_price_usd: set on a route without a price_usd above 0; only a priced route is charged, and its price_usd is what a Check reserves`},
		{"negative", `price_usd: "0.002", max_price_usd: "-1"`, `routes[0].max_price_usd: "-1": negative amounts are not allowed`},
		{"over-precise", `price_usd: "0.002", max_price_usd: "0.0000001"`, `routes[0].max_price_usd: "0.0000001": more than 6 decimal places (the smallest unit is 0.000001)`},
		{"one micro below", `price_usd: "0.002", max_price_usd: "0.001999"`, `routes[0].max_price_usd: 0.001999 is below the route's price_usd, 0.002`},
		{"a list", `price_usd: "0.002", max_price_usd: [1]`, `routes[0].max_price_usd: want a single value, not a list or mapping (line 2)`},
	}
	for _, tt := range errs {
		t.Run(tt.name, func(t *testing.T) {
			give := "routes:\n  - {method: POST, path: /v1/x, scope: x:write, " + tt.route + "}\n"
			if _, err := Parse([]byte(give)); err == nil || err.Error() != tt.wantErr {
				t.Errorf("Parse(%q) error:\n got %v\nwant %s", give, err, tt.wantErr)
			}
		})
	}
}

func TestParseAlerts(t *testing.T) {
	tests := []struct {
		name string
		give string
		want Alerts
	}{
		{"omitted", ``, Alerts{Thresholds: []float64{0.5, 0.8, 1}}},
		{"null", "alerts:\n", Alerts{Thresholds: []float64{0.5, 0.8, 1}}},
		{"thresholds null", "alerts: {thresholds: }\n", Alerts{Thresholds: []float64{0.5, 0.8, 1}}},
		{"no key thresholds", "alerts: {thresholds: []}\n", Alerts{Thresholds: []float64{}}},
		{"one", "alerts: {thresholds: [1]}\n", Alerts{Thresholds: []float64{1}}},
		{"sorted", "alerts: {thresholds: [1.0, 0.1, 0.75, 0.000001]}\n", Alerts{Thresholds: []float64{0.000001, 0.1, 0.75, 1}}},
		{"exponent", "alerts: {thresholds: [5e-1]}\n", Alerts{Thresholds: []float64{0.5}}},
		{"https", "alerts: {webhook_url: https://hooks.example.com/keygate}\n",
			Alerts{WebhookURL: "https://hooks.example.com/keygate", Thresholds: []float64{0.5, 0.8, 1}}},
		{"http with port and query", "alerts: {webhook_url: \"http://10.0.0.7:8080/hook?team=billing\"}\n",
			Alerts{WebhookURL: "http://10.0.0.7:8080/hook?team=billing", Thresholds: []float64{0.5, 0.8, 1}}},
		{"upper-case scheme", "alerts: {webhook_url: HTTPS://hooks.example.com}\n",
			Alerts{WebhookURL: "HTTPS://hooks.example.com", Thresholds: []float64{0.5, 0.8, 1}}},
		{"IPv6 host", "alerts: {webhook_url: \"http://[::1]:9000/\"}\n",
			Alerts{WebhookURL: "http://[::1]:9000/", Thresholds: []float64{0.5, 0.8, 1}}},
		{"secret", "alerts: {webhook_url: https://h.example, secret: \"s3cr3t with inner space\"}\n",
			Alerts{WebhookURL: "https://h.example", Thresholds: []float64{0.5, 0.8, 1}, Secret: "s3cr3t with inner space"}},
		{"thresholds without a webhook", "alerts: {thresholds: [0.9]}\n", Alerts{Thresholds: []float64{0.9}}}, // log and metric only
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Parse([]byte(tt.give))
			if err != nil {
				t.Fatalf("Parse(%q): %v", tt.give, err)
			}
			if diff := cmp.Diff(tt.want, c.Alerts); diff != "" {
				t.Errorf("Alerts (-want +got):\n%s", diff)
			}
			// An empty list and an omitted one differ: the first means none.
			if c.Alerts.Thresholds == nil {
				t.Error("Thresholds is nil")
			}
		})
	}

	errs := []struct{ name, give, wantErr string }{
		{"no scheme", "alerts: {webhook_url: //hooks.example.com/x}\n", `alerts.webhook_url: "//hooks.example.com/x" ` + urlHint},
		{"no host", "alerts: {webhook_url: \"https:///x\"}\n", `alerts.webhook_url: "https:///x" ` + urlHint},
		{"port only", "alerts: {webhook_url: \"http://:8080/x\"}\n", `alerts.webhook_url: "http://:8080/x" ` + urlHint},
		{"opaque", "alerts: {webhook_url: \"https:hooks.example.com\"}\n", `alerts.webhook_url: "https:hooks.example.com" ` + urlHint},
		{"surrounding space", "alerts: {webhook_url: \" https://h.example\"}\n", `alerts.webhook_url: not a URL: first path segment in URL cannot contain colon`},
		{"above one", "alerts: {thresholds: [1.000001]}\n", `alerts.thresholds[0]: 1.000001 ` + fractionHint},
		{"negative", "alerts: {thresholds: [-0.5]}\n", `alerts.thresholds[0]: -0.5 ` + fractionHint},
		{"infinite", "alerts: {thresholds: [.inf]}\n", `alerts.thresholds[0]: +Inf ` + fractionHint},
		{"null entry", "alerts: {thresholds: [0.5, ~]}\n", `alerts.thresholds[1]: empty list entry (line 1)`},       // the decoder would drop it
		{"only a null entry", "alerts:\n  thresholds:\n    -\n", `alerts.thresholds[0]: empty list entry (line 3)`}, // not "no thresholds"
		{"duplicate after sorting", "alerts: {thresholds: [1, 0.8, 1.0]}\n", `alerts.thresholds[2]: 1 is listed twice (also thresholds[0])`},
		{"leading space in secret", "alerts: {webhook_url: https://h.example, secret: \" s\"}\n", `alerts.secret: has leading or trailing white space (a file's final newline?); signatures made with it would not match the receiver's`},
	}
	for _, tt := range errs {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := Parse([]byte(tt.give)); err == nil || err.Error() != tt.wantErr {
				t.Errorf("Parse(%q) error:\n got %v\nwant %s", tt.give, err, tt.wantErr)
			}
		})
	}
}

func TestDefaultAlertThresholds(t *testing.T) {
	// The config's defaults are the store's, copied rather than imported.
	if diff := cmp.Diff(keystore.DefaultAlertThresholds, DefaultAlertThresholds()); diff != "" {
		t.Errorf("DefaultAlertThresholds() differs from keystore.DefaultAlertThresholds (-keystore +config):\n%s", diff)
	}
	// Each config has its own slice: changing one changes no other.
	c, err := Parse(nil)
	if err != nil {
		t.Fatal(err)
	}
	c.Alerts.Thresholds[0] = 0.01
	d, err := Parse(nil)
	if err != nil {
		t.Fatal(err)
	}
	if d.Alerts.Thresholds[0] != 0.5 || DefaultAlertThresholds()[0] != 0.5 {
		t.Errorf("a change to one config's thresholds reached another: %v, %v", d.Alerts.Thresholds, DefaultAlertThresholds())
	}
}

func TestLoadEnv(t *testing.T) {
	dir := t.TempDir()
	write := func(name, data string) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	withSecret := write("with_secret.yaml", "alerts: {webhook_url: https://h.example, secret: from-file}\n")
	noSecret := write("no_secret.yaml", "alerts: {webhook_url: https://h.example}\n")
	env := func(vars map[string]string) func(string) string {
		return func(k string) string { return vars[k] }
	}
	tests := []struct {
		name   string
		path   string
		getenv func(string) string
		want   string
	}{
		{"file", withSecret, env(nil), "from-file"},
		{"nil getenv", withSecret, nil, "from-file"},
		{"the environment wins", withSecret, env(map[string]string{EnvAlertsSecret: "from-env"}), "from-env"},
		{"the environment alone", noSecret, env(map[string]string{EnvAlertsSecret: "from-env"}), "from-env"},
		{"empty is unset", withSecret, env(map[string]string{EnvAlertsSecret: ""}), "from-file"},
		{"other variables ignored", withSecret, env(map[string]string{"KEYGATE_ALERTS_SECRE": "x"}), "from-file"},
		{"built-in config", "", env(map[string]string{EnvAlertsSecret: "from-env"}), "from-env"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := LoadEnv(tt.path, tt.getenv)
			if err != nil {
				t.Fatal(err)
			}
			if c.Alerts.Secret != tt.want {
				t.Errorf("Alerts.Secret = %q, want %q", c.Alerts.Secret, tt.want)
			}
		})
	}

	// A secret with a newline is refused, and the message shows neither it
	// nor the file's.
	_, err := LoadEnv(withSecret, env(map[string]string{EnvAlertsSecret: "from-env\n"}))
	const wantErr = EnvAlertsSecret + `: has leading or trailing white space (a file's final newline?); signatures made with it would not match the receiver's`
	if err == nil || err.Error() != wantErr {
		t.Errorf("LoadEnv(secret with newline) error:\n got %v\nwant %s", err, wantErr)
	}
	// The file is checked first: its error names it.
	bad := write("bad.yaml", "settle: later\n")
	_, err = LoadEnv(bad, env(map[string]string{EnvAlertsSecret: "from-env"}))
	if want := bad + `: settle: "later" is not on_check or on_response`; err == nil || err.Error() != want {
		t.Errorf("LoadEnv(bad file) error:\n got %v\nwant %s", err, want)
	}
}

func TestLoadReadsTheEnvironment(t *testing.T) {
	// Load is LoadEnv with the process's environment. t.Setenv keeps this
	// test off t.Parallel.
	t.Setenv(EnvAlertsSecret, "from-process")
	c, err := Load("")
	if err != nil {
		t.Fatal(err)
	}
	if c.Alerts.Secret != "from-process" {
		t.Errorf("Load: Alerts.Secret = %q, want the environment's", c.Alerts.Secret)
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
// usable: a route table whose routes never cap a price below itself, a
// default tier whenever there are tiers, a settlement mode and timeout in
// range, and alert thresholds ascending in (0, 1]. The seeds are the
// example, every bad_*.yaml fixture, and testdata/fuzz/FuzzParse.
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
		for _, spec := range c.File.Routes {
			pattern := spec.Path + spec.PathPrefix // exactly one is set
			if r, ok := c.Routes.Match(strings.ToUpper(spec.Method), pattern); !ok || r.MaxPrice < r.Price {
				t.Fatalf("Parse(%q): route %s %s matches %+v, %v; want a route with MaxPrice >= Price", data, spec.Method, pattern, r, ok)
			}
		}
		if c.Settle != SettleOnCheck && c.Settle != SettleOnResponse {
			t.Fatalf("Parse(%q): settle %q", data, c.Settle)
		}
		if c.SettleTimeout <= 0 || c.SettleTimeout > MaxSettleTimeout {
			t.Fatalf("Parse(%q): settle_timeout %v", data, c.SettleTimeout)
		}
		if c.Alerts.Thresholds == nil {
			t.Fatalf("Parse(%q): nil thresholds", data)
		}
		for i, th := range c.Alerts.Thresholds {
			if !(th > 0 && th <= 1) || i > 0 && th <= c.Alerts.Thresholds[i-1] {
				t.Fatalf("Parse(%q): thresholds %v, want ascending in (0, 1]", data, c.Alerts.Thresholds)
			}
		}
	})
}

func TestParseRedis(t *testing.T) {
	const base = "store: redis\n"
	tests := []struct {
		name      string
		give      string
		want      Redis
		timeout   time.Duration
		allowance money.Micros
	}{
		{"defaults", "redis: {addr: 10.0.0.7:6379}", Redis{Addr: "10.0.0.7:6379", KeyPrefix: "keygate:", Timeout: "50ms"}, 50 * time.Millisecond, 0},
		{"everything", `redis:
  addr: redis.internal:6380
  password: pw
  db: 3
  tls: {ca_file: /etc/ca.pem, server_name: redis.internal}
  key_prefix: "prod:kg:"
  timeout: 20ms
redis_outage: {spend: local_allowance, local_allowance_usd: "0.50"}`, Redis{Addr: "redis.internal:6380", Password: "pw", DB: 3,
			TLS: &RedisTLS{CAFile: "/etc/ca.pem", ServerName: "redis.internal"}, KeyPrefix: "prod:kg:", Timeout: "20ms"}, 20 * time.Millisecond, 500_000},
		{"empty tls block means TLS", "redis: {addr: r:6379, tls: {}}", Redis{Addr: "r:6379", TLS: &RedisTLS{}, KeyPrefix: "keygate:", Timeout: "50ms"}, 50 * time.Millisecond, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Parse([]byte(base + tt.give))
			if err != nil {
				t.Fatal(err)
			}
			if c.Store != StoreRedis {
				t.Errorf("Store = %q", c.Store)
			}
			if diff := cmp.Diff(&tt.want, c.Redis); diff != "" {
				t.Errorf("Redis (-want +got):\n%s", diff)
			}
			if c.RedisTimeout != tt.timeout || c.OutageAllowance != tt.allowance {
				t.Errorf("timeout %v allowance %d, want %v %d", c.RedisTimeout, c.OutageAllowance, tt.timeout, tt.allowance)
			}
		})
	}

	errs := []struct{ name, give, want string }{
		{"unknown store", "store: etcd", `store: "etcd" is not bbolt or redis`},
		{"redis without store", "redis: {addr: r:6379}", "redis: set but store is bbolt; set store: redis to use it"},
		{"no addr", "store: redis", "redis.addr: required with store: redis (host:port)"},
		{"no port", base + "redis: {addr: redis}", `redis.addr: "redis" is not host:port`},
		{"negative db", base + "redis: {addr: r:1, db: -1}", "redis.db: -1 is negative"},
		{"db not a number", base + "redis: {addr: r:1, db: one}", "cannot unmarshal"},
		{"zero timeout", base + "redis: {addr: r:1, timeout: 0s}", `redis.timeout: "0s" is not in (0, 5s]`},
		{"long timeout", base + "redis: {addr: r:1, timeout: 6s}", `redis.timeout: "6s" is not in (0, 5s]`},
		{"bad outage", base + "redis: {addr: r:1}\nredis_outage: {spend: open}", `redis_outage.spend: "open" is not fail_closed or local_allowance`},
		{"allowance when failing closed", base + "redis: {addr: r:1}\nredis_outage: {local_allowance_usd: \"1\"}", "redis_outage.local_allowance_usd: set but redis_outage.spend is fail_closed"},
		{"local_allowance without allowance", base + "redis: {addr: r:1}\nredis_outage: {spend: local_allowance}", "redis_outage.local_allowance_usd: required with spend: local_allowance"},
		{"bad allowance", base + "redis: {addr: r:1}\nredis_outage: {spend: local_allowance, local_allowance_usd: \"-1\"}", "redis_outage.local_allowance_usd:"},
		{"redis_outage without redis", "redis_outage: {spend: fail_closed}", "redis_outage: set but store is bbolt"},
		{"unknown tls field", base + "redis: {addr: r:1, tls: {ca: x}}", "redis.tls.ca: unknown field"},
	}
	for _, tt := range errs {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse([]byte(tt.give))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Parse(%q) = %v, want an error containing %q", tt.give, err, tt.want)
			}
		})
	}
}

func TestLoadEnvRedisPassword(t *testing.T) {
	path := filepath.Join(t.TempDir(), "k.yaml")
	if err := os.WriteFile(path, []byte("store: redis\nredis: {addr: r:6379, password: in-file}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	env := map[string]string{EnvRedisPassword: "from-env"}
	c, err := LoadEnv(path, func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	if c.Redis.Password != "from-env" {
		t.Errorf("password %q, want the environment's", c.Redis.Password)
	}
}
