// Package config reads keygate's YAML configuration file. Decoding is strict:
// an unknown or misspelled field is an error that names it, since a silently
// ignored "rate_limt" would leave an API unprotected.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"reflect"
	"slices"
	"sort"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/keygate/keygate/authz/ratelimit"
	"github.com/keygate/keygate/authz/route"
	"github.com/keygate/keygate/keystore/money"
)

// Defaults for the fields that also have flags.
const (
	DefaultDB          = "keygate.db"
	DefaultListen      = "127.0.0.1:9191"
	DefaultAdminListen = "127.0.0.1:9192"
	DefaultHTTPListen  = "127.0.0.1:9190"
)

// Settlement bounds. A reservation holds the customer's money until its
// access-log entry settles it, which takes seconds; a timeout beyond a month
// is a typo (3000h for 30m), not a policy.
const (
	DefaultSettleTimeout = 5 * time.Minute
	MaxSettleTimeout     = 30 * 24 * time.Hour
)

// DefaultAlertThresholds returns the fractions of a key's spend cap at which
// alerts fire when the config names none: keystore.DefaultAlertThresholds
// (a test keeps them equal). A copy here, not an import, because this
// package is also built by modules (k8s) that do not carry the store's
// dependencies; a function, so that no caller can change them for the rest.
func DefaultAlertThresholds() []float64 { return []float64{0.5, 0.8, 1.0} }

// EnvAlertsSecret names the environment variable that, when set, overrides
// alerts.secret, so that the signing key can come from a Secret rather than
// sit in the config file (a ConfigMap). Load reads it; Parse does not.
const EnvAlertsSecret = "KEYGATE_ALERTS_SECRET"

// SettleMode is when a request's price is charged.
type SettleMode string

const (
	// SettleOnCheck debits the price when the Check allows the request.
	SettleOnCheck SettleMode = "on_check"
	// SettleOnResponse reserves the price at Check and settles it from
	// Envoy's access log: a 2xx response is charged, anything else is not.
	SettleOnResponse SettleMode = "on_response"
)

// File is the config file as written. Every field is optional; Parse fills
// defaults and validates.
type File struct {
	DB          string          `yaml:"db"`
	Listen      string          `yaml:"listen"`
	AdminListen string          `yaml:"admin_listen"`
	HTTPListen  string          `yaml:"http_listen"`
	LogLevel    string          `yaml:"log_level"`  // debug, info (default), warn, error
	LogFormat   string          `yaml:"log_format"` // json (default) or console
	Tiers       map[string]Tier `yaml:"tiers"`
	DefaultTier string          `yaml:"default_tier"`
	Routes      []Route         `yaml:"routes"`
	// Settle is on_check (the default) or on_response.
	Settle SettleMode `yaml:"settle"`
	// SettleTimeout is the duration after its Check at which a reservation
	// whose access-log entry never came is charged at the route's price
	// (default 5m). Config.SettleTimeout holds it parsed.
	SettleTimeout string `yaml:"settle_timeout"`
	Alerts        Alerts `yaml:"alerts"`
	// Store is bbolt (the default: one process owns the --db file) or
	// redis (several replicas share accounts, keys, balances and limits;
	// --db keeps each replica's last known key records).
	Store StoreKind `yaml:"store"`
	Redis *Redis    `yaml:"redis"`
	// RedisOutage is what a Check's spend does while Redis is unreachable
	// and the replica's lease does not cover it (store: redis).
	RedisOutage *RedisOutage `yaml:"redis_outage"`
}

// StoreKind names where accounts, keys and balances live.
type StoreKind string

// Stores.
const (
	StoreBBolt StoreKind = "bbolt"
	StoreRedis StoreKind = "redis"
)

// EnvRedisPassword names the environment variable that, when set,
// overrides redis.password, so that it need not sit in a ConfigMap.
const EnvRedisPassword = "KEYGATE_REDIS_PASSWORD"

