package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/keygate/keygate/authz"
	"github.com/keygate/keygate/authz/settle"
	"github.com/keygate/keygate/cmd/keygate/config"
	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/admin"
	"github.com/keygate/keygate/keystore/alert"
	adminv1 "github.com/keygate/keygate/proto/keygate/admin/v1"
)

// drainTimeout bounds how long in-flight Checks may take to finish on stop
// before they are cut; the ledger flush comes after either way.
const drainTimeout = 10 * time.Second

func newServeCmd() *cobra.Command {
	var o struct{ config, db, listen, adminListen, httpListen string }
	c := &cobra.Command{
		Use:   "serve",
		Short: "Serve ext_authz Checks, the admin API, metrics and health",
		Long: `Serve ext_authz Checks and grpc.health.v1 on --listen, the admin API on
--admin-listen (requires KEYGATE_ADMIN_TOKEN), and /metrics, /healthz and
/readyz on --http-listen. Without --config the built-in example config is used.
SIGTERM or SIGINT drains in-flight Checks, flushes the ledger and exits 0.`,
		Args: noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			cfg, err := config.Load(o.config)
			if err != nil {
				return err
			}
			// Flags win over the file; only flags actually given count.
			f := c.Flags()
			if f.Changed("db") {
				cfg.DB = o.db
			}
			if f.Changed("listen") {
				cfg.Listen = o.listen
			}
			if f.Changed("admin-listen") {
				cfg.AdminListen = o.adminListen
			}
			if f.Changed("http-listen") {
				cfg.HTTPListen = o.httpListen
			}
			log, err := newLogger(cfg.LogLevel, cfg.LogFormat)
			if err != nil {
				return err
			}
			defer log.Sync() //nolint:errcheck // stderr sync errors are not actionable
			ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			return serve(ctx, cfg, os.Getenv("KEYGATE_ADMIN_TOKEN"), log)
		},
	}
	f := c.Flags()
	f.StringVar(&o.config, "config", "", "config file (YAML); default: the built-in example config")
	f.StringVar(&o.db, "db", config.DefaultDB, "bbolt store file")
	f.StringVar(&o.listen, "listen", config.DefaultListen, "address for ext_authz Checks and grpc.health.v1")
	f.StringVar(&o.adminListen, "admin-listen", config.DefaultAdminListen, "address for the admin API")
	f.StringVar(&o.httpListen, "http-listen", config.DefaultHTTPListen, "address for /metrics, /healthz and /readyz")
	return c
}

func newLogger(level, format string) (*zap.Logger, error) {
	zc := zap.NewProductionConfig()
	if format == "console" {
		zc = zap.NewDevelopmentConfig()
	}
	lvl, err := zapcore.ParseLevel(level)
	if err != nil {
		return nil, err
	}
	zc.Level = zap.NewAtomicLevelAt(lvl)
	zc.Sampling = nil
	zc.DisableStacktrace = true // errors say what happened; stacks are for panics
	zc.OutputPaths = []string{"stderr"}
	return zc.Build()
}

