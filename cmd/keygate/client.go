package main

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"time"

	"github.com/spf13/cobra"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	"github.com/keygate/keygate/cmd/keygate/config"
	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/admin"
	adminv1 "github.com/keygate/keygate/proto/keygate/admin/v1"
)

// adminFlags are accepted by every admin command.
type adminFlags struct {
	server string
	db     string
	config string
	output string
}

func (a *adminFlags) register(c *cobra.Command) {
	f := c.PersistentFlags()
	f.StringVar(&a.server, "server", config.DefaultAdminListen, "admin API address of a running keygate serve")
	f.StringVar(&a.db, "db", "", "open this store file directly instead of going through a server (no server may be running on it)")
	f.StringVar(&a.config, "config", "", "with --db: config file whose routes and tiers validate scopes and tiers (default: the built-in example)")
	f.StringVarP(&a.output, "output", "o", "table", "output format: table or json")
}

func (a *adminFlags) validate(c *cobra.Command) error {
	if a.output != "table" && a.output != "json" {
		return fmt.Errorf("-o %q: want table or json", a.output)
	}
	if a.db != "" && c.Flags().Changed("server") {
		return errors.New("--db and --server are exclusive: --db opens the file directly, --server goes through a running keygate")
	}
	if a.db == "" && c.Flags().Changed("config") {
		return errors.New("--config applies only with --db; a running server uses its own config")
	}
	return nil
}

const adminTimeout = 15 * time.Second

// connect returns an admin client and a function to release it. Through a
// server it is a gRPC client carrying the admin token; with --db the same
// admin service runs in-process over the opened store, reached through an
// in-memory connection, so both modes validate and answer alike.
func (a *adminFlags) connect(c *cobra.Command) (adminv1.AdminClient, context.Context, func(), error) {
	if err := a.validate(c); err != nil {
		return nil, nil, nil, err
	}
	ctx, cancel := context.WithTimeout(c.Context(), adminTimeout)
	if a.db == "" {
		tok := os.Getenv("KEYGATE_ADMIN_TOKEN")
		if tok == "" {
			cancel()
			return nil, nil, nil, errors.New("KEYGATE_ADMIN_TOKEN is not set: export the token the server was started with (or use --db PATH on a stopped server's file)")
		}
		ctx = metadata.AppendToOutgoingContext(ctx, admin.TokenHeader, "Bearer "+tok)
		cc, err := grpc.NewClient(a.server, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			cancel()
			return nil, nil, nil, fmt.Errorf("--server %s: %w", a.server, err)
		}
		return adminv1.NewAdminClient(cc), ctx, func() { cancel(); cc.Close() }, nil
	}

	if c.Name() == "get" || c.Name() == "list" {
		// A read must not leave an empty store behind a mistyped path.
		if _, err := os.Stat(a.db); errors.Is(err, fs.ErrNotExist) {
			cancel()
			return nil, nil, nil, fmt.Errorf("--db %s: no such store file", a.db)
		}
	}
	cfg, err := config.Load(a.config)
	if err != nil {
		cancel()
		return nil, nil, nil, err
	}
	// With store: redis in the config, the file is this machine's mirror
	// and the command goes to Redis, as a server's admin API would.
	if cfg.Store == config.StoreRedis {
		cancel()
		return nil, nil, nil, fmt.Errorf("--db %s: with store: redis the local file is a replica's cache of key records, not an admin target: run the command through any replica with --server", a.db)
	}
	cfg.DB = a.db
	be, err := openBackend(cfg, keystore.Options{LockTimeout: time.Second}, zap.NewNop(), nil)
	if err != nil {
		cancel()
		if errors.Is(err, keystore.ErrLocked) {
			return nil, nil, nil, fmt.Errorf("%s is in use by a running keygate serve: run the command through it with --server instead of --db", a.db)
		}
		return nil, nil, nil, err
	}
	lis := bufconn.Listen(1 << 20)
	gs := grpc.NewServer()
	adminv1.RegisterAdminServer(gs, admin.New(be.admin, cfg))
	go gs.Serve(lis) //nolint:errcheck // ends with gs.Stop below
	cc, err := grpc.NewClient("passthrough:///keygate-db",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		cancel()
		gs.Stop()
		be.close() //nolint:errcheck // the dial error matters more
		return nil, nil, nil, err
	}
	release := func() {
		cancel()
		cc.Close()
		gs.Stop()
		if err := be.close(); err != nil {
			fmt.Fprintf(c.ErrOrStderr(), "keygate: closing %s: %v\n", a.db, err)
		}
	}
	return adminv1.NewAdminClient(cc), ctx, release, nil
}

// do runs fn with an admin client, and turns a failed call's error into a
// message for humans.
func (a *adminFlags) do(c *cobra.Command, fn func(context.Context, adminv1.AdminClient) error) error {
	cl, ctx, release, err := a.connect(c)
	if err != nil {
		return err
	}
	defer release()
	if err := fn(ctx, cl); err != nil {
		if _, ok := status.FromError(err); ok {
			return a.callErr(err)
		}
		return err
	}
	return nil
}

// callErr turns a failed admin call into a message that names the problem
// without gRPC's framing, and says what to do when the server is unreachable.
func (a *adminFlags) callErr(err error) error {
	msg := admin.Describe(err)
	if isUnavailable(err) {
		return fmt.Errorf("cannot reach keygate at %s (is `keygate serve` running? use --server ADDR, or --db PATH on a stopped server's file): %s", a.server, msg)
	}
	return errors.New(msg)
}