// Redis is the redis: block, for store: redis.
type Redis struct {
	Addr     string    `yaml:"addr"` // host:port
	Password string    `yaml:"password"`
	DB       int       `yaml:"db"`
	TLS      *RedisTLS `yaml:"tls"` // absent: plain TCP
	// KeyPrefix starts every key keygate writes (default "keygate:"), so
	// that deployments can share a Redis.
	KeyPrefix string `yaml:"key_prefix"`
	// Timeout bounds every Redis wait on the Check path (default 50ms).
	Timeout string `yaml:"timeout"`
}

// RedisOutage is the redis_outage: block: spend is fail_closed (the
// default: deny with a 503) or local_allowance (allow up to
// LocalAllowanceUSD per key per replica, charged when Redis is back).
type RedisOutage struct {
	Spend             OutagePolicy `yaml:"spend"`
	LocalAllowanceUSD string       `yaml:"local_allowance_usd"`
}

// RedisTLS configures TLS to Redis: the CA that signed its certificate
// (empty: the system's) and the name to verify (empty: from addr).
type RedisTLS struct {
	CAFile     string `yaml:"ca_file"`
	ServerName string `yaml:"server_name"`
}

// OutagePolicy is what spend does while Redis is down.
type OutagePolicy string

// Outage policies.
const (
	OutageFailClosed     OutagePolicy = "fail_closed"
	OutageLocalAllowance OutagePolicy = "local_allowance"
)

// Alerts is where spend alerts go and when keys' alerts fire. After Parse
// the thresholds are sorted and defaulted; after Load the secret is the
// environment's when KEYGATE_ALERTS_SECRET is set.
type Alerts struct {
	// WebhookURL receives each alert as a JSON POST: an absolute http or
	// https URL. Empty: alerts go to the log and metrics only.
	WebhookURL string `yaml:"webhook_url"`
	// Thresholds are fractions of a key's spend cap, in (0, 1], at which a
	// key_spend alert fires; ascending, without duplicates. Omitted:
	// DefaultAlertThresholds(). An empty list (not nil after Parse)
	// means no key alerts at all.
	Thresholds []float64 `yaml:"thresholds"`
	// Secret, when set, signs each delivery (x-keygate-signature,
	// HMAC-SHA256 of the body).
	Secret string `yaml:"secret"`
}

// Tier is an account tier: the rate limit of keys that have none of their own.
type Tier struct {
	RateLimit string `yaml:"rate_limit"`
}

// Route is one entry of routes.
type Route struct {
	Method     string `yaml:"method"`
	Path       string `yaml:"path"`
	PathPrefix string `yaml:"path_prefix"`
	Scope      string `yaml:"scope"`
	PriceUSD   string `yaml:"price_usd"`
	// MaxPriceUSD caps the cost an upstream may report for a request
	// settled on response; only with price_usd, never below it, and
	// price_usd when omitted.
	MaxPriceUSD string `yaml:"max_price_usd"`
}

// Config is a validated configuration.
type Config struct {
	File                             // as written, with defaults filled in
	Routes *route.Table              // built from File.Routes
	Tiers  map[string]ratelimit.Rate // parsed File.Tiers
	// SettleTimeout is File.SettleTimeout parsed: in (0, MaxSettleTimeout].
	SettleTimeout time.Duration
	// RedisTimeout and OutageAllowance are File.Redis.Timeout and
	// File.RedisOutage.LocalAllowanceUSD, parsed (store: redis only).
	RedisTimeout    time.Duration
	OutageAllowance money.Micros
	// BuiltIn is true when no file was given and the example config is in use.
	BuiltIn bool
}

// Example is the built-in configuration serve uses without --config: the
// design's tiers and routes, so a first run works with nothing to write.
const Example = `tiers:
  free:  {rate_limit: 20/m}
  tier1: {rate_limit: 500/m}
default_tier: free
routes:
  - {method: POST, path: /v1/chat/completions, scope: chat:write, price_usd: "0.002"}
  - {method: GET,  path_prefix: /v1/chat/completions/, scope: chat:read}
  - {method: POST, path: /v1/embeddings, scope: embeddings:write, price_usd: "0.0001"}
  - {method: POST, path: /v1/images/generations, scope: images:write, price_usd: "0.04"}
`