// serve runs keygate until ctx is done, then stops in the order money needs:
// readiness off, new Checks refused, in-flight Checks drained, and only then
// the final ledger flush.
func serve(ctx context.Context, cfg *config.Config, adminToken string, log *zap.Logger) error {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	// The store hands each flush's alerts to the notifier, which needs the
	// store as its outbox: the callback reaches the notifier made below
	// (the store raises no alert before Run and Close, which come later).
	var notifier *alert.Notifier
	opts := keystore.Options{
		Log: log.Named("keystore"), Metrics: reg,
		AlertThresholds: cfg.Alerts.Thresholds,
		Outbox:          cfg.Alerts.WebhookURL != "",
		OnAlert: func(a []keystore.Alert) {
			if notifier != nil { // nil only if serve fails before it starts
				notifier.Notify(a)
			}
		},
	}
	// A benchmark knob, not a setting: the design promises a flush at least
	// once a second, which only the default keeps. The load benchmark uses
	// it to build up a large flush on purpose.
	if v := os.Getenv("KEYGATE_FLUSH_INTERVAL"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			return fmt.Errorf("KEYGATE_FLUSH_INTERVAL %q: want a positive Go duration", v)
		}
		log.Warn("ledger flush interval set from KEYGATE_FLUSH_INTERVAL", zap.Duration("interval", d))
		opts.FlushInterval = d
	}
	be, err := openBackend(cfg, opts, log, reg)
	if err != nil {
		return err
	}
	store := be.local
	storeClosed := false
	defer func() {
		if !storeClosed {
			be.close() //nolint:errcheck // an earlier error is being returned
		}
	}()

	notifier, err = alert.New(alert.Config{
		URL: cfg.Alerts.WebhookURL, Secret: cfg.Alerts.Secret, Outbox: store,
		Log: log.Named("alerts"), Metrics: reg,
	})
	if err != nil {
		return err
	}

	az, err := authz.New(authz.Config{
		Keys: be.keys, Routes: cfg.Routes, Limiter: be.limiter, TierRate: cfg.TierRate,
		Log: log.Named("authz"), Metrics: reg,
		OnResponse: cfg.Settle == config.SettleOnResponse, SettleTimeout: cfg.SettleTimeout,
	})
	if err != nil {
		return err
	}
	// The access-log service is served in both modes: in on_check mode no
	// request holds a reservation, and entries are ignored as unknown.
	als, err := settle.New(settle.Config{Ledger: be.settler, Log: log.Named("settle"), Metrics: reg})
	if err != nil {
		return err
	}

	// Bind every address before serving anything, so a taken port fails the
	// start instead of leaving a half-working server.
	checkLis, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen (ext_authz): %w", err)
	}
	adminLis, err := net.Listen("tcp", cfg.AdminListen)
	if err != nil {
		checkLis.Close()
		return fmt.Errorf("admin listen: %w", err)
	}
	httpLis, err := net.Listen("tcp", cfg.HTTPListen)
	if err != nil {
		checkLis.Close()
		adminLis.Close()
		return fmt.Errorf("http listen: %w", err)
	}

	checkSrv := authz.NewGRPCServer(az, grpc.ChainUnaryInterceptor(recoverUnary(log)))
	als.Register(checkSrv)
	hs := health.NewServer()
	healthpb.RegisterHealthServer(checkSrv, hs)
	hs.SetServingStatus(authv3.Authorization_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)

	adminSrv := grpc.NewServer(grpc.ChainUnaryInterceptor(recoverUnary(log), admin.RequireToken(adminToken)))
	adminv1.RegisterAdminServer(adminSrv, admin.New(be.admin, cfg))

	var ready atomic.Bool
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !ready.Load() {
			http.Error(w, "draining", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	if os.Getenv("KEYGATE_PPROF") == "1" {
		// Profiling on demand: the listener is local by default, and
		// profiles hold no secrets (only code locations and counts).
		mux.HandleFunc("GET /debug/pprof/", pprof.Index)
		mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
		log.Info("KEYGATE_PPROF=1: serving /debug/pprof/ on the http listener")
	}
	httpSrv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}

	if cfg.BuiltIn {
		log.Info("no --config given: using the built-in example config (tiers free and tier1; routes for chat, embeddings and images)")
	}
	if adminToken == "" {
		log.Warn("KEYGATE_ADMIN_TOKEN is not set: the admin API refuses every call")
	}
	log.Info("keygate serving",
		zap.String("version", version), zap.String("db", cfg.DB),
		zap.String("listen", checkLis.Addr().String()), zap.String("admin_listen", adminLis.Addr().String()),
		zap.String("http_listen", httpLis.Addr().String()),
		zap.Strings("scopes", cfg.Routes.Scopes()),
		zap.String("store", string(cfg.Store)),
		zap.String("settle", string(cfg.Settle)), zap.Bool("alert_webhook", cfg.Alerts.WebhookURL != ""))
	ready.Store(true)

	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return serveGRPC(checkSrv, checkLis) })
	g.Go(func() error { return serveGRPC(adminSrv, adminLis) })
	g.Go(func() error {
		if err := httpSrv.Serve(httpLis); !errors.Is(err, http.ErrServerClosed) {
			return err
		}
		return nil
	})
	for _, loop := range be.loops {
		g.Go(func() error { return loop(gctx) })
	}
	g.Go(func() error { return notifier.Run(gctx) })
	g.Go(func() error {
		<-gctx.Done()
		log.Info("stopping: draining in-flight checks")
		ready.Store(false)
		hs.Shutdown() // grpc health reports NOT_SERVING first
		adminSrv.GracefulStop()
		// Access-log streams never end on their own: they are closed, and
		// what Envoy still sends waits for the next keygate (reservations
		// are written by the final flush, and expire if never settled).
		als.Close()
		drain(checkSrv, drainTimeout) // in-flight Checks finish and may still debit...
		shutCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return httpSrv.Shutdown(shutCtx)
	})
	runErr := g.Wait()
	storeClosed = true
	if err := be.close(); err != nil { // ...so the last flush comes after them
		return errors.Join(runErr, fmt.Errorf("final ledger flush: %w", err))
	}
	log.Info("stopped: ledger flushed")
	return runErr
}

func serveGRPC(s *grpc.Server, lis net.Listener) error {
	if err := s.Serve(lis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return err
	}
	return nil
}

// drain stops s gracefully, cutting what is left after timeout.
func drain(s *grpc.Server, timeout time.Duration) {
	done := make(chan struct{})
	go func() { s.GracefulStop(); close(done) }()
	select {
	case <-done:
	case <-time.After(timeout):
		s.Stop()
		<-done
	}
}

// recoverUnary turns a panic in a handler into an INTERNAL error (Envoy then
// denies, failure_mode_allow being false) instead of a crashed sidecar.
func recoverUnary(log *zap.Logger) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (resp any, err error) {
		defer func() {
			if r := recover(); r != nil {
				log.Error("panic in handler", zap.String("method", info.FullMethod), zap.Any("panic", r), zap.Stack("stack"))
				err = status.Error(codes.Internal, "internal error")
			}
		}()
		return h(ctx, req)
	}
}
