package route

import "strings"

// CleanPath returns the path of a request target without its query string, and
// whether it is safe to match against the route table. A path is refused when
// a proxy or an upstream could read it as a different path than the table
// does: dot segments (also "..;x"), empty segments ("//"), a backslash, a
// '#', control bytes, or a percent escape that is malformed or encodes a
// slash, dot, backslash, percent, control byte or other unreserved character
// (in either case; see escapeOK). A trailing "/" is kept: "/v1/" is a path,
// not a dot segment. It never allocates: the result is a prefix of target.
func CleanPath(target string) (string, bool) {
	path := target
	if i := strings.IndexByte(path, '?'); i >= 0 {
		path = path[:i]
	}
	if path == "" || path[0] != '/' {
		return "", false
	}
	segStart := 1
	for i := 0; i < len(path); i++ {
		c := path[i]
		switch {
		case c < 0x20 || c == 0x7f || c == '\\' || c == '#':
			return "", false
		case c == '%':
			if i+2 >= len(path) {
				return "", false
			}
			if !escapeOK(hex2(path[i+1], path[i+2])) {
				return "", false
			}
		case c == '/' && i > 0:
			if !segmentOK(path[segStart:i]) {
				return "", false
			}
			segStart = i + 1
		}
	}
	if !segmentOK(path[segStart:]) && segStart < len(path) {
		return "", false
	}
	return path, true
}

// segmentOK refuses the segments that change a path's meaning: "", "." and
// "..", also when followed by a ";" path parameter, since Tomcat and Jetty
// read "/..;x/" as "/../".
func segmentOK(seg string) bool {
	if i := strings.IndexByte(seg, ';'); i >= 0 {
		seg = seg[:i]
	}
	return seg != "" && seg != "." && seg != ".."
}

// escapeOK reports whether a percent escape decoding to c (-1: malformed) may
// stay in a path. Escaped '/', '.', '\' and '%' would become separators, dot
// segments or new escapes in a decoding upstream. Escaped controls have no
// business in a path. Escaped unreserved characters (RFC 3986 2.3: letters,
// digits, '-', '.', '_', '~') are refused because they alias a route:
// "/v1/%61dmin" misses an exact route "/v1/admin" here, falls through to a
// broader prefix, and reaches /v1/admin upstream. No client needs them:
// RFC 3986 says producers should not encode those characters.
func escapeOK(c int) bool {
	switch {
	case c < 0x20 || c == 0x7f: // also -1
		return false
	case c == '/' || c == '\\' || c == '%':
		return false
	case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		return false
	case c == '-' || c == '.' || c == '_' || c == '~':
		return false
	}
	return true
}

// hex2 decodes two hex digits, or returns -1.
func hex2(a, b byte) int {
	x, y := unhex(a), unhex(b)
	if x < 0 || y < 0 {
		return -1
	}
	return x<<4 | y
}

func unhex(c byte) int {
	switch {
	case '0' <= c && c <= '9':
		return int(c - '0')
	case 'a' <= c && c <= 'f':
		return int(c-'a') + 10
	case 'A' <= c && c <= 'F':
		return int(c-'A') + 10
	}
	return -1
}