// Load reads and validates the file at path; an empty path gives the built-in
// example. Settings the environment overrides (EnvAlertsSecret) are read
// from the process's environment.
func Load(path string) (*Config, error) {
	return LoadEnv(path, os.Getenv)
}

// LoadEnv is Load reading the environment through getenv (nil: an empty
// environment), so that callers and tests can supply it without touching the
// process's own.
func LoadEnv(path string, getenv func(string) string) (*Config, error) {
	c, err := loadFile(path)
	if err != nil {
		return nil, err
	}
	if getenv == nil {
		return c, nil
	}
	if secret := getenv(EnvAlertsSecret); secret != "" {
		if err := checkSecret(secret); err != nil {
			return nil, fmt.Errorf("%s: %w", EnvAlertsSecret, err)
		}
		c.Alerts.Secret = secret
	}
	if pw := getenv(EnvRedisPassword); pw != "" && c.Redis != nil {
		c.Redis.Password = pw
	}
	return c, nil
}

func loadFile(path string) (*Config, error) {
	if path == "" {
		c, err := Parse([]byte(Example))
		if err != nil {
			return nil, fmt.Errorf("built-in config: %w", err)
		}
		c.BuiltIn = true
		return c, nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	c, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}

// Parse decodes and validates one YAML document.
func Parse(data []byte) (*Config, error) {
	var doc yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&doc); err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return nil, errors.New("more than one YAML document; keygate reads one")
	}
	if len(doc.Content) > 0 {
		if err := checkNode(doc.Content[0], reflect.TypeFor[File](), ""); err != nil {
			return nil, err
		}
	}
	// checkNode names most mistakes by their path; the strict decoder still
	// has the last word (on aliases and merge keys, which checkNode skips).
	var f File
	strict := yaml.NewDecoder(bytes.NewReader(data))
	strict.KnownFields(true)
	if err := strict.Decode(&f); err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	return build(f)
}

// checkNode checks that n has the shape of a value of type t, so that an
// unknown field, a repeated key or a list where a mapping belongs is
// reported by its path in the file (routes[1].pathprefix) rather than by Go
// type names. path is "" at the top level.
func checkNode(n *yaml.Node, t reflect.Type, path string) error {
	if n.Kind == yaml.AliasNode || n.Tag == "!!null" {
		return nil // aliases are checked by the strict decoder; null is the zero value
	}
	where := path
	if where == "" {
		where = "top level"
	}
	switch t.Kind() {
	case reflect.Struct, reflect.Map:
		if n.Kind != yaml.MappingNode {
			return fmt.Errorf("%s: want a mapping (line %d)", where, n.Line)
		}
		seen := make(map[string]int, len(n.Content)/2)
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			if k.Kind != yaml.ScalarNode || k.Value == "<<" {
				continue // a merge key or a complex key: left to the strict decoder
			}
			at := join(path, k.Value)
			if line, dup := seen[k.Value]; dup {
				return fmt.Errorf("%s: set twice (lines %d and %d)", at, line, k.Line)
			}
			seen[k.Value] = k.Line
			elem := t
			if t.Kind() == reflect.Map {
				elem = t.Elem()
			} else {
				field, ok := fieldByTag(t, k.Value)
				if !ok {
					return fmt.Errorf("%s: unknown field (line %d; known: %s)", at, k.Line, strings.Join(fieldTags(t), ", "))
				}
				elem = field.Type
			}
			if err := checkNode(v, elem, at); err != nil {
				return err
			}
		}
	case reflect.Slice:
		if n.Kind != yaml.SequenceNode {
			return fmt.Errorf("%s: want a list (line %d)", where, n.Line)
		}
		for i, c := range n.Content {
			at := fmt.Sprintf("%s[%d]", path, i)
			if c.Kind == yaml.ScalarNode && c.Tag == "!!null" {
				// The decoder drops a null entry, which would shift the
				// index of every later one (and make [~] an empty list).
				return fmt.Errorf("%s: empty list entry (line %d)", at, c.Line)
			}
			if err := checkNode(c, t.Elem(), at); err != nil {
				return err
			}
		}
	case reflect.Pointer:
		return checkNode(n, t.Elem(), path)
	case reflect.String:
		if n.Kind != yaml.ScalarNode {
			return fmt.Errorf("%s: want a single value, not a list or mapping (line %d)", where, n.Line)
		}
	case reflect.Float64:
		if n.Kind != yaml.ScalarNode {
			return fmt.Errorf("%s: want a number, not a list or mapping (line %d)", where, n.Line)
		}
		var f float64
		if err := n.Decode(&f); err != nil {
			return fmt.Errorf("%s: %q is not a number, like 0.8 (line %d)", where, n.Value, n.Line)
		}
	}
	return nil
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

