package route

import (
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/keygate/keygate/keystore/money"
)

// testSpecs is the design's example table plus overlapping routes that make
// the precedence rules visible.
var testSpecs = []Spec{
	{Method: "POST", Path: "/v1/chat/completions", Scope: "chat:write", Price: 2000},
	{Method: "GET", PathPrefix: "/v1/chat/completions/", Scope: "chat:read"},
	{Method: "POST", Path: "/v1/embeddings", Scope: "embeddings:write", Price: 100},
	{Method: "POST", Path: "/v1/images/generations", Scope: "images:write", Price: 40000},
	{Method: "GET", PathPrefix: "/v1/", Scope: "v1:read"},
	{Method: "GET", PathPrefix: "/v1/chat/", Scope: "chat:list"},
	{Method: "GET", Path: "/v1/chat/completions/pinned", Scope: "pinned:read"},
	{Method: "get", Path: "/v1/models", Scope: "models:read"}, // methods are upper-cased
	{Method: "GET", Path: "/v1/chat/completions/a-rather-long-id-beyond-32-bytes", Scope: "long:read"},
}

func TestMatch(t *testing.T) {
	tbl, err := NewTable(testSpecs)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name      string
		method    string
		target    string
		wantScope string // "" for no match
		wantPrice money.Micros
	}{
		{"exact", "POST", "/v1/chat/completions", "chat:write", 2000},
		{"exact, query stripped", "POST", "/v1/chat/completions?stream=true", "chat:write", 2000},
		{"exact price", "POST", "/v1/images/generations", "images:write", 40000},
		{"longest prefix wins", "GET", "/v1/chat/completions/abc", "chat:read", 0},
		{"middle prefix", "GET", "/v1/chat/other", "chat:list", 0},
		{"shortest prefix", "GET", "/v1/other", "v1:read", 0},
		{"prefix itself", "GET", "/v1/chat/completions/", "chat:read", 0},
		{"exact beats a longer prefix's match", "GET", "/v1/chat/completions/pinned", "pinned:read", 0},
		{"exact key beyond 32 bytes", "GET", "/v1/chat/completions/a-rather-long-id-beyond-32-bytes", "long:read", 0},
		{"an exact route for another method falls to a prefix", "GET", "/v1/chat/completions", "chat:list", 0},
		{"method matters: no POST prefix", "POST", "/v1/chat/completions/abc", "", 0},
		{"method matters: no DELETE", "DELETE", "/v1/chat/completions", "", 0},
		{"methods are case-sensitive", "post", "/v1/chat/completions", "", 0},
		{"spec method upper-cased", "GET", "/v1/models", "models:read", 0},
		{"exact is exact: no trailing slash", "POST", "/v1/embeddings/", "", 0},
		{"exact is exact: no extension", "POST", "/v1/embeddingsx", "", 0},
		{"no route", "GET", "/v2/x", "", 0},
		{"prefix is a string prefix", "GET", "/v1", "", 0},
		{"empty method", "", "/v1/chat/completions", "", 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path, ok := CleanPath(tt.target)
			if !ok {
				t.Fatalf("CleanPath(%q) refused", tt.target)
			}
			r, ok := tbl.Match(tt.method, path)
			if tt.wantScope == "" {
				if ok {
					t.Fatalf("Match(%q, %q) = %+v, want no match", tt.method, path, r)
				}
				return
			}
			if !ok {
				t.Fatalf("Match(%q, %q): no match, want scope %q", tt.method, path, tt.wantScope)
			}
			if r.Scope != tt.wantScope || r.Price != tt.wantPrice || r.Method != tt.method {
				t.Errorf("Match(%q, %q) = %+v, want scope %q price %d", tt.method, path, r, tt.wantScope, tt.wantPrice)
			}
		})
	}
}

func TestMatchRoute(t *testing.T) {
	tbl, err := NewTable(testSpecs[:2])
	if err != nil {
		t.Fatal(err)
	}
	got, _ := tbl.Match("GET", "/v1/chat/completions/abc")
	want := &Route{Method: "GET", Pattern: "/v1/chat/completions/", Scope: "chat:read"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("Match (-want +got):\n%s", diff)
	}
}

