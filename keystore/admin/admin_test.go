package admin_test

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"
	"google.golang.org/protobuf/proto"

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
		{"unknown cap period", func() error {
			_, err := c.CreateKey(ctx, &adminv1.CreateKeyRequest{Account: "acme", Scopes: []string{"chat:read"}, CapPeriod: "week"})
			return err
		}, codes.InvalidArgument, `cap period "week"`},
		{"cap period in capitals", func() error {
			_, err := c.CreateKey(ctx, &adminv1.CreateKeyRequest{Account: "acme", Scopes: []string{"chat:read"}, CapPeriod: "Month"})
			return err
		}, codes.InvalidArgument, `cap period "Month"`},
		{"negative alert on create", func() error {
			_, err := c.CreateAccount(ctx, &adminv1.CreateAccountRequest{Id: "neg", AlertBelowUsd: proto.String("-1")})
			return err
		}, codes.InvalidArgument, `alert below: "-1": negative`},
		{"over-precise alert on create", func() error {
			_, err := c.CreateAccount(ctx, &adminv1.CreateAccountRequest{Id: "prec", AlertBelowUsd: proto.String("0.0000001")})
			return err
		}, codes.InvalidArgument, `alert below: "0.0000001"`},
		{"empty alert on create", func() error {
			_, err := c.CreateAccount(ctx, &adminv1.CreateAccountRequest{Id: "empty", AlertBelowUsd: proto.String("")})
			return err
		}, codes.InvalidArgument, "alert below"},
		{"bad alert on credit", func() error {
			_, err := c.CreditAccount(ctx, &adminv1.CreditAccountRequest{Id: "acme", AmountUsd: "1", AlertBelowUsd: proto.String("ten")})
			return err
		}, codes.InvalidArgument, `alert below: "ten"`},
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
	accts, err := c.ListAccounts(ctx, &adminv1.ListAccountsRequest{})
	if err != nil || len(accts.GetAccounts()) != 1 {
		t.Fatalf("refused calls created accounts: %v %v", accts, err)
	}
	if a := accts.GetAccounts()[0]; a.GetBalanceMicros() != 1_000_000 || a.GetAlertBelowMicros() != 0 {
		t.Fatalf("refused credits changed the account: %v", a)
	}
}

// TestAlertBelow follows an account's alert level through create, credit
// and get: set when given, kept when a credit leaves it out, removed by 0.
func TestAlertBelow(t *testing.T) {
	c := serve(t, "t")
	ctx := withToken("t")
	steps := []struct {
		name string
		call func() (*adminv1.Account, error)
		want int64
	}{
		{"create without", func() (*adminv1.Account, error) {
			return c.CreateAccount(ctx, &adminv1.CreateAccountRequest{Id: "plain", BalanceUsd: "1"})
		}, 0},
		{"create with", func() (*adminv1.Account, error) {
			return c.CreateAccount(ctx, &adminv1.CreateAccountRequest{Id: "acme", BalanceUsd: "10", AlertBelowUsd: proto.String("5")})
		}, 5_000_000},
		{"get", func() (*adminv1.Account, error) {
			return c.GetAccount(ctx, &adminv1.GetAccountRequest{Id: "acme"})
		}, 5_000_000},
		{"credit leaving it out", func() (*adminv1.Account, error) {
			return c.CreditAccount(ctx, &adminv1.CreditAccountRequest{Id: "acme", AmountUsd: "1"})
		}, 5_000_000},
		{"credit changing it", func() (*adminv1.Account, error) {
			return c.CreditAccount(ctx, &adminv1.CreditAccountRequest{Id: "acme", AmountUsd: "1", AlertBelowUsd: proto.String("2.000001")})
		}, 2_000_001},
		{"credit removing it", func() (*adminv1.Account, error) {
			return c.CreditAccount(ctx, &adminv1.CreditAccountRequest{Id: "acme", AmountUsd: "1", AlertBelowUsd: proto.String("0")})
		}, 0},
		{"get after removal", func() (*adminv1.Account, error) {
			return c.GetAccount(ctx, &adminv1.GetAccountRequest{Id: "acme"})
		}, 0},
	}
	for _, st := range steps {
		a, err := st.call()
		if err != nil {
			t.Fatalf("%s: %v", st.name, err)
		}
		if got := a.GetAlertBelowMicros(); got != st.want {
			t.Fatalf("%s: alert_below_micros = %d, want %d (%v)", st.name, got, st.want, a)
		}
	}
	a, err := c.GetAccount(ctx, &adminv1.GetAccountRequest{Id: "acme"})
	if err != nil {
		t.Fatal(err)
	}
	if got := a.GetBalanceMicros(); got != 13_000_000 {
		t.Fatalf("balance after three credits of 1 = %d, want 13000000", got)
	}
}

