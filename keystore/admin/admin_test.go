package admin_test

import (
	"context"
	"net"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	"github.com/keygate/keygate/cmd/keygate/config"
	"github.com/keygate/keygate/keystore/admin"
	"github.com/keygate/keygate/keystore/keystoretest"
	adminv1 "github.com/keygate/keygate/proto/keygate/admin/v1"
)

// serve runs the admin API with token over a real store and returns a client.
func serve(t *testing.T, token string) adminv1.AdminClient {
	t.Helper()
	cfg, err := config.Load("")
	if err != nil {
		t.Fatal(err)
	}
	lis := bufconn.Listen(1 << 20)
	gs := grpc.NewServer(grpc.UnaryInterceptor(admin.RequireToken(token)))
	adminv1.RegisterAdminServer(gs, admin.New(keystoretest.Open(t), cfg))
	go gs.Serve(lis) //nolint:errcheck
	t.Cleanup(gs.Stop)
	cc, err := grpc.NewClient("passthrough:///admin",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return adminv1.NewAdminClient(cc)
}

func withToken(tok string) context.Context {
	return metadata.AppendToOutgoingContext(context.Background(), admin.TokenHeader, "Bearer "+tok)
}

func TestRequireToken(t *testing.T) {
	tests := []struct {
		name   string
		server string
		ctx    context.Context
		want   codes.Code
	}{
		{"right token", "s3cret", withToken("s3cret"), codes.OK},
		{"no token", "s3cret", context.Background(), codes.Unauthenticated},
		{"wrong token", "s3cret", withToken("s3creT"), codes.Unauthenticated},
		{"token as prefix", "s3cret", withToken("s3cretx"), codes.Unauthenticated},
		{"server without a token", "", withToken(""), codes.Unauthenticated},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := serve(t, tt.server).ListAccounts(tt.ctx, &adminv1.ListAccountsRequest{})
			if got := status.Code(err); got != tt.want {
				t.Fatalf("code %v, want %v (%v)", got, tt.want, err)
			}
		})
	}
}

func TestValidation(t *testing.T) {
	c := serve(t, "t")
	ctx := withToken("t")
	if _, err := c.CreateAccount(ctx, &adminv1.CreateAccountRequest{Id: "acme", BalanceUsd: "1"}); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		call func() error
		code codes.Code
		msg  string
	}{
		{"unknown scope", func() error {
			_, err := c.CreateKey(ctx, &adminv1.CreateKeyRequest{Account: "acme", Scopes: []string{"chat:wirte"}})
			return err
		}, codes.InvalidArgument, `scope "chat:wirte" is not used by any route`},
		{"no scopes", func() error {
			_, err := c.CreateKey(ctx, &adminv1.CreateKeyRequest{Account: "acme"})
			return err
		}, codes.InvalidArgument, "at least one scope"},
		{"unknown account", func() error {
			_, err := c.CreateKey(ctx, &adminv1.CreateKeyRequest{Account: "nope", Scopes: []string{"chat:read"}})
			return err
		}, codes.NotFound, "account not found"},
		{"bad rate", func() error {
			_, err := c.CreateKey(ctx, &adminv1.CreateKeyRequest{Account: "acme", Scopes: []string{"chat:read"}, RateLimit: "5/x"})
			return err
		}, codes.InvalidArgument, "5/x"},
		{"over-precise cap", func() error {
			_, err := c.CreateKey(ctx, &adminv1.CreateKeyRequest{Account: "acme", Scopes: []string{"chat:read"}, SpendCapUsd: "0.0000001"})
			return err
		}, codes.InvalidArgument, "spend cap"},
		{"bad expiry", func() error {
			_, err := c.CreateKey(ctx, &adminv1.CreateKeyRequest{Account: "acme", Scopes: []string{"chat:read"}, ExpiresIn: "soon"})
			return err
		}, codes.InvalidArgument, "expires in"},
		{"unknown tier", func() error {
			_, err := c.CreateAccount(ctx, &adminv1.CreateAccountRequest{Id: "b", Tier: "gold"})
			return err
		}, codes.InvalidArgument, `tier "gold"`},
		{"duplicate account", func() error {
			_, err := c.CreateAccount(ctx, &adminv1.CreateAccountRequest{Id: "acme"})
			return err
		}, codes.AlreadyExists, "exists"},
		{"zero credit", func() error {
			_, err := c.CreditAccount(ctx, &adminv1.CreditAccountRequest{Id: "acme", AmountUsd: "0"})
			return err
		}, codes.InvalidArgument, "greater than 0"},
		{"unknown key", func() error {
			_, err := c.RevokeKey(ctx, &adminv1.RevokeKeyRequest{Id: "key_nope"})
			return err
		}, codes.NotFound, "key not found"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.call()
			if status.Code(err) != tt.code || !strings.Contains(admin.Describe(err), tt.msg) {
				t.Fatalf("got %v %q, want %v containing %q", status.Code(err), admin.Describe(err), tt.code, tt.msg)
			}
		})
	}
	keys, err := c.ListKeys(ctx, &adminv1.ListKeysRequest{})
	if err != nil || len(keys.GetKeys()) != 0 {
		t.Fatalf("refused calls created keys: %v %v", keys, err)
	}
}

func TestRotateKeepsLimits(t *testing.T) {
	c := serve(t, "t")
	ctx := withToken("t")
	if _, err := c.CreateAccount(ctx, &adminv1.CreateAccountRequest{Id: "acme", Tier: "tier1"}); err != nil {
		t.Fatal(err)
	}
	k, err := c.CreateKey(ctx, &adminv1.CreateKeyRequest{Account: "acme", Scopes: []string{"chat:read", "chat:write"},
		RateLimit: "5/s", SpendCapUsd: "2.5", Name: "prod"})
	if err != nil {
		t.Fatal(err)
	}
	r, err := c.RotateKey(ctx, &adminv1.RotateKeyRequest{Id: k.GetKey().GetId(), Grace: "1h"})
	if err != nil {
		t.Fatal(err)
	}
	nk, old := r.GetKey(), r.GetOldKey()
	if nk.GetAccount() != "acme" || nk.GetRateLimit() != "5/s" || nk.GetSpendCapMicros() != 2_500_000 ||
		strings.Join(nk.GetScopes(), ",") != "chat:read,chat:write" || r.GetSecret() == "" || nk.GetId() == old.GetId() {
		t.Fatalf("rotated key %v does not carry the old one's settings", nk)
	}
	if old.GetState() != "active" || old.GetRotatedTo() != nk.GetId() || old.GetRevokedAt() == nil {
		t.Fatalf("old key during its grace: %v", old)
	}
	tierKey, err := c.CreateKey(ctx, &adminv1.CreateKeyRequest{Account: "acme", Scopes: []string{"chat:read"}})
	if err != nil {
		t.Fatal(err)
	}
	if got := tierKey.GetKey().GetEffectiveRateLimit(); got != "500/m" {
		t.Fatalf("effective rate limit of a tier1 key = %q, want 500/m", got)
	}
}
