// Package config reads keygate's YAML configuration file. Decoding is strict:
// an unknown or misspelled field is an error that names it, since a silently
// ignored "rate_limt" would leave an API unprotected.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"

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
}

// Config is a validated configuration.
type Config struct {
	File                             // as written, with defaults filled in
	Routes *route.Table              // built from File.Routes
	Tiers  map[string]ratelimit.Rate // parsed File.Tiers
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
// example.
func Load(path string) (*Config, error) {
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
	var f File
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&f); err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return nil, errors.New("more than one YAML document; keygate reads one")
	}
	return build(f)
}

func build(f File) (*Config, error) {
	setDefault(&f.DB, DefaultDB)
	setDefault(&f.Listen, DefaultListen)
	setDefault(&f.AdminListen, DefaultAdminListen)
	setDefault(&f.HTTPListen, DefaultHTTPListen)
	setDefault(&f.LogLevel, "info")
	setDefault(&f.LogFormat, "json")
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

	c := &Config{File: f, Tiers: map[string]ratelimit.Rate{}}
	names := make([]string, 0, len(f.Tiers))
	for name := range f.Tiers {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
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
		var price money.Micros
		if r.PriceUSD != "" {
			p, err := money.ParseUSD(r.PriceUSD)
			if err != nil {
				return nil, fmt.Errorf("routes[%d].price_usd: %w", i, err)
			}
			price = p
		}
		specs[i] = route.Spec{Method: r.Method, Path: r.Path, PathPrefix: r.PathPrefix, Scope: r.Scope, Price: price}
	}
	t, err := route.NewTable(specs)
	if err != nil {
		return nil, err
	}
	c.Routes = t
	return c, nil
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
