package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/keygate/keygate/cmd/bench/internal/loadgen"
)

// agg is several rounds of one phase, merged: rates from total answers over
// total time, percentiles from the merged histograms, CPU per Check from
// total CPU over total answers.
type agg struct {
	n, timeouts           uint64
	secs, cpu, gen, other float64
	redisCPU, busy        float64 // redis-server's CPU; all cores' busy time
	hist                  loadgen.Histogram
	rss                   int64
	rates                 []float64
	byStatus              map[int]uint64
	want                  int
	// counters sums the phases' counter deltas (each already summed over
	// the replicas by the generator's probe).
	counters map[string]float64
}

func aggregate(phases []*phaseRun, server, mode string, conc int) *agg {
	a := &agg{byStatus: map[int]uint64{}, counters: map[string]float64{}}
	for _, p := range phases {
		if p.Server != server || p.Mode != mode || p.Conc != conc {
			continue
		}
		r := p.Result
		a.n += r.Requests
		a.timeouts += r.Timeouts
		a.secs += r.Seconds
		a.cpu += r.ServerCPUSeconds
		a.gen += r.GenCPUSeconds
		a.other += p.Other
		a.redisCPU += r.RedisCPUSeconds
		for _, c := range r.CoreBusySeconds {
			a.busy += c
		}
		for k, v := range r.Counters {
			a.counters[k] += v
		}
		a.hist.Merge(loadgen.FromSparse(r.Latency))
		a.rss = max(a.rss, r.ServerRSS)
		a.rates = append(a.rates, r.PerSecond)
		for s, n := range r.ByStatus {
			a.byStatus[s] += n
		}
		a.want = p.Want
	}
	if a.n == 0 {
		return nil
	}
	return a
}

func (a *agg) rate() float64        { return float64(a.n) / a.secs }
func (a *agg) cpuPerCheck() float64 { return perCheckUS(a.cpu, a.n) }
func (a *agg) redisCPUPerCheck() float64 {
	return perCheckUS(a.redisCPU, a.n)
}
func (a *agg) q(q float64) time.Duration {
	return a.hist.Quantile(q)
}

// spread is the rounds' rates, "16.1k–16.4k", or "" for one round.
func (a *agg) spread() string {
	if len(a.rates) < 2 {
		return ""
	}
	lo, hi := a.rates[0], a.rates[0]
	for _, r := range a.rates {
		lo, hi = min(lo, r), max(hi, r)
	}
	return fmt.Sprintf("%.1fk–%.1fk", lo/1000, hi/1000)
}

func fmtRate(r float64) string {
	s := fmt.Sprintf("%.0f", r)
	// thousands separators
	var out []byte
	for i := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			out = append(out, ',')
		}
		out = append(out, s[i])
	}
	return string(out)
}

func fmtDur(d time.Duration) string {
	switch {
	case d <= 0:
		return "-"
	case d < time.Millisecond:
		return fmt.Sprintf("%.0fµs", us(d))
	case d < time.Second:
		return fmt.Sprintf("%.2fms", float64(d)/float64(time.Millisecond))
	}
	return fmt.Sprintf("%.2fs", d.Seconds())
}

func ratio(a, b float64) string {
	if b == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2fx", a/b)
}

func pct(x float64) string { return fmt.Sprintf("%.0f%%", 100*x) }

// grid lays out rows as columns: the first left-aligned, the rest right.
func grid(rows [][]string) string {
	var w []int
	for _, r := range rows {
		for i, c := range r {
			if i >= len(w) {
				w = append(w, 0)
			}
			w[i] = max(w[i], utf8.RuneCountInString(c))
		}
	}
	var sb strings.Builder
	for _, r := range rows {
		for i, c := range r {
			pad := strings.Repeat(" ", w[i]-utf8.RuneCountInString(c))
			if i == 0 {
				sb.WriteString(c + pad)
			} else {
				sb.WriteString("  " + pad + c)
			}
		}
		sb.WriteString("\n")
	}
	return sb.String()
}

