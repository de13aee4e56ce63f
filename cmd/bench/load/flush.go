package main

import (
	"bufio"
	"context"
	"fmt"
	"math"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/keygate/keygate/cmd/bench/internal/loadgen"
)

// The flush phases answer: does writing a ledger flush of many dirty
// accounts raise Check latency while it runs? keygate flushes every second
// by default, and at ~15k Checks/s one second dirties ~15k accounts, so the
// phases ask keygate for a longer interval (KEYGATE_FLUSH_INTERVAL, a
// benchmark knob) and send priced traffic round-robin over one key per
// account until every account is dirty:
//
//   - "flush off": interval 1h, no flush during the window: the baseline p99;
//   - "flush on": an interval long enough for the whole round-robin, so
//     each flush writes about every account; the window opens flushLead
//     before the first flush is due and holds flushesOn of them.
//
// keygate's /metrics is polled every pollEvery during both (the same
// overhead in each) for the ledger's flush counters; each flush seen there
// marks the timeline slots it overlapped, and the p99 of those slots is the
// p99 "while it runs".
const (
	pollEvery = 100 * time.Millisecond
	slotWidth = 50 * time.Millisecond
	envFlush  = "KEYGATE_FLUSH_INTERVAL"
	flushLead = 2 * time.Second // window before the flush is due
	flushTail = 6 * time.Second // and after: time for the flush to run and end
	// flushesOn is the number of flushes in the "flush on" window. A flush
	// of 100,000 accounts lasts about a second, while keygate's GC cycles,
	// which set its p99, come every half second or so and last 100-200 ms:
	// with three flushes, where a few cycles fell moved the ratio by 0.2.
	flushesOn = 6
)

type flushRun struct {
	Accounts int         `json:"accounts"`
	Conc     int         `json:"concurrency"`
	Off      *flushPhase `json:"off"`
	On       *flushPhase `json:"on"`
	// Ratio is p99 while a flush runs over p99 outside flushes, both in the
	// "flush on" run (the same conditions); RatioOff is over the "flush
	// off" run's p99.
	Ratio    float64       `json:"p99_during_over_outside"`
	RatioOff float64       `json:"p99_during_over_off"`
	Interval time.Duration `json:"interval_ns"`
}

type flushPhase struct {
	Name       string         `json:"name"`
	Interval   time.Duration  `json:"interval_ns"`
	Result     loadgen.Result `json:"result"`
	Polls      []metricPoll   `json:"polls"`
	Events     []flushEvent   `json:"flushes"`
	P99All     time.Duration  `json:"p99_all_ns"`
	P99During  time.Duration  `json:"p99_during_ns"`
	P99Outside time.Duration  `json:"p99_outside_ns"`
	NDuring    uint64         `json:"checks_during"`
}

type metricPoll struct {
	At      time.Time `json:"at"`
	Flushes float64   `json:"flushes"`
	Seconds float64   `json:"seconds"`
	Entries float64   `json:"entries"`
}

// flushEvent is one flush as seen from the polls: it ended between two polls
// and lasted Seconds, so it ran within [From, To] (offsets from the window's
// start). Entries counts balances and spends written: two per account here.
type flushEvent struct {
	From    time.Duration `json:"from_ns"`
	To      time.Duration `json:"to_ns"`
	Seconds float64       `json:"seconds"`
	Entries float64       `json:"entries"`
}

func (b *bench) measureFlush(ctx context.Context) error {
	if !b.o.flush {
		return nil
	}
	fr := &flushRun{Accounts: b.o.flushAccts, Conc: b.o.denialConc}
	b.Flush = fr
	// Both windows last flushWindow; "flush on" opens its window
	// flushLead before the first flush is due, so that the flush (which
	// may take seconds on a busy disk) runs and ends inside it.
	window := max(b.o.duration, flushLead+flushTail)
	off, err := b.flushPhase(ctx, "flush off", time.Hour, b.o.warmup, window)
	if err != nil {
		return err
	}
	fr.Off = off
	rate := off.Result.PerSecond
	if rate <= 0 {
		return fmt.Errorf("%w: flush off: no throughput", errBench)
	}
	// Long enough for every account to be debited once before the first
	// flush even if "flush on" runs at half the rate (a busy machine).
	iv := time.Duration(math.Ceil(2*float64(b.o.flushAccts)/rate)) * time.Second
	iv = max(iv, flushLead+time.Second) // a second of warm-up at least
	fr.Interval = iv
	// keygate paces a flush over up to half its interval: the window must
	// hold all of it. It holds flushesOn of them, each writing about every
	// account again, so that one unlucky flush does not make the figure.
	on, err := b.flushPhase(ctx, "flush on", iv, iv-flushLead,
		max(window, flushLead+(flushesOn-1)*iv+iv/2+2*time.Second))
	if err != nil {
		return err
	}
	fr.On = on
	if len(off.Events) > 0 {
		b.problem("flush off: keygate flushed %d times during the window: it does not honour %s, so the flush phases measure its default interval", len(off.Events), envFlush)
	}
	var biggest float64
	for _, e := range on.Events {
		biggest = max(biggest, e.Entries/2)
	}
	switch {
	case len(on.Events) == 0:
		b.problem("flush on: no flush seen during the window")
	case biggest < 0.95*float64(b.o.flushAccts):
		b.problem("flush on: the largest flush wrote %.0f accounts, not %d", biggest, b.o.flushAccts)
	}
	if on.P99Outside > 0 && on.P99During > 0 {
		fr.Ratio = float64(on.P99During) / float64(on.P99Outside)
	}
	if off.P99All > 0 && on.P99During > 0 {
		fr.RatioOff = float64(on.P99During) / float64(off.P99All)
	}
	return nil
}

