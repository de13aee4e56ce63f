package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
)

// The counters the Redis phases read from every replica's /metrics at the
// start and the end of each measured window (the generator's probe), summed
// over the replicas.
const (
	metricChecks        = "keygate_checks_total"
	metricRedisCommands = "keygate_redis_commands_total" // {op, result}: Calls that reached Redis (ok, error) or not (refused)
	metricLeaseRequests = "keygate_lease_requests_total" // {kind, result}
	metricMirrorSyncs   = "keygate_redis_mirror_syncs_total"
)

var redisCounters = []string{metricChecks, metricRedisCommands, metricLeaseRequests, metricMirrorSyncs}

var errMetrics = errors.New("metrics")

// parseCounters adds to into every sample of the named metrics in a
// Prometheus text exposition, keyed by series: the name and its labels in
// canonical form, `name{a="x",b="y"}` (sorted as exposed). Adding, not
// setting, is what sums the same series over several replicas.
func parseCounters(r io.Reader, names []string, into map[string]float64) error {
	want := make(map[string]bool, len(names))
	for _, n := range names {
		want[n] = true
	}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		name := line
		if i := strings.IndexAny(line, "{ "); i >= 0 {
			name = line[:i]
		}
		if !want[name] {
			continue
		}
		series, rest, err := splitSeries(line, len(name))
		if err != nil {
			return err
		}
		f := strings.Fields(rest)
		if len(f) < 1 || len(f) > 2 { // value, and an optional timestamp
			return fmt.Errorf("%w: sample %q", errMetrics, line)
		}
		v, err := strconv.ParseFloat(f[0], 64)
		if err != nil {
			return fmt.Errorf("%w: sample %q: %w", errMetrics, line, err)
		}
		into[series] += v
	}
	return sc.Err()
}

// splitSeries returns the series (name and label set) of a sample line
// whose name ends at n, and what follows it. Label values may hold escaped
// quotes and braces.
func splitSeries(line string, n int) (series, rest string, err error) {
	if n >= len(line) || line[n] != '{' {
		return line[:n], line[n:], nil
	}
	inQuote, esc := false, false
	for i := n + 1; i < len(line); i++ {
		c := line[i]
		switch {
		case esc:
			esc = false
		case inQuote && c == '\\':
			esc = true
		case c == '"':
			inQuote = !inQuote
		case !inQuote && c == '}':
			return line[:i+1], line[i+1:], nil
		}
	}
	return "", "", fmt.Errorf("%w: unterminated labels in %q", errMetrics, line)
}

// label returns the value of label key in series (`name{k="v",…}`), or "".
// Values are returned as exposed (escapes kept): keygate's are plain words.
func label(series, key string) string {
	i := strings.IndexByte(series, '{')
	if i < 0 {
		return ""
	}
	s := series[i+1 : len(series)-1]
	for s != "" {
		k, after, ok := strings.Cut(s, `="`)
		if !ok {
			return ""
		}
		// The value ends at the first unescaped quote.
		j, esc := 0, false
		for ; j < len(after); j++ {
			if esc {
				esc = false
				continue
			}
			if after[j] == '\\' {
				esc = true
			} else if after[j] == '"' {
				break
			}
		}
		if j >= len(after) {
			return ""
		}
		if strings.TrimSpace(k) == key {
			return after[:j]
		}
		s = strings.TrimPrefix(after[j+1:], ",")
	}
	return ""
}

// sumSeries sums the counters of metric name whose series keep accepts
// (nil: all of them).
func sumSeries(c map[string]float64, name string, keep func(series string) bool) float64 {
	var t float64
	for s, v := range c {
		if (s == name || strings.HasPrefix(s, name+"{")) && (keep == nil || keep(s)) {
			t += v
		}
	}
	return t
}

// reachedRedis keeps the Calls that reached Redis: answered (ok) or failed
// there (error); refused ones (breaker open) never left the replica.
func reachedRedis(series string) bool {
	r := label(series, "result")
	return r == "ok" || r == "error"
}

// scrapeCounters reads url (a replica's /metrics) into into.
func scrapeCounters(ctx context.Context, url string, names []string, into map[string]float64) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%w: %s: %s", errMetrics, url, resp.Status)
	}
	return parseCounters(resp.Body, names, into)
}