// TestCapPeriod creates a key per period and reads it back every way: the
// period and its reset time must agree between create, get and list.
func TestCapPeriod(t *testing.T) {
	c := serve(t, "t")
	ctx := withToken("t")
	if _, err := c.CreateAccount(ctx, &adminv1.CreateAccountRequest{Id: "acme", BalanceUsd: "1"}); err != nil {
		t.Fatal(err)
	}
	// The server reads its own clock: a reset time is right if it follows
	// either the time before the call or the time after it.
	nextDay := func(t time.Time) time.Time {
		y, m, d := t.UTC().Date()
		return time.Date(y, m, d+1, 0, 0, 0, 0, time.UTC)
	}
	nextMonth := func(t time.Time) time.Time {
		y, m, _ := t.UTC().Date()
		return time.Date(y, m+1, 1, 0, 0, 0, 0, time.UTC)
	}
	tests := []struct {
		period string
		want   string
		reset  func(time.Time) time.Time // nil: no reset time
	}{
		{"", "none", nil}, // unset
		{"none", "none", nil},
		{"day", "day", nextDay},
		{"month", "month", nextMonth},
	}
	for _, tt := range tests {
		t.Run("period="+tt.period, func(t *testing.T) {
			before := time.Now()
			r, err := c.CreateKey(ctx, &adminv1.CreateKeyRequest{Account: "acme", Scopes: []string{"chat:read"},
				SpendCapUsd: "1", CapPeriod: tt.period})
			after := time.Now()
			if err != nil {
				t.Fatal(err)
			}
			got, err := c.GetKey(ctx, &adminv1.GetKeyRequest{Id: r.GetKey().GetId()})
			if err != nil {
				t.Fatal(err)
			}
			list, err := c.ListKeys(ctx, &adminv1.ListKeysRequest{Account: "acme"})
			if err != nil {
				t.Fatal(err)
			}
			var listed *adminv1.Key
			for _, k := range list.GetKeys() {
				if k.GetId() == got.GetId() {
					listed = k
				}
			}
			for _, k := range []*adminv1.Key{r.GetKey(), got, listed} {
				if k.GetCapPeriod() != tt.want {
					t.Errorf("cap_period = %q, want %q (%v)", k.GetCapPeriod(), tt.want, k)
				}
				if tt.reset == nil {
					if k.GetPeriodResetsAt() != nil {
						t.Errorf("period_resets_at = %v, want unset for %q", k.GetPeriodResetsAt().AsTime(), tt.want)
					}
					continue
				}
				at := k.GetPeriodResetsAt().AsTime()
				if k.GetPeriodResetsAt() == nil || (!at.Equal(tt.reset(before)) && !at.Equal(tt.reset(after))) {
					t.Errorf("period_resets_at = %v, want %v", k.GetPeriodResetsAt(), tt.reset(after))
				}
			}
		})
	}
}

func TestRotateKeepsLimits(t *testing.T) {
	c := serve(t, "t")
	ctx := withToken("t")
	if _, err := c.CreateAccount(ctx, &adminv1.CreateAccountRequest{Id: "acme", Tier: "tier1"}); err != nil {
		t.Fatal(err)
	}
	k, err := c.CreateKey(ctx, &adminv1.CreateKeyRequest{Account: "acme", Scopes: []string{"chat:read", "chat:write"},
		RateLimit: "5/s", SpendCapUsd: "2.5", CapPeriod: "month", Name: "prod"})
	if err != nil {
		t.Fatal(err)
	}
	r, err := c.RotateKey(ctx, &adminv1.RotateKeyRequest{Id: k.GetKey().GetId(), Grace: "1h"})
	if err != nil {
		t.Fatal(err)
	}
	nk, old := r.GetKey(), r.GetOldKey()
	if nk.GetAccount() != "acme" || nk.GetRateLimit() != "5/s" || nk.GetSpendCapMicros() != 2_500_000 ||
		strings.Join(nk.GetScopes(), ",") != "chat:read,chat:write" || r.GetSecret() == "" || nk.GetId() == old.GetId() ||
		nk.GetCapPeriod() != "month" || nk.GetPeriodResetsAt() == nil {
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