// fieldByTag returns the field of struct type t that YAML key name decodes into.
func fieldByTag(t reflect.Type, name string) (reflect.StructField, bool) {
	for i := range t.NumField() {
		if f := t.Field(i); yamlName(f) == name {
			return f, true
		}
	}
	return reflect.StructField{}, false
}

// fieldTags lists the YAML keys of struct type t in declaration order.
func fieldTags(t reflect.Type) []string {
	names := make([]string, 0, t.NumField())
	for i := range t.NumField() {
		names = append(names, yamlName(t.Field(i)))
	}
	return names
}

func yamlName(f reflect.StructField) string {
	name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
	return name
}

func build(f File) (*Config, error) {
	setDefault(&f.DB, DefaultDB)
	setDefault(&f.Listen, DefaultListen)
	setDefault(&f.AdminListen, DefaultAdminListen)
	setDefault(&f.HTTPListen, DefaultHTTPListen)
	setDefault(&f.LogLevel, "info")
	setDefault(&f.LogFormat, "json")
	setDefault((*string)(&f.Settle), string(SettleOnCheck))
	setDefault(&f.SettleTimeout, "5m") // DefaultSettleTimeout
	switch f.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		return nil, fmt.Errorf("log_level: %q is not one of debug, info, warn, error", f.LogLevel)
	}
	switch f.LogFormat {
	case "json", "console":
	default:
		return nil, fmt.Errorf("log_format: %q is not json or console", f.LogFormat)
	}

	switch f.Settle {
	case SettleOnCheck, SettleOnResponse:
	default:
		return nil, fmt.Errorf("settle: %q is not on_check or on_response", f.Settle)
	}
	redisTimeout, allowance, err := buildStore(&f)
	if err != nil {
		return nil, err
	}
	settleTimeout, err := ParseDuration(f.SettleTimeout)
	switch {
	case err != nil:
		return nil, fmt.Errorf("settle_timeout: %w", err)
	case settleTimeout == 0:
		return nil, errors.New("settle_timeout: must be more than 0: a reservation needs time for its access-log entry to arrive")
	case settleTimeout > MaxSettleTimeout:
		return nil, fmt.Errorf("settle_timeout: %q is longer than 30d, the most keygate accepts: a reservation holds the customer's money until it settles", f.SettleTimeout)
	}
	alerts, err := buildAlerts(f.Alerts)
	if err != nil {
		return nil, err
	}
	f.Alerts = alerts

	c := &Config{File: f, Tiers: map[string]ratelimit.Rate{}, SettleTimeout: settleTimeout,
		RedisTimeout: redisTimeout, OutageAllowance: allowance}
	names := make([]string, 0, len(f.Tiers))
	for name := range f.Tiers {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		if name == "" {
			return nil, errors.New(`tiers: "" is not a tier name`)
		}
		if f.Tiers[name].RateLimit == "" {
			return nil, fmt.Errorf("tiers.%s.rate_limit: required", name)
		}
		r, err := ratelimit.ParseRate(f.Tiers[name].RateLimit)
		if err != nil {
			return nil, fmt.Errorf("tiers.%s.rate_limit: %w", name, err)
		}
		c.Tiers[name] = r
	}
	if f.DefaultTier != "" {
		if _, ok := c.Tiers[f.DefaultTier]; !ok {
			return nil, fmt.Errorf("default_tier: %q is not a tier defined under tiers", f.DefaultTier)
		}
	} else if len(names) > 0 {
		return nil, errors.New("default_tier: required when tiers are defined")
	}

	specs := make([]route.Spec, len(f.Routes))
	for i, r := range f.Routes {
		var price, maxPrice money.Micros
		if r.PriceUSD != "" {
			p, err := money.ParseUSD(r.PriceUSD)
			if err != nil {
				return nil, fmt.Errorf("routes[%d].price_usd: %w", i, err)
			}
			price = p
		}
		if r.MaxPriceUSD != "" {
			if price == 0 {
				return nil, fmt.Errorf("routes[%d].max_price_usd: set on a route without a price_usd above 0; only a priced route is charged, and its price_usd is what a Check reserves", i)
			}
			p, err := money.ParseUSD(r.MaxPriceUSD)
			if err != nil {
				return nil, fmt.Errorf("routes[%d].max_price_usd: %w", i, err)
			}
			// Checked here too, since the route table reads a zero
			// MaxPrice as "not set" and would let max_price_usd: 0 pass.
			if p < price {
				return nil, fmt.Errorf("routes[%d].max_price_usd: %s is below the route's price_usd, %s", i, p.USD(), price.USD())
			}
			maxPrice = p
		}
		specs[i] = route.Spec{Method: r.Method, Path: r.Path, PathPrefix: r.PathPrefix, Scope: r.Scope, Price: price, MaxPrice: maxPrice}
	}
	t, err := route.NewTable(specs)
	if err != nil {
		return nil, err
	}
	c.Routes = t
	return c, nil
}