func (b *bench) flushPhase(ctx context.Context, name string, interval, warmup, duration time.Duration) (*flushPhase, error) {
	srvName := "keygate-" + strings.ReplaceAll(name, " ", "-")
	s, err := b.startKeygate(ctx, srvName, b.flushDB, envFlush+"="+interval.String())
	if err != nil {
		return nil, err
	}
	defer b.stopServer(s)
	fp := &flushPhase{Name: name, Interval: interval}

	pollCtx, stopPoll := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		fp.Polls = poll(pollCtx, "http://"+s.httpAddr+"/metrics")
	}()
	res, err := b.gen(ctx, s, loadgen.ModePriced, b.o.denialConc, b.flushKeys, slotWidth, warmup, duration)
	stopPoll()
	wg.Wait()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	fp.Result = res
	b.add(&phaseRun{Server: srvName, Mode: loadgen.ModePriced, Conc: b.o.denialConc, Round: 1, Want: 200, Result: res})
	fp.analyse()
	b.logf("%-9s interval %-6v %8.0f/s  p99 %6.0fµs  during flush %6.0fµs (%d checks)  outside %6.0fµs  flushes %v",
		name, interval, res.PerSecond, us(fp.P99All), us(fp.P99During), fp.NDuring, us(fp.P99Outside), fp.Events)
	return fp, nil
}

// analyse finds the flushes in the polls and splits the timeline's slots
// into those that overlap one and the others.
func (fp *flushPhase) analyse() {
	start := fp.Result.Start
	for i := 1; i < len(fp.Polls); i++ {
		p, q := fp.Polls[i-1], fp.Polls[i]
		if q.Flushes <= p.Flushes {
			continue
		}
		secs := q.Seconds - p.Seconds
		from := p.At.Add(-time.Duration(secs * float64(time.Second))).Sub(start)
		fp.Events = append(fp.Events, flushEvent{From: from, To: q.At.Sub(start), Seconds: secs, Entries: q.Entries - p.Entries})
	}
	var all, during, outside loadgen.Histogram
	for _, sl := range fp.Result.Timeline {
		h := loadgen.FromSparse(sl.Latency)
		all.Merge(h)
		in := false
		for _, e := range fp.Events {
			if sl.Offset < e.To && sl.Offset+slotWidth > e.From {
				in = true
			}
		}
		if in {
			during.Merge(h)
		} else {
			outside.Merge(h)
		}
	}
	fp.P99All, fp.P99During, fp.P99Outside = all.Quantile(0.99), during.Quantile(0.99), outside.Quantile(0.99)
	fp.NDuring = during.Count()
}

// poll reads the ledger's counters from url every pollEvery until ctx ends.
func poll(ctx context.Context, url string) []metricPoll {
	var out []metricPoll
	t := time.NewTicker(pollEvery)
	defer t.Stop()
	for {
		if p, err := scrape(ctx, url); err == nil {
			out = append(out, p)
		}
		select {
		case <-ctx.Done():
			return out
		case <-t.C:
		}
	}
}

func scrape(ctx context.Context, url string) (metricPoll, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return metricPoll{}, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return metricPoll{}, err
	}
	defer resp.Body.Close()
	p := metricPoll{At: time.Now()}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		name, val, ok := strings.Cut(sc.Text(), " ")
		if !ok {
			continue
		}
		var dst *float64
		switch name {
		case `keygate_ledger_flushes_total{result="ok"}`:
			dst = &p.Flushes
		case "keygate_ledger_flush_duration_seconds_sum":
			dst = &p.Seconds
		case "keygate_ledger_flushed_entries_total":
			dst = &p.Entries
		default:
			continue
		}
		if v, err := strconv.ParseFloat(val, 64); err == nil {
			*dst = v
		}
	}
	return p, sc.Err()
}

// flushTable writes the flush phases' table.
func (fr *flushRun) table() string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "Ledger flush: %d accounts, one key each; priced traffic round-robin over every key at concurrency %d\n", fr.Accounts, fr.Conc)
	rows := [][]string{{"run", "flush every", "flushes seen", "accounts/flush", "flush ms", "checks/s", "p99 all", "p99 during flush", "checks during", "p99 outside"}}
	for _, fp := range []*flushPhase{fr.Off, fr.On} {
		if fp == nil {
			continue
		}
		acc, ms := "-", "-"
		if len(fp.Events) > 0 {
			var a, s float64
			for _, e := range fp.Events {
				a, s = max(a, e.Entries/2), max(s, e.Seconds)
			}
			acc, ms = fmt.Sprintf("%.0f", a), fmt.Sprintf("%.0f", s*1000)
		}
		during := "-"
		if fp.NDuring > 0 {
			during = fmtDur(fp.P99During)
		}
		rows = append(rows, []string{fp.Name, fp.Interval.String(), strconv.Itoa(len(fp.Events)), acc, ms,
			fmtRate(fp.Result.PerSecond), fmtDur(fp.P99All), during, strconv.FormatUint(fp.NDuring, 10), fmtDur(fp.P99Outside)})
	}
	sb.WriteString(grid(rows))
	if fr.Ratio > 0 {
		fmt.Fprintf(&sb, "p99 while a flush runs / p99 outside flushes (flush on): %.2fx (target ≤ 1.20x); / p99 of flush off: %.2fx\n", fr.Ratio, fr.RatioOff)
	}
	return sb.String()
}