func TestMatchMaxPrice(t *testing.T) {
	// MaxPrice is carried to the matched route, exact or prefix, and is
	// the price where the spec leaves it out.
	tbl, err := NewTable([]Spec{
		{Method: "POST", Path: "/v1/chat/completions", Scope: "chat:write", Price: 2000, MaxPrice: 50_000},
		{Method: "POST", PathPrefix: "/v1/batch/", Scope: "batch:write", Price: 100, MaxPrice: 100},
		{Method: "POST", Path: "/v1/embeddings", Scope: "embeddings:write", Price: 100},
		{Method: "GET", PathPrefix: "/v1/", Scope: "v1:read"},
		{Method: "POST", Path: "/v1/metered", Scope: "metered:write", MaxPrice: 7},
	})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		method, path       string
		wantPrice, wantMax money.Micros
	}{
		{"POST", "/v1/chat/completions", 2000, 50_000},
		{"POST", "/v1/batch/run", 100, 100},
		{"POST", "/v1/embeddings", 100, 100},
		{"GET", "/v1/anything", 0, 0},
		{"POST", "/v1/metered", 0, 7}, // a free Check whose settled cost may reach 7
	}
	for _, tt := range tests {
		r, ok := tbl.Match(tt.method, tt.path)
		if !ok {
			t.Errorf("Match(%s %s): no route", tt.method, tt.path)
			continue
		}
		if r.Price != tt.wantPrice || r.MaxPrice != tt.wantMax {
			t.Errorf("Match(%s %s) = price %d max %d, want %d %d", tt.method, tt.path, r.Price, r.MaxPrice, tt.wantPrice, tt.wantMax)
		}
	}
}

func TestMatchEmptyTable(t *testing.T) {
	tbl, err := NewTable(nil)
	if err != nil {
		t.Fatal(err)
	}
	if r, ok := tbl.Match("GET", "/"); ok {
		t.Errorf("empty table matched %+v", r)
	}
	if got := tbl.Scopes(); len(got) != 0 {
		t.Errorf("empty table Scopes() = %q", got)
	}
}

func TestNewTableErrors(t *testing.T) {
	ok := Spec{Method: "GET", Path: "/ok", Scope: "s"}
	const unclean = `is not a clean absolute path: it must start with '/' and have no query, no ".", ".." or empty segment, no backslash and no encoded '/', '.', '\' or '%'`
	tests := []struct {
		name    string
		give    []Spec
		wantErr string
	}{
		{"no method", []Spec{{Path: "/x", Scope: "s"}}, `routes[0].method: "" is not an HTTP method`},
		{"method with space", []Spec{{Method: "GE T", Path: "/x", Scope: "s"}}, `routes[0].method: "GE T" is not an HTTP method`},
		{"method with slash", []Spec{{Method: "GET/", Path: "/x", Scope: "s"}}, `routes[0].method: "GET/" is not an HTTP method`},
		{"method with newline", []Spec{{Method: "GET\n", Path: "/x", Scope: "s"}}, `routes[0].method: "GET\n" is not an HTTP method`},
		{"method non-ASCII", []Spec{{Method: "GÉT", Path: "/x", Scope: "s"}}, `routes[0].method: "GÉT" is not an HTTP method`},
		{"no scope", []Spec{{Method: "GET", Path: "/x"}}, `routes[0].scope: required`},
		{"scope with comma", []Spec{{Method: "GET", Path: "/x", Scope: "a,b"}}, `routes[0].scope: "a,b" contains a space, a comma or a control character`},
		{"scope with space", []Spec{{Method: "GET", Path: "/x", Scope: "a b"}}, `routes[0].scope: "a b" contains a space, a comma or a control character`},
		{"negative price", []Spec{{Method: "GET", Path: "/x", Scope: "s", Price: -1}}, `routes[0].price_usd: negative`},
		{"huge price", []Spec{{Method: "GET", Path: "/x", Scope: "s", Price: money.Max + 1}}, `routes[0].price_usd: above the largest amount, 4611686018427.387903`},
		{"negative max price", []Spec{{Method: "GET", Path: "/x", Scope: "s", Price: 5, MaxPrice: -1}}, `routes[0].max_price_usd: negative`},
		{"max price below price", []Spec{ok, {Method: "GET", Path: "/x", Scope: "s", Price: 2000, MaxPrice: 1999}}, `routes[1].max_price_usd: 0.001999 is below the route's price_usd, 0.002`},
		{"huge max price", []Spec{{Method: "GET", Path: "/x", Scope: "s", Price: 5, MaxPrice: money.Max + 1}}, `routes[0].max_price_usd: above the largest amount, 4611686018427.387903`},
		{"path and prefix", []Spec{{Method: "GET", Path: "/x", PathPrefix: "/x/", Scope: "s"}}, `routes[0]: set path or path_prefix, not both`},
		{"neither path nor prefix", []Spec{{Method: "GET", Scope: "s"}}, `routes[0]: path or path_prefix is required`},
		{"relative path", []Spec{{Method: "GET", Path: "v1/x", Scope: "s"}}, `routes[0].path: "v1/x" ` + unclean},
		{"path with query", []Spec{{Method: "GET", Path: "/v1/x?y=1", Scope: "s"}}, `routes[0].path: "/v1/x?y=1" ` + unclean},
		{"prefix with dot segment", []Spec{{Method: "GET", PathPrefix: "/v1/../", Scope: "s"}}, `routes[0].path_prefix: "/v1/../" ` + unclean},
		{"prefix with empty segment", []Spec{{Method: "GET", PathPrefix: "//", Scope: "s"}}, `routes[0].path_prefix: "//" ` + unclean},
		{"prefix with query mark", []Spec{{Method: "GET", PathPrefix: "/v1?", Scope: "s"}}, `routes[0].path_prefix: "/v1?" ` + unclean},
		{"path with encoded slash", []Spec{{Method: "GET", Path: "/a%2Fb", Scope: "s"}}, `routes[0].path: "/a%2Fb" ` + unclean},
		{"error names the index", []Spec{ok, {Method: "POST", Path: "/ok", Scope: "s"}, {Method: "GET", Path: "/x"}}, `routes[2].scope: required`},
		{"duplicate path", []Spec{ok, {Method: "get", Path: "/ok", Scope: "other"}}, `routes[1]: duplicate route GET /ok`},
		{"duplicate prefix", []Spec{{Method: "GET", PathPrefix: "/v1/", Scope: "s"}, ok, {Method: "GET", PathPrefix: "/v1/", Scope: "t"}}, `routes[2]: duplicate route GET /v1/*`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tbl, err := NewTable(tt.give)
			if err == nil {
				t.Fatalf("NewTable = %+v, want error %q", tbl, tt.wantErr)
			}
			if err.Error() != tt.wantErr {
				t.Errorf("NewTable error:\n got %s\nwant %s", err, tt.wantErr)
			}
		})
	}
}