// buildAlerts validates alerts and fills in its default thresholds.
func buildAlerts(a Alerts) (Alerts, error) {
	if a.WebhookURL != "" {
		if err := checkWebhookURL(a.WebhookURL); err != nil {
			return Alerts{}, fmt.Errorf("alerts.webhook_url: %w", err)
		}
	}
	if a.Secret != "" {
		if a.WebhookURL == "" {
			return Alerts{}, errors.New("alerts.secret: set without alerts.webhook_url; it signs webhook deliveries")
		}
		if err := checkSecret(a.Secret); err != nil {
			return Alerts{}, fmt.Errorf("alerts.secret: %w", err)
		}
	}
	if a.Thresholds == nil {
		a.Thresholds = DefaultAlertThresholds()
		return a, nil
	}
	seen := make(map[float64]int, len(a.Thresholds))
	for i, t := range a.Thresholds {
		if !(t > 0 && t <= 1) { // also refuses NaN
			return Alerts{}, fmt.Errorf("alerts.thresholds[%d]: %v is not a fraction of the spend cap in (0, 1], like 0.8 for 80%%", i, t)
		}
		if j, dup := seen[t]; dup {
			return Alerts{}, fmt.Errorf("alerts.thresholds[%d]: %v is listed twice (also thresholds[%d])", i, t, j)
		}
		seen[t] = i
	}
	a.Thresholds = slices.Clone(a.Thresholds) // not nil: an empty list means none
	slices.Sort(a.Thresholds)
	return a, nil
}

// checkWebhookURL accepts an absolute http or https URL with a host. Its
// errors show the URL without a password.
func checkWebhookURL(s string) error {
	u, err := url.Parse(s)
	if err != nil {
		var uerr *url.Error
		if errors.As(err, &uerr) {
			err = uerr.Err // url.Error repeats the URL, password and all
		}
		return fmt.Errorf("not a URL: %w", err)
	}
	if (u.Scheme != "http" && u.Scheme != "https") || u.Opaque != "" || u.Hostname() == "" {
		return fmt.Errorf("%q is not an absolute http or https URL, like https://hooks.example.com/keygate", u.Redacted())
	}
	return nil
}

