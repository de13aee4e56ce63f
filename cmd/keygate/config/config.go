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
	"reflect"
	"sort"
	"strings"

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
			if err := checkNode(c, t.Elem(), fmt.Sprintf("%s[%d]", path, i)); err != nil {
				return err
			}
		}
	case reflect.String:
		if n.Kind != yaml.ScalarNode {
			return fmt.Errorf("%s: want a single value, not a list or mapping (line %d)", where, n.Line)
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
