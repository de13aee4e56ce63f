package main_test

import (
	"context"
	"net/http"
	"strings"
	"syscall"
	"testing"

	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// TestE2EOperations: what kubelet and Prometheus see, while serving and
// while stopping.
func TestE2EOperations(t *testing.T) {
	t.Parallel()
	s := startServer(t, serverOpts{})
	s.createAccount(t, "acme", "1")
	k := s.createKey(t, "acme", "chat:write", "--rate-limit", "1000/s")

	t.Run("healthz and readyz", func(t *testing.T) {
		for _, p := range []string{"/healthz", "/readyz"} {
			if code, body := httpGet(t, "http://"+s.http+p); code != http.StatusOK {
				t.Errorf("GET %s = %d %q, want 200", p, code, body)
			}
		}
	})

	t.Run("metrics", func(t *testing.T) {
		wantAllowed(t, s.checkKey(t, k.Secret, "POST", "/v1/chat/completions"), k.ID, "acme")
		wantDenied(t, s.checkKey(t, k.Secret, "POST", "/v1/embeddings"), 403, "permission_error")
		wantDenied(t, decode(t, s.check(t, envoyRequest("POST", "/v1/chat/completions", nil))), 401, "authentication_error")
		if got := metricSum(t, s, "keygate_checks_total", `result="allow"`); got < 1 {
			t.Errorf(`keygate_checks_total{result="allow"} = %v, want >= 1`, got)
		}
		if got := metricSum(t, s, "keygate_checks_total", `result="deny"`, `status="403"`); got < 1 {
			t.Errorf(`keygate_checks_total{result="deny",status="403"} = %v, want >= 1`, got)
		}
		if got := metricSum(t, s, "keygate_checks_total", `result="deny"`, `status="401"`); got < 1 {
			t.Errorf(`keygate_checks_total{result="deny",status="401"} = %v, want >= 1`, got)
		}
		if got := metricSum(t, s, "keygate_debited_micros_total"); got != priceChat {
			t.Errorf("keygate_debited_micros_total = %v, want %d", got, priceChat)
		}
		_, body := httpGet(t, "http://"+s.http+"/metrics")
		for _, name := range []string{"keygate_check_duration_seconds", "keygate_debits_total", "go_goroutines"} {
			if !strings.Contains(body, name) {
				t.Errorf("/metrics has no %s", name)
			}
		}
	})

	t.Run("grpc health", func(t *testing.T) {
		hc := healthpb.NewHealthClient(dial(t, s.listen))
		for _, svc := range []string{"", "envoy.service.auth.v3.Authorization"} {
			ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
			resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: svc})
			cancel()
			if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
				t.Errorf("grpc.health.v1 Check(%q) = %v, %v, want SERVING", svc, resp.GetStatus(), err)
			}
		}
	})

	// Stopping: a health Watch stream is an in-flight RPC, so the drain
	// waits for it; meanwhile the server says it is going away.
	t.Run("draining", func(t *testing.T) {
		cc := dial(t, s.listen)
		defer cc.Close()
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		w, err := healthpb.NewHealthClient(cc).Watch(ctx, &healthpb.HealthCheckRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if r, err := w.Recv(); err != nil || r.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("Watch: %v, %v, want SERVING first", r.GetStatus(), err)
		}
		if err := s.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		r, err := w.Recv()
		if err != nil || r.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
			t.Errorf("Watch after SIGTERM: %v, %v, want NOT_SERVING", r.GetStatus(), err)
		}
		if err == nil {
			if code, _ := httpGet(t, "http://"+s.http+"/readyz"); code != http.StatusServiceUnavailable {
				t.Errorf("GET /readyz while stopping = %d, want 503", code)
			}
			if code, _ := httpGet(t, "http://"+s.http+"/healthz"); code != http.StatusOK {
				t.Errorf("GET /healthz while stopping = %d, want 200", code)
			}
		}
		cancel() // the last in-flight RPC ends: the stop can finish
		code, ok := s.wait(stopTimeout)
		if !ok || code != 0 {
			t.Errorf("after SIGTERM: exit %d (exited %v), want 0\n%s", code, ok, s.out.String())
		}
		s.checkLogsClean(t)
	})

	// Nothing was lost by the stop.
	s2 := startServer(t, serverOpts{db: s.db})
	if got := s2.account(t, "acme").BalanceMicros; got != 1_000_000-priceChat {
		t.Errorf("balance after the drained stop = %d, want %d", got, 1_000_000-priceChat)
	}
	s2.stop(t)
}