func TestNewTableAllowsSamePathAcrossKinds(t *testing.T) {
	// The same pattern as exact and as prefix, or for two methods, is no
	// duplicate.
	_, err := NewTable([]Spec{
		{Method: "GET", Path: "/v1/", Scope: "a"},
		{Method: "GET", PathPrefix: "/v1/", Scope: "b"},
		{Method: "POST", Path: "/v1/", Scope: "c"},
		{Method: "POST", PathPrefix: "/v1/", Scope: "d"},
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestScopes(t *testing.T) {
	tbl, err := NewTable(testSpecs)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"chat:list", "chat:read", "chat:write", "embeddings:write", "images:write", "long:read", "models:read", "pinned:read", "v1:read"}
	if diff := cmp.Diff(want, tbl.Scopes()); diff != "" {
		t.Errorf("Scopes (-want +got):\n%s", diff)
	}
	for _, s := range want {
		if !tbl.HasScope(s) {
			t.Errorf("HasScope(%q) = false", s)
		}
	}
	for _, s := range []string{"", "chat", "chat:writes", "CHAT:WRITE"} {
		if tbl.HasScope(s) {
			t.Errorf("HasScope(%q) = true", s)
		}
	}
}

func TestMatchDoesNotAllocate(t *testing.T) {
	tbl, err := NewTable(testSpecs)
	if err != nil {
		t.Fatal(err)
	}
	for _, path := range []string{"/v1/chat/completions", "/v1/chat/completions/a-rather-long-id-beyond-32-bytes", "/v1/chat/completions/abcdefghijklmnopqrstuvwxyz0123456789", "/v2/none"} {
		if allocs := testing.AllocsPerRun(100, func() { tbl.Match("GET", path) }); allocs != 0 {
			t.Errorf("Match(GET, %q): %v allocations, want 0", path, allocs)
		}
	}
}

func BenchmarkMatch(b *testing.B) {
	tbl, err := NewTable(testSpecs)
	if err != nil {
		b.Fatal(err)
	}
	for _, bc := range []struct{ name, method, path string }{
		{"exact", "POST", "/v1/chat/completions"},
		{"exact_long", "GET", "/v1/chat/completions/a-rather-long-id-beyond-32-bytes"},
		{"prefix", "GET", "/v1/chat/completions/chatcmpl-abc123def456"},
		{"miss", "PUT", "/v2/nothing/here"},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				tbl.Match(bc.method, bc.path)
			}
		})
	}
}
