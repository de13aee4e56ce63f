package route

import "strings"

// CleanPath returns the path of a request target without its query string, and
// whether it is safe to match against the route table. A path is refused when
// a proxy or an upstream could read it as a different path than the table
// does: dot segments, empty segments ("//"), a backslash, control bytes, or a
// percent-encoded slash, dot, backslash, percent or NUL (in either case). It
// never allocates: the result is a prefix of target.
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
			switch hex2(path[i+1], path[i+2]) {
			case '/', '.', '\\', '%', 0, -1:
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

// segmentOK refuses the segments that change a path's meaning: "", "." and "..".
func segmentOK(seg string) bool {
	return seg != "" && seg != "." && seg != ".."
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
