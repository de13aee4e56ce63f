// Package admin serves keygate's admin API (proto/keygate/admin/v1) over a
// keystore.Store: the operator's way to issue, list, revoke and rotate keys
// and to manage accounts. Every mutation is durable when the call returns.
//
// The CLI uses the same Server in-process for --db mode, so both modes apply
// the same validation and give the same answers.
package admin

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/keygate/keygate/authz/ratelimit"
	"github.com/keygate/keygate/cmd/keygate/config"
	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/money"
	"github.com/keygate/keygate/keystore/rconn"
	adminv1 "github.com/keygate/keygate/proto/keygate/admin/v1"
)

// Store is what the admin API serves from: *keystore.Store (one bbolt
// file), or a store that keeps accounts and keys in Redis for several
// replicas. Lists return an error as well: a shared store can fail to
// answer.
type Store interface {
	CreateAccount(id, tier string, balance money.Micros, now time.Time, opts ...keystore.AccountOption) (keystore.Account, error)
	Account(id string) (keystore.Account, error)
	ListAccounts() ([]keystore.Account, error)
	Credit(id string, amount money.Micros, opts ...keystore.AccountOption) (keystore.Account, error)
	CreateKey(nk keystore.NewKey, now time.Time) (keystore.KeyInfo, string, error)
	Key(id string) (keystore.KeyInfo, error)
	ListKeys(account string) ([]keystore.KeyInfo, error)
	Revoke(id string, now time.Time) (keystore.KeyInfo, error)
	Rotate(id string, grace time.Duration, now time.Time) (old, nw keystore.KeyInfo, secret string, err error)
}

var _ Store = (*keystore.Store)(nil)

// Server implements adminv1.AdminServer.
type Server struct {
	adminv1.UnimplementedAdminServer

	store Store
	cfg   *config.Config
	now   func() time.Time
}

var _ adminv1.AdminServer = (*Server)(nil)

// New returns a Server over store; cfg supplies the routes (the scope guard)
// and the tiers. The store logs each mutation.
func New(store Store, cfg *config.Config) *Server {
	return &Server{store: store, cfg: cfg, now: time.Now}
}

func (s *Server) CreateAccount(_ context.Context, r *adminv1.CreateAccountRequest) (*adminv1.Account, error) {
	var bal money.Micros
	if r.GetBalanceUsd() != "" {
		b, err := money.ParseUSD(r.GetBalanceUsd())
		if err != nil {
			return nil, invalid("balance: %v", err)
		}
		bal = b
	}
	tier := r.GetTier()
	if tier == "" {
		tier = s.cfg.DefaultTier
	} else if _, ok := s.cfg.Tiers[tier]; !ok {
		return nil, invalid("tier %q is not defined in the config (tiers: %s)", tier, strings.Join(s.tierNames(), ", "))
	}
	opts, err := alertBelow(r.AlertBelowUsd)
	if err != nil {
		return nil, err
	}
	a, err := s.store.CreateAccount(r.GetId(), tier, bal, s.now(), opts...)
	if err != nil {
		return nil, toStatus(err)
	}
	return accountPB(a), nil
}

func (s *Server) GetAccount(_ context.Context, r *adminv1.GetAccountRequest) (*adminv1.Account, error) {
	a, err := s.store.Account(r.GetId())
	if err != nil {
		return nil, toStatus(err)
	}
	return accountPB(a), nil
}

func (s *Server) CreditAccount(_ context.Context, r *adminv1.CreditAccountRequest) (*adminv1.Account, error) {
	amt, err := money.ParseUSD(r.GetAmountUsd())
	if err != nil {
		return nil, invalid("amount: %v", err)
	}
	if amt == 0 {
		return nil, invalid("amount: must be greater than 0")
	}
	opts, err := alertBelow(r.AlertBelowUsd)
	if err != nil {
		return nil, err
	}
	a, err := s.store.Credit(r.GetId(), amt, opts...)
	if err != nil {
		return nil, toStatus(err)
	}
	return accountPB(a), nil
}

func (s *Server) ListAccounts(context.Context, *adminv1.ListAccountsRequest) (*adminv1.ListAccountsResponse, error) {
	all, err := s.store.ListAccounts()
	if err != nil {
		return nil, toStatus(err)
	}
	out := &adminv1.ListAccountsResponse{Accounts: []*adminv1.Account{}}
	for _, a := range all {
		out.Accounts = append(out.Accounts, accountPB(a))
	}
	return out, nil
}

