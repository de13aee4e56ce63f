package main_test

import (
	"testing"

	accesslogdatav3 "github.com/envoyproxy/go-control-plane/envoy/data/accesslog/v3"

	"github.com/keygate/keygate/keystore/rconn/rconntest"
)

// redisBillingCluster starts n replicas of base (a whole config) sharing one
// redis-server.
func redisBillingCluster(t *testing.T, n int, base string) *cluster {
	t.Helper()
	rs := rconntest.Start(t)
	c := &cluster{redis: rs, config: base + "store: redis\nredis:\n  addr: " + rs.Addr() + "\n  " + steadyTimeout + "\n"}
	for i := range n {
		c.reps = append(c.reps, c.start(t, ""))
		c.names = append(c.names, string(rune('A'+i)))
	}
	return c
}

// TestE2ERedisSettleAcrossReplicas: in Redis mode a reservation made by one
// replica is settled by another, refused as a duplicate everywhere while
// open, and expires once whichever replicas sweep.
func TestE2ERedisSettleAcrossReplicas(t *testing.T) {
	t.Parallel()
	c := redisBillingCluster(t, 2, settleConfig)
	a, b := c.reps[0], c.reps[1]
	a.createAccount(t, "acme", "1")
	k := a.createKey(t, "acme", "chat:write")
	awaitAuth(t, c, k.Secret)

	if d := a.checkID(t, k.Secret, "x-commit"); d.status != 200 {
		t.Fatalf("Check on A: %s", d)
	}
	if d := b.checkID(t, k.Secret, "x-commit"); d.status != 400 || d.errType != "invalid_request_error" {
		t.Fatalf("the same open id on B: %s, want 400 invalid_request_error", d)
	}
	if d := b.checkID(t, k.Secret, "x-release"); d.status != 200 {
		t.Fatalf("Check on B: %s", d)
	}
	if d := a.checkID(t, k.Secret, "x-expire"); d.status != 200 {
		t.Fatalf("Check on A: %s", d)
	}
	if got := b.billing(t, "accounts", "acme"); got.ReservedMicros != 3*priceChat || got.BalanceMicros != 1_000_000 {
		t.Fatalf("read through B: %+v, want three prices reserved and nothing charged", got)
	}
	// A's reservation settles through B's access-log service, B's through A's.
	b.sendLogs(t, []*accesslogdatav3.HTTPAccessLogEntry{logEntry("x-commit", 200, "0.003")})
	a.sendLogs(t, []*accesslogdatav3.HTTPAccessLogEntry{logEntry("x-release", 503, "")})
	want := int64(1_000_000 - 3000)
	for _, s := range c.reps {
		if got := s.billing(t, "accounts", "acme"); got.BalanceMicros != want || got.ReservedMicros != priceChat {
			t.Fatalf("after settling across replicas: %+v, want balance %d and one price reserved", got, want)
		}
	}
	// The last one expires at the route's price after settle_timeout, once,
	// though both replicas sweep; a late entry changes nothing.
	if !eventually(4*stopTimeout, func() bool { return a.billing(t, "accounts", "acme").ReservedMicros == 0 }) {
		t.Fatal("the reservation did not expire")
	}
	want -= priceChat
	b.sendLogs(t, []*accesslogdatav3.HTTPAccessLogEntry{logEntry("x-expire", 200, "0.004")})
	for _, s := range c.reps {
		if got := s.billing(t, "accounts", "acme"); got.BalanceMicros != want || got.ReservedMicros != 0 {
			t.Fatalf("after the expiry: %+v, want balance %d", got, want)
		}
	}
	if n := metricSum(t, a, "keygate_reservations_expired_total") + metricSum(t, b, "keygate_reservations_expired_total"); n != 1 {
		t.Errorf("keygate_reservations_expired_total over both replicas = %v, want 1", n)
	}
	c.stopAll(t)
}

// TestE2ERedisAlertsOnce: a key's spend crossing its thresholds through two
// replicas raises each alert once across both.
func TestE2ERedisAlertsOnce(t *testing.T) {
	t.Parallel()
	rcv, url := newReceiver(t, "e2e-webhook-secret")
	c := redisBillingCluster(t, 2, alertsConfig(url))
	c.reps[0].createAccount(t, "acme", "1", "--tier", "tier1")
	k := c.reps[0].createKey(t, "acme", "chat:write", "--spend-cap", "0.01")
	awaitAuth(t, c, k.Secret)
	for i := range 5 { // 5 × 0.002 = the cap, half through each replica
		if d := c.reps[i%2].checkKey(t, k.Secret, "POST", "/v1/chat/completions"); d.status != 200 {
			t.Fatalf("Check %d: %s", i+1, d)
		}
	}
	want := []string{"key_spend 0.5", "key_spend 0.8", "key_spend 1"}
	if !eventually(2*stopTimeout, func() bool { return len(rcv.received()) >= len(want) }) {
		t.Fatalf("alerts received: %v, want %v", rcv.received(), want)
	}
	if d := c.reps[1].checkKey(t, k.Secret, "POST", "/v1/chat/completions"); d.status != 429 {
		t.Fatalf("Check past the cap: %s, want 429", d)
	}
	// Reports come every second: give late duplicates time to show.
	c.stopAll(t)
	if got := rcv.received(); !equal(got, want) {
		t.Fatalf("alerts received: %v, want %v", got, want)
	}
}

// awaitAuth waits until every replica of c knows the key: a request for a
// path no route serves then gets 403 (authenticated, no scope) rather than
// 401, and spends nothing.
func awaitAuth(t *testing.T, c *cluster, secret string) {
	t.Helper()
	for i, s := range c.reps {
		if !eventually(stopTimeout, func() bool { return s.checkKey(t, secret, "GET", "/no-such-route").status == 403 }) {
			t.Fatalf("replica %s does not authenticate the key", c.names[i])
		}
	}
}
