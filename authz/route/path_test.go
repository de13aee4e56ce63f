package route

import (
	"strings"
	"testing"
)

func TestCleanPathAccepts(t *testing.T) {
	tests := []struct {
		give string
		want string
	}{
		{"/v1/chat/completions", "/v1/chat/completions"},
		{"/v1/x?y=../..", "/v1/x"},
		{"/v1/chat/completions/abc", "/v1/chat/completions/abc"},
		{"/v1/chat/completions?stream=true", "/v1/chat/completions"},
		{"/v1/x?", "/v1/x"},
		{"/v1/x?a#b", "/v1/x"}, // a '#' in the query is the query's business
		{"/v1/x?%2e%2e//\\", "/v1/x"},
		{"/", "/"},
		{"/?x", "/"},
		{"/v1/chat/completions/", "/v1/chat/completions/"}, // a trailing slash is not an empty segment
		{"/v1/...", "/v1/..."},
		{"/v1/.x", "/v1/.x"},
		{"/v1/x.", "/v1/x."},
		{"/v1/..x/y", "/v1/..x/y"},
		{"/v1/a;b=c", "/v1/a;b=c"},
		{"/v1/files/file%3Aabc", "/v1/files/file%3Aabc"}, // encodeURIComponent(":")
		{"/v1/a%20b", "/v1/a%20b"},
		{"/v1/a%2Bb", "/v1/a%2Bb"},
		{"/v1/%3F", "/v1/%3F"},
		{"/v1/%C3%A9", "/v1/%C3%A9"},
		{"/v1/é", "/v1/é"},
		{"/v1/a:b@c!$&'()*+,=", "/v1/a:b@c!$&'()*+,="},
	}
	for _, tt := range tests {
		t.Run(tt.give, func(t *testing.T) {
			got, ok := CleanPath(tt.give)
			if !ok || got != tt.want {
				t.Errorf("CleanPath(%q) = %q, %v; want %q, true", tt.give, got, ok, tt.want)
			}
		})
	}
}

func TestCleanPathRefuses(t *testing.T) {
	tests := []string{
		"",
		"v1",
		"v1/x",
		"?x",
		"*",
		"http://h/v1/x",
		"#",
		"/v1/x#frag",
		"/v1#?x",
		// dot segments
		"/v1/../admin",
		"/v1/./x",
		"/v1/..",
		"/v1/.",
		"/..",
		"/.",
		"/../v1",
		"/v1/..;/admin",
		"/v1/..;jsessionid=x/admin",
		"/v1/.;x/y",
		"/v1/;x/y",
		// empty segments
		"//v1",
		"/v1//x",
		"/v1/x//",
		"//",
		// backslash, raw or encoded
		`\`,
		`/v1\..\admin`,
		`/v1/\x`,
		"%5c",
		"/v1/%5c",
		"/v1/%5C..",
		// encoded dot, slash, percent, in either case
		"/v1/%2e%2E/x",
		"/v1/%2e",
		"/v1/%2E%2E",
		"/v1/.%2e/x",
		"/v1%2fx",
		"/v1%2Fx",
		"/v1/%252e%252e/x",
		"/v1/%25",
		// encoded unreserved characters alias a literal path
		"/v1/%61dmin",
		"/v1/%41",
		"/v1/%30",
		"/v1/%2d",
		"/v1/%5F",
		"/v1/%7e",
		// malformed escapes
		"/x%",
		"/x%2",
		"/x%zz",
		"/x%g0",
		"/x%0g",
		"/v1/%u002e",
		"/x%%41",
		// control bytes, raw or encoded
		"/v1/x\x00",
		"/v1/\tx",
		"/v1/x\r\n",
		"/v1/x\x7f",
		"/v1/x%00",
		"/v1/x%0a",
		"/v1/x%0D",
		"/v1/x%1f",
		"/v1/x%7F",
	}
	for _, give := range tests {
		t.Run(give, func(t *testing.T) {
			if got, ok := CleanPath(give); ok || got != "" {
				t.Errorf("CleanPath(%q) = %q, %v; want \"\", false", give, got, ok)
			}
		})
	}
}

// FuzzCleanPath checks that CleanPath never panics and that nothing it
// accepts could be read as another path: every accepted path is a prefix of
// the target, has no query, and none of the constructs CleanPath refuses.
// The seeds are in testdata/fuzz/FuzzCleanPath, named for what they try.
func FuzzCleanPath(f *testing.F) {
	f.Fuzz(func(t *testing.T, target string) {
		path, ok := CleanPath(target)
		if !ok {
			if path != "" {
				t.Fatalf("CleanPath(%q) refused but returned %q", target, path)
			}
			return
		}
		if !strings.HasPrefix(target, path) {
			t.Fatalf("CleanPath(%q) = %q, not a prefix of the target", target, path)
		}
		if rest := target[len(path):]; rest != "" && rest[0] != '?' {
			t.Fatalf("CleanPath(%q) = %q dropped %q, which is not a query", target, path, rest)
		}
		if path == "" || path[0] != '/' {
			t.Fatalf("CleanPath(%q) = %q, not absolute", target, path)
		}
		for _, bad := range []string{"?", "#", "\\", "//", "/./", "/../"} {
			if strings.Contains(path, bad) {
				t.Fatalf("CleanPath(%q) = %q, which contains %q", target, path, bad)
			}
		}
		lower := strings.ToLower(path)
		for _, bad := range []string{"%2f", "%2e", "%5c", "%25", "%00"} {
			if strings.Contains(lower, bad) {
				t.Fatalf("CleanPath(%q) = %q, which contains %q", target, path, bad)
			}
		}
		for i := 0; i < len(path); i++ {
			if c := path[i]; c < 0x20 || c == 0x7f {
				t.Fatalf("CleanPath(%q) = %q, which contains control byte %#x", target, path, c)
			}
		}
		for seg := range strings.SplitSeq(path[1:], "/") {
			name, _, _ := strings.Cut(seg, ";")
			if name == "." || name == ".." {
				t.Fatalf("CleanPath(%q) = %q, which has the dot segment %q", target, path, seg)
			}
		}
		// CleanPath is idempotent: a clean path is its own clean path.
		if again, ok := CleanPath(path); !ok || again != path {
			t.Fatalf("CleanPath(CleanPath(%q)) = %q, %v; want %q, true", target, again, ok, path)
		}
	})
}

func BenchmarkCleanPath(b *testing.B) {
	for _, target := range []string{"/v1/chat/completions", "/v1/chat/completions/chatcmpl-abc123def456?stream=true&x=%2e"} {
		b.Run(target, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, ok := CleanPath(target); !ok {
					b.Fatal("refused")
				}
			}
		})
	}
}