func (s *Server) CreateKey(_ context.Context, r *adminv1.CreateKeyRequest) (*adminv1.CreateKeyResponse, error) {
	nk := keystore.NewKey{Account: r.GetAccount(), Name: r.GetName()}
	if nk.Account == "" {
		return nil, invalid("account is required (--account)")
	}
	if len(r.GetScopes()) == 0 {
		return nil, invalid("at least one scope is required (--scopes); scopes in use by routes: %s", strings.Join(s.cfg.Routes.Scopes(), ", "))
	}
	for _, sc := range r.GetScopes() {
		if !s.cfg.Routes.HasScope(sc) {
			return nil, invalid("scope %q is not used by any route (known scopes: %s)", sc, strings.Join(s.cfg.Routes.Scopes(), ", "))
		}
	}
	nk.Scopes = r.GetScopes()
	if r.GetRateLimit() != "" {
		rt, err := ratelimit.ParseRate(r.GetRateLimit())
		if err != nil {
			return nil, invalid("%v", err)
		}
		nk.RateLimit = rt
	}
	if r.GetSpendCapUsd() != "" {
		c, err := money.ParseUSD(r.GetSpendCapUsd())
		if err != nil {
			return nil, invalid("spend cap: %v", err)
		}
		if c == 0 {
			return nil, invalid("spend cap: must be greater than 0 (omit --spend-cap for no cap)")
		}
		nk.SpendCap = c
	}
	p, err := keystore.ParsePeriod(r.GetCapPeriod())
	if err != nil {
		return nil, toStatus(err)
	}
	nk.CapPeriod = p
	now := s.now()
	if r.GetExpiresIn() != "" {
		d, err := config.ParseDuration(r.GetExpiresIn())
		if err != nil {
			return nil, invalid("expires in: %v", err)
		}
		if d <= 0 {
			return nil, invalid("expires in: must be greater than 0 (omit --expires-in for a key that does not expire)")
		}
		nk.ExpiresAt = now.Add(d)
	}
	if _, err := s.store.Account(nk.Account); err != nil {
		return nil, toStatus(err)
	}
	k, secret, err := s.store.CreateKey(nk, now)
	if err != nil {
		return nil, toStatus(err)
	}
	return &adminv1.CreateKeyResponse{Key: s.keyPB(k, now), Secret: secret}, nil
}

func (s *Server) GetKey(_ context.Context, r *adminv1.GetKeyRequest) (*adminv1.Key, error) {
	k, err := s.store.Key(r.GetId())
	if err != nil {
		return nil, toStatus(err)
	}
	return s.keyPB(k, s.now()), nil
}

func (s *Server) ListKeys(_ context.Context, r *adminv1.ListKeysRequest) (*adminv1.ListKeysResponse, error) {
	if r.GetAccount() != "" {
		if _, err := s.store.Account(r.GetAccount()); err != nil {
			return nil, toStatus(err)
		}
	}
	now := s.now()
	keys, err := s.store.ListKeys(r.GetAccount())
	if err != nil {
		return nil, toStatus(err)
	}
	out := &adminv1.ListKeysResponse{Keys: []*adminv1.Key{}}
	for _, k := range keys {
		out.Keys = append(out.Keys, s.keyPB(k, now))
	}
	return out, nil
}

func (s *Server) RevokeKey(_ context.Context, r *adminv1.RevokeKeyRequest) (*adminv1.Key, error) {
	now := s.now()
	k, err := s.store.Revoke(r.GetId(), now)
	if err != nil {
		return nil, toStatus(err)
	}
	return s.keyPB(k, now), nil
}

func (s *Server) RotateKey(_ context.Context, r *adminv1.RotateKeyRequest) (*adminv1.RotateKeyResponse, error) {
	var grace time.Duration
	if r.GetGrace() != "" {
		d, err := config.ParseDuration(r.GetGrace())
		if err != nil {
			return nil, invalid("grace: %v", err)
		}
		grace = d
	}
	now := s.now()
	old, nw, secret, err := s.store.Rotate(r.GetId(), grace, now)
	if err != nil {
		return nil, toStatus(err)
	}
	return &adminv1.RotateKeyResponse{Key: s.keyPB(nw, now), Secret: secret, OldKey: s.keyPB(old, now)}, nil
}

