// Package route maps a request's method and path to the scope it needs and the
// price it costs. The table is configuration, built once and never mutated, so
// Checks read it without locks.
package route

import (
	"fmt"
	"sort"
	"strings"

	"github.com/keygate/keygate/keystore/money"
)

// A Spec is one route as the config file writes it. Exactly one of Path (exact
// match) and PathPrefix (prefix match) is set.
type Spec struct {
	Method     string
	Path       string
	PathPrefix string
	Scope      string
	Price      money.Micros
	// MaxPrice caps what a request may be charged when the upstream reports
	// its cost (settlement on response). Zero means Price; otherwise it may
	// not be below Price.
	MaxPrice money.Micros
}

// A Route is a matched route: what the request needs and what it costs.
type Route struct {
	Method  string
	Pattern string // the exact path or the prefix, for messages and metrics
	Scope   string
	Price   money.Micros // what a Check debits or reserves
	// MaxPrice is the most a settled request may be charged, a reported cost
	// being clamped to it; never below Price, and Price unless the route's
	// spec set it.
	MaxPrice money.Micros
}

// Table is an immutable route table. Exact paths win over prefixes; among
// prefixes the longest wins.
type Table struct {
	exact    map[routeKey]*Route
	prefixes []*Route // longest first
	scopes   map[string]bool
}

// routeKey indexes exact routes. A struct of the two strings, not their
// concatenation, so that a lookup never builds a string (which allocates
// once method and path exceed 32 bytes).
type routeKey struct{ method, path string }

// NewTable validates specs and builds a Table. Errors name the offending
// route by index and field, like the config file's own position:
// routes[2].method.
func NewTable(specs []Spec) (*Table, error) {
	t := &Table{exact: map[routeKey]*Route{}, scopes: map[string]bool{}}
	for i, s := range specs {
		where := fmt.Sprintf("routes[%d]", i)
		if !isToken(s.Method) {
			return nil, fmt.Errorf("%s.method: %q is not an HTTP method", where, s.Method)
		}
		m := strings.ToUpper(s.Method)
		if s.Scope == "" {
			return nil, fmt.Errorf("%s.scope: required", where)
		}
		if strings.ContainsFunc(s.Scope, func(r rune) bool { return r <= ' ' || r == 0x7f || r == ',' }) {
			return nil, fmt.Errorf("%s.scope: %q contains a space, a comma or a control character", where, s.Scope)
		}
		if s.Price < 0 {
			return nil, fmt.Errorf("%s.price_usd: negative", where)
		}
		if s.Price > money.Max {
			return nil, fmt.Errorf("%s.price_usd: above the largest amount, %s", where, money.Max.USD())
		}
		maxPrice := s.MaxPrice
		switch {
		case maxPrice == 0:
			maxPrice = s.Price
		case maxPrice < 0:
			return nil, fmt.Errorf("%s.max_price_usd: negative", where)
		case maxPrice < s.Price:
			return nil, fmt.Errorf("%s.max_price_usd: %s is below the route's price_usd, %s", where, maxPrice.USD(), s.Price.USD())
		case maxPrice > money.Max:
			return nil, fmt.Errorf("%s.max_price_usd: above the largest amount, %s", where, money.Max.USD())
		}
		field, pattern := "path", s.Path
		switch {
		case s.Path != "" && s.PathPrefix != "":
			return nil, fmt.Errorf("%s: set path or path_prefix, not both", where)
		case s.Path == "" && s.PathPrefix == "":
			return nil, fmt.Errorf("%s: path or path_prefix is required", where)
		case s.PathPrefix != "":
			field, pattern = "path_prefix", s.PathPrefix
		}
		// A pattern must survive CleanPath unchanged: one with a query
		// string or a fragment could never match a cleaned request path.
		if clean, ok := CleanPath(pattern); !ok || clean != pattern {
			return nil, fmt.Errorf("%s.%s: %q is not a clean absolute path: it must start with '/' and have no query, no \".\", \"..\" or empty segment, no backslash and no encoded '/', '.', '\\' or '%%'", where, field, pattern)
		}
		r := &Route{Method: m, Pattern: pattern, Scope: s.Scope, Price: s.Price, MaxPrice: maxPrice}
		t.scopes[s.Scope] = true
		if s.Path != "" {
			k := routeKey{m, s.Path}
			if _, dup := t.exact[k]; dup {
				return nil, fmt.Errorf("%s: duplicate route %s %s", where, m, s.Path)
			}
			t.exact[k] = r
			continue
		}
		for _, p := range t.prefixes {
			if p.Method == m && p.Pattern == pattern {
				return nil, fmt.Errorf("%s: duplicate route %s %s*", where, m, pattern)
			}
		}
		t.prefixes = append(t.prefixes, r)
	}
	sort.SliceStable(t.prefixes, func(i, j int) bool { return len(t.prefixes[i].Pattern) > len(t.prefixes[j].Pattern) })
	return t, nil
}

// isToken reports whether s is an RFC 9110 token, the syntax of a method.
func isToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0:
		default:
			return false
		}
	}
	return true
}

// Match returns the route for method and a path already checked by CleanPath
// and stripped of its query string. Methods are case-sensitive (RFC 9110):
// the table holds them upper-cased, as clients send them.
func (t *Table) Match(method, path string) (*Route, bool) {
	if r, ok := t.exact[routeKey{method, path}]; ok {
		return r, true
	}
	for _, r := range t.prefixes {
		if r.Method == method && strings.HasPrefix(path, r.Pattern) {
			return r, true
		}
	}
	return nil, false
}

// HasScope reports whether any route requires scope: the typo guard that
// refuses a key whose scope no route uses.
func (t *Table) HasScope(scope string) bool { return t.scopes[scope] }

// Scopes lists every scope some route requires, sorted.
func (t *Table) Scopes() []string {
	out := make([]string, 0, len(t.scopes))
	for s := range t.scopes {
		out = append(out, s)
	}
	sort.Strings(out)
	return out
}