func (b *bench) allowedTable() string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "Allowed traffic: %d keys over %d accounts, routes with prices; keygate runs every check (key, path, scope, rate limit, debit)\n",
		b.o.accounts*b.o.keysPer, b.o.accounts)
	rows := [][]string{{"server", "conc", "checks/s", "rounds", "p50", "p99", "p99.9", "timeouts", "CPU µs/check", "server CPU", "gen CPU", "noise", "RSS MiB"}}
	for _, c := range b.o.concs {
		fl := aggregate(b.Phases, "floor", loadgen.ModeAllowed, c)
		kg := aggregate(b.Phases, "keygate", loadgen.ModeAllowed, c)
		for _, x := range []struct {
			name string
			a    *agg
		}{{"floor", fl}, {"keygate", kg}} {
			if x.a == nil {
				continue
			}
			a := x.a
			rows = append(rows, []string{x.name, fmt.Sprint(c), fmtRate(a.rate()), a.spread(), fmtDur(a.q(0.5)), fmtDur(a.q(0.99)), fmtDur(a.q(0.999)),
				fmt.Sprint(a.timeouts), fmt.Sprintf("%.1f", a.cpuPerCheck()), pct(a.cpu / a.secs), pct(a.gen / a.secs), pct(a.other / a.secs), fmt.Sprintf("%.1f", float64(a.rss)/(1<<20))})
		}
		if fl != nil && kg != nil {
			rows = append(rows, []string{"keygate/floor", fmt.Sprint(c), ratio(kg.rate(), fl.rate()), "",
				ratio(float64(kg.q(0.5)), float64(fl.q(0.5))), ratio(float64(kg.q(0.99)), float64(fl.q(0.99))), ratio(float64(kg.q(0.999)), float64(fl.q(0.999))),
				"", ratio(kg.cpuPerCheck(), fl.cpuPerCheck()), "", "", "", ratio(float64(kg.rss), float64(fl.rss))})
		}
	}
	sb.WriteString(grid(rows))
	return sb.String()
}

var denialNames = map[string]string{
	loadgen.ModeAllowed:     "allowed (reference)",
	loadgen.ModeUnknown:     "unknown keys, well-formed",
	loadgen.ModeGarbage:     "garbage credentials",
	loadgen.ModeRateLimited: "rate-limited keys",
	loadgen.ModeBadPath:     "path tricks",
}

func (b *bench) denialTable() string {
	var sb strings.Builder
	c := b.o.denialConc
	fmt.Fprintf(&sb, "Denials: keygate at concurrency %d; \"vs allowed\" is CPU per Check over keygate's allowed traffic at %d\n", c, c)
	rows := [][]string{{"traffic", "status", "checks/s", "p50", "p99", "p99.9", "timeouts", "CPU µs/check", "vs allowed", "vs floor", "noise", "RSS MiB"}}
	allowed := aggregate(b.Phases, "keygate", loadgen.ModeAllowed, c)
	floor := aggregate(b.Phases, "floor", loadgen.ModeAllowed, c)
	for _, m := range []string{loadgen.ModeAllowed, loadgen.ModeUnknown, loadgen.ModeGarbage, loadgen.ModeRateLimited, loadgen.ModeBadPath} {
		a := aggregate(b.Phases, "keygate", m, c)
		if a == nil {
			continue
		}
		vsA, vsF := "-", "-"
		if allowed != nil {
			vsA = ratio(a.cpuPerCheck(), allowed.cpuPerCheck())
		}
		if floor != nil {
			vsF = ratio(a.cpuPerCheck(), floor.cpuPerCheck())
		}
		status := fmt.Sprintf("%d %s", a.want, pct(float64(a.byStatus[a.want])/float64(a.n)))
		rows = append(rows, []string{denialNames[m], status, fmtRate(a.rate()), fmtDur(a.q(0.5)), fmtDur(a.q(0.99)), fmtDur(a.q(0.999)),
			fmt.Sprint(a.timeouts), fmt.Sprintf("%.1f", a.cpuPerCheck()), vsA, vsF, pct(a.other / a.secs), fmt.Sprintf("%.1f", float64(a.rss)/(1<<20))})
	}
	sb.WriteString(grid(rows))
	return sb.String()
}