// alertBelow reads an optional alert_below_usd: unset changes nothing, and
// a set value, "0" included, becomes the option that sets it.
func alertBelow(usd *string) ([]keystore.AccountOption, error) {
	if usd == nil {
		return nil, nil
	}
	m, err := money.ParseUSD(*usd)
	if err != nil {
		return nil, invalid("alert below: %v", err)
	}
	return []keystore.AccountOption{keystore.WithAlertBelow(m)}, nil
}

func (s *Server) tierNames() []string {
	names := slices.Sorted(maps.Keys(s.cfg.File.Tiers))
	if len(names) == 0 {
		return []string{"none"}
	}
	return names
}

func accountPB(a keystore.Account) *adminv1.Account {
	return &adminv1.Account{
		Id: a.ID, Tier: a.Tier,
		BalanceMicros: int64(a.Balance), ReservedMicros: int64(a.Reserved),
		AlertBelowMicros: int64(a.AlertBelow),
		CreatedAt:        ts(a.CreatedAt),
	}
}

func (s *Server) keyPB(k keystore.KeyInfo, now time.Time) *adminv1.Key {
	eff := k.RateLimit
	if eff.IsZero() {
		eff, _ = s.cfg.TierRate(s.accountTier(k.Account))
	}
	return &adminv1.Key{
		Id: k.ID, Account: k.Account, Name: k.Name, Scopes: k.Scopes,
		State:              k.State(now),
		RateLimit:          k.RateLimit.String(),
		EffectiveRateLimit: eff.String(),
		SpendCapMicros:     int64(k.SpendCap),
		SpentMicros:        int64(k.Spent),
		ReservedMicros:     int64(k.Reserved),
		CreatedAt:          ts(k.CreatedAt),
		ExpiresAt:          ts(k.ExpiresAt),
		RevokedAt:          ts(k.RevokedAt),
		RotatedTo:          k.RotatedTo,
		CapPeriod:          k.CapPeriod.String(),
		PeriodResetsAt:     ts(k.PeriodResetsAt),
	}
}

func (s *Server) accountTier(id string) string {
	a, err := s.store.Account(id)
	if err != nil {
		return ""
	}
	return a.Tier
}

func ts(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}

func invalid(format string, args ...any) error {
	return status.Errorf(codes.InvalidArgument, format, args...)
}

// toStatus maps keystore errors to gRPC codes once, at the edge.
func toStatus(err error) error {
	switch {
	case errors.Is(err, keystore.ErrAccountNotFound), errors.Is(err, keystore.ErrKeyNotFound):
		return status.Error(codes.NotFound, err.Error())
	case errors.Is(err, keystore.ErrAccountExists):
		return status.Error(codes.AlreadyExists, err.Error())
	case errors.Is(err, keystore.ErrInvalid):
		return status.Error(codes.InvalidArgument, err.Error())
	case errors.Is(err, keystore.ErrKeyInactive), errors.Is(err, rconn.ErrDataLost):
		return status.Error(codes.FailedPrecondition, err.Error())
	case rconn.IsUnavailable(err):
		return status.Error(codes.Unavailable, err.Error())
	}
	return status.Error(codes.Internal, err.Error())
}

// TokenHeader is the metadata key that carries the admin token.
const TokenHeader = "authorization"

// RequireToken refuses every call that does not carry "Bearer <token>". An
// empty token refuses everything: a server started without
// KEYGATE_ADMIN_TOKEN has no admin API rather than an open one.
func RequireToken(token string) grpc.UnaryServerInterceptor {
	want := []byte("Bearer " + token)
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		if token == "" {
			return nil, status.Error(codes.Unauthenticated, "the admin API is disabled: this server was started without KEYGATE_ADMIN_TOKEN")
		}
		md, _ := metadata.FromIncomingContext(ctx)
		got := md.Get(TokenHeader)
		if len(got) != 1 || subtle.ConstantTimeCompare([]byte(got[0]), want) != 1 {
			return nil, status.Error(codes.Unauthenticated, "missing or wrong admin token (set KEYGATE_ADMIN_TOKEN to the server's token)")
		}
		return h(ctx, req)
	}
}

// Describe renders err for a human: the gRPC status message without the
// "rpc error: code = ..." wrapping.
func Describe(err error) string {
	if st, ok := status.FromError(err); ok {
		return st.Message()
	}
	return fmt.Sprint(err)
}