// checkSecret refuses a signing key with surrounding white space: most often
// the final newline of the file it was read from, which would make every
// signature differ from the receiver's. Its errors never show the secret.
func checkSecret(s string) error {
	if strings.TrimSpace(s) != s {
		return errors.New("has leading or trailing white space (a file's final newline?); signatures made with it would not match the receiver's")
	}
	return nil
}

func setDefault(s *string, v string) {
	if *s == "" {
		*s = v
	}
}

// TierRate returns the rate limit of the named tier, falling back to the
// default tier for an unknown or empty name. ok is false when no tier applies
// (no tiers are configured): such keys are not rate limited.
func (c *Config) TierRate(name string) (ratelimit.Rate, bool) {
	if r, ok := c.Tiers[name]; ok {
		return r, true
	}
	r, ok := c.Tiers[c.DefaultTier]
	return r, ok
}

// Redis defaults and bounds.
const (
	DefaultRedisPrefix  = "keygate:"
	DefaultRedisTimeout = 50 * time.Millisecond
	maxRedisTimeout     = 5 * time.Second
)

// buildStore checks store and redis, fills redis's defaults, and returns
// its parsed timeout and outage allowance.
func buildStore(f *File) (time.Duration, money.Micros, error) {
	setDefault((*string)(&f.Store), string(StoreBBolt))
	switch f.Store {
	case StoreBBolt:
		if f.Redis != nil {
			return 0, 0, errors.New("redis: set but store is bbolt; set store: redis to use it")
		}
		if f.RedisOutage != nil {
			return 0, 0, errors.New("redis_outage: set but store is bbolt; set store: redis to use it")
		}
		return 0, 0, nil
	case StoreRedis:
	default:
		return 0, 0, fmt.Errorf("store: %q is not bbolt or redis", f.Store)
	}
	r := f.Redis
	if r == nil || r.Addr == "" {
		return 0, 0, errors.New("redis.addr: required with store: redis (host:port)")
	}
	if host, port, err := net.SplitHostPort(r.Addr); err != nil || host == "" || port == "" {
		return 0, 0, fmt.Errorf("redis.addr: %q is not host:port", r.Addr)
	}
	if r.DB < 0 {
		return 0, 0, fmt.Errorf("redis.db: %d is negative", r.DB)
	}
	setDefault(&r.KeyPrefix, DefaultRedisPrefix)
	setDefault(&r.Timeout, DefaultRedisTimeout.String())
	timeout, err := ParseDuration(r.Timeout)
	switch {
	case err != nil:
		return 0, 0, fmt.Errorf("redis.timeout: %w", err)
	case timeout <= 0 || timeout > maxRedisTimeout:
		return 0, 0, fmt.Errorf("redis.timeout: %q is not in (0, 5s]: it bounds every Redis wait on the Check path", r.Timeout)
	}
	if f.RedisOutage == nil {
		f.RedisOutage = &RedisOutage{}
	}
	o := f.RedisOutage
	setDefault((*string)(&o.Spend), string(OutageFailClosed))
	var allowance money.Micros
	switch o.Spend {
	case OutageFailClosed:
		if o.LocalAllowanceUSD != "" {
			return 0, 0, errors.New("redis_outage.local_allowance_usd: set but redis_outage.spend is fail_closed; set spend: local_allowance to use it")
		}
	case OutageLocalAllowance:
		if o.LocalAllowanceUSD == "" {
			return 0, 0, errors.New("redis_outage.local_allowance_usd: required with spend: local_allowance (the most each key may spend per replica while Redis is down)")
		}
		a, err := money.ParseUSD(o.LocalAllowanceUSD)
		if err != nil {
			return 0, 0, fmt.Errorf("redis_outage.local_allowance_usd: %w", err)
		}
		allowance = a
	default:
		return 0, 0, fmt.Errorf("redis_outage.spend: %q is not fail_closed or local_allowance", o.Spend)
	}
	return timeout, allowance, nil
}
