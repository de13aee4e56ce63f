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
}

// A Route is a matched route: what the request needs and what it costs.
type Route struct {
	Method  string
	Pattern string // the exact path or the prefix, for messages and metrics
	Scope   string
	Price   money.Micros
}

// Table is an immutable route table. Exact paths win over prefixes; among
// prefixes the longest wins.
type Table struct {
	exact    map[string]*Route // method + " " + path
	prefixes []*Route          // longest first
	scopes   map[string]bool
}

// NewTable validates specs and builds a Table. Errors name the offending
// route by index, like the config file's own position: routes[2].method.
func NewTable(specs []Spec) (*Table, error) {
	t := &Table{exact: map[string]*Route{}, scopes: map[string]bool{}}
	for i, s := range specs {
		where := fmt.Sprintf("routes[%d]", i)
		m := strings.ToUpper(s.Method)
		if m == "" || strings.ContainsAny(m, " \t/") {
			return nil, fmt.Errorf("%s.method: %q is not an HTTP method", where, s.Method)
		}
		if s.Scope == "" {
			return nil, fmt.Errorf("%s.scope: required", where)
		}
		if s.Price < 0 {
			return nil, fmt.Errorf("%s.price_usd: negative", where)
		}
		switch {
		case s.Path != "" && s.PathPrefix != "":
			return nil, fmt.Errorf("%s: set path or path_prefix, not both", where)
		case s.Path == "" && s.PathPrefix == "":
			return nil, fmt.Errorf("%s: path or path_prefix is required", where)
		}
		pattern := s.Path + s.PathPrefix
		if _, ok := CleanPath(pattern); !ok {
			return nil, fmt.Errorf("%s: %q is not a clean absolute path", where, pattern)
		}
		r := &Route{Method: m, Pattern: pattern, Scope: s.Scope, Price: s.Price}
		t.scopes[s.Scope] = true
		if s.Path != "" {
			k := m + " " + s.Path
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

// Match returns the route for method and a path already checked by CleanPath
// and stripped of its query string.
func (t *Table) Match(method, path string) (*Route, bool) {
	if r, ok := t.exact[exactKey(method, path)]; ok {
		return r, true
	}
	for _, r := range t.prefixes {
		if r.Method == method && strings.HasPrefix(path, r.Pattern) {
			return r, true
		}
	}
	return nil, false
}

// exactKey builds the map key; the compiler does not allocate for a
// concatenation used only as a map index, so Match stays allocation-free.
func exactKey(method, path string) string { return method + " " + path }

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
