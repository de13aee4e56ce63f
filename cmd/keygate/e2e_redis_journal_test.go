package main_test

import (
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The outage journal: with redis_outage: {spend: local_allowance}, the
// spends a replica allows while Redis is down are kept in its --db file
// until Redis has charged them, so that a replica restarted during the
// outage still charges them, once.

// TestE2ERedisOutageJournal: Redis down; a replica holding no lease allows
// its allowance; it is stopped (SIGTERM, or SIGKILL once the journal has
// written its spends) and restarted while Redis is still down, allows
// what its new process may, and is stopped and restarted once more; then
// Redis comes back, and the account is charged exactly once for every
// Check allowed, to the micro.
func TestE2ERedisOutageJournal(t *testing.T) {
	t.Parallel()
	for _, kill := range []bool{false, true} {
		name := "sigterm"
		if kill {
			name = "sigkill"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			testOutageJournal(t, kill)
		})
	}
}

func testOutageJournal(t *testing.T, kill bool) {
	const (
		allowance = 1000 // micro-USD: 10 prices
		prices    = allowance / priceEmbedding
		initial   = 1_000_000
	)
	c := startCluster(t, 1, alwaysFsync, steadyTimeout, `redis_outage: {spend: local_allowance, local_allowance_usd: "0.001"}`)
	s := c.reps[0]
	s.createAccount(t, "journal", "1")
	k := s.createKey(t, "journal", redisScopes, "--rate-limit", "1000000/m")
	c.awaitKey(t, k.Secret)

	// No priced Check before the outage: no lease held, so each allowed
	// Check is an outage spend, journaled.
	c.redis.Kill()
	allowed := spendAllowance(t, s, k.Secret)
	if allowed != prices {
		t.Fatalf("%d Checks allowed while Redis is down, want the allowance: %d", allowed, prices)
	}
	s = restartReplica(t, c, s, kill)
	wantJournaled(t, s, "after the first restart", int64(allowed)*priceEmbedding)

	// What the journal owes counts against the restarted process's
	// allowance: one outage, one allowance.
	more := spendAllowance(t, s, k.Secret)
	allowed += more
	if more != 0 {
		t.Errorf("the restarted replica allowed %d more while Redis was still down, want 0: its journal owes the whole allowance", more)
	}
	s = restartReplica(t, c, s, kill)
	wantJournaled(t, s, "after the second restart", int64(allowed)*priceEmbedding)

	c.redis.Restart()
	restarted := time.Now()
	charged := int64(allowed) * priceEmbedding
	took := c.awaitExact(t, "journal", k.ID, initial-charged, charged, restarted)
	t.Logf("%d outage spends across two restarts charged, read exact %s after Redis restarted", allowed, took.Round(time.Millisecond))
	time.Sleep(2500 * time.Millisecond) // more report rounds charge nothing twice
	c.awaitExact(t, "journal", k.ID, initial-charged, charged, restarted)
	if !eventually(settleFor, func() bool { return journalMicros(t, s) == 0 }) {
		t.Errorf("the journal still holds %v micros after Redis charged them", journalMicros(t, s))
	}
	c.stopAll(t)
}

// spendAllowance sends priced Checks through s until one is refused for
// billing (503) and returns how many were allowed.
func spendAllowance(t *testing.T, s *server, secret string) int {
	t.Helper()
	allowed := 0
	for range 100 {
		d := s.checkKey(t, secret, "POST", pricedPath)
		switch {
		case d.allowed:
			allowed++
		case d.status == 503 && strings.HasPrefix(d.errMsg, "Billing is temporarily unavailable"):
			return allowed
		default:
			t.Fatalf("priced Check while Redis is down: %s, want allowed or 503 billing unavailable", d)
		}
	}
	t.Fatalf("100 priced Checks allowed while Redis is down: no allowance bounds them")
	return allowed
}

// restartReplica stops c's only replica s, by SIGTERM or by SIGKILL once
// its journal has written every spend, and starts it again on its --db
// file (Redis is down: it starts from the file).
func restartReplica(t *testing.T, c *cluster, s *server, kill bool) *server {
	t.Helper()
	if kill {
		// The journal writes behind, every flush interval (1s): a crash
		// before that loses the spends not yet written, as bbolt mode's
		// debits. Wait until none is left in memory only.
		if !eventually(settleFor, func() bool { return journalMicros(t, s, `state="unwritten"`) == 0 }) {
			t.Fatalf("the journal has not written its spends after %s", settleFor)
		}
		s.kill(t)
	} else {
		if err := s.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		// Redis is down: the last spend report cannot be sent, but what
		// the replica owes is in the journal, so nothing is lost: a clean
		// exit.
		code, exited := s.wait(stopTimeout)
		if !exited {
			t.Fatalf("replica still running %s after SIGTERM while Redis is down", stopTimeout)
		}
		if code != 0 {
			t.Errorf("replica stopped (SIGTERM) while Redis was down: exit code %d, want 0; its last lines:\n%s", code, lastLines(s.out.String(), 3))
		}
		s.checkLogsClean(t)
	}
	s = c.start(t, s.db)
	c.reps[0] = s
	return s
}

// wantJournaled checks that s's journal holds owed micros, all of them on
// disk.
func wantJournaled(t *testing.T, s *server, when string, owed int64) {
	t.Helper()
	if got := journalMicros(t, s); got != float64(owed) {
		t.Errorf("%s the journal holds %v micros, want %d (%s)", when, got, owed, journalStates(t, s))
	}
	if got := journalMicros(t, s, `state="unwritten"`); got != 0 {
		t.Errorf("%s the journal holds %v micros in memory only, want 0", when, got)
	}
}

// journalMicros sums keygate_outage_journal_micros over the given labels.
func journalMicros(t *testing.T, s *server, labels ...string) float64 {
	t.Helper()
	return metricSum(t, s, "keygate_outage_journal_micros", labels...)
}

func journalStates(t *testing.T, s *server) string {
	t.Helper()
	var parts []string
	for _, st := range []string{"unwritten", "written", "sealed"} {
		parts = append(parts, fmt.Sprintf("%s %v", st, journalMicros(t, s, `state="`+st+`"`)))
	}
	return strings.Join(parts, ", ")
}