// report prints the tables and writes table.txt and results.json to -out.
func (b *bench) report() error {
	var sb strings.Builder
	m := b.Machine
	fmt.Fprintf(&sb, "keygate load benchmark, %s\n", m.Date)
	fmt.Fprintf(&sb, "machine: %s, %d cores, Linux %s, %s; %s\n", m.CPU, m.Cores, m.Kernel, m.Go, m.Pinning)
	if b.Redis != "" {
		fmt.Fprintf(&sb, "redis:   %s\n", b.Redis)
	}
	fmt.Fprintf(&sb, "command: %s\n", m.Command)
	fmt.Fprintf(&sb, "method:  %s\n", m.Method)
	for _, s := range b.Seeding {
		fmt.Fprintf(&sb, "store:   %s\n", s)
	}
	if b.o.redis {
		sb.WriteString("\n" + b.redisTable())
	} else {
		sb.WriteString("\n" + b.allowedTable() + "\n" + b.denialTable())
	}
	if b.Flush != nil && b.Flush.Off != nil {
		sb.WriteString("\n" + b.Flush.table())
	}
	if b.Profile != "" {
		top, err := pprofTop(b.Profile, 20)
		if err != nil {
			b.problem("go tool pprof: %v", err)
		} else {
			if err := os.WriteFile(filepath.Join(b.o.out, "keygate.cpu.top.txt"), []byte(top), 0o644); err != nil {
				return err
			}
			fmt.Fprintf(&sb, "\nCPU profile: %s (go tool pprof -top %s)\n%s", b.Profile, b.Profile, top)
		}
	}
	if b.o.redis {
		sb.WriteString(redisLegend)
	} else {
		sb.WriteString("\nCPU µs/check: the server's user+system CPU time over the window (/proc/PID/stat) per answered Check.\n")
		sb.WriteString("server/gen CPU: share of one core used by the server and by the generator; a generator near 100% limits the rate.\n")
		sb.WriteString("noise: share of the server's core used by other processes during the window; above ~10% the figures are low.\n")
	}
	if len(b.Warnings) > 0 {
		sb.WriteString("\nWARNINGS:\n")
		for _, w := range b.Warnings {
			sb.WriteString("  - " + w + "\n")
		}
	}
	if len(b.Problems) > 0 {
		sb.WriteString("\nPROBLEMS (the figures above do not show what they claim):\n")
		for _, p := range b.Problems {
			sb.WriteString("  - " + p + "\n")
		}
	}
	fmt.Fprintf(&sb, "\ntotal time %v; results in %s\n", time.Since(b.start).Round(time.Second), b.o.out)
	fmt.Fprint(b.stdout, sb.String())
	if err := os.WriteFile(filepath.Join(b.o.out, "table.txt"), []byte(sb.String()), 0o644); err != nil {
		return err
	}
	// The flush phases' timelines are 50 ms histograms: summarise them.
	for _, p := range b.Phases {
		p.Slots = summarise(p.Result.Timeline)
		p.Result.Timeline = nil
	}
	if b.Flush != nil {
		for _, fp := range []*flushPhase{b.Flush.Off, b.Flush.On} {
			if fp != nil {
				fp.Result.Timeline = nil // summarised in Phases
			}
		}
	}
	js, err := json.MarshalIndent(b, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(b.o.out, "results.json"), js, 0o644)
}

// pprofTop returns the first n lines of `go tool pprof -top`.
func pprofTop(profile string, n int) (string, error) {
	out, err := exec.Command("go", "tool", "pprof", "-top", "-nodecount="+fmt.Sprint(n), profile).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("%w: %s", err, out)
	}
	return string(out), nil
}

// slotSummary is one timeline slot in results.json.
type slotSummary struct {
	Offset time.Duration `json:"offset_ns"`
	N      uint64        `json:"n"`
	P50    time.Duration `json:"p50_ns"`
	P99    time.Duration `json:"p99_ns"`
	Max    time.Duration `json:"max_ns"`
}

func summarise(tl []loadgen.Slot) []slotSummary {
	var out []slotSummary
	for _, s := range tl {
		h := loadgen.FromSparse(s.Latency)
		out = append(out, slotSummary{Offset: s.Offset, N: h.Count(), P50: h.Quantile(0.5), P99: h.Quantile(0.99), Max: h.Max()})
	}
	return out
}
