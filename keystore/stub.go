package keystore

// TEMPORARY: signatures only, replaced by the real implementation.

import (
	"context"
	"time"

	"go.uber.org/zap"

	"github.com/keygate/keygate/authz/ratelimit"
	"github.com/keygate/keygate/keystore/money"
	"github.com/prometheus/client_golang/prometheus"
)

type Options struct {
	Log           *zap.Logger
	LockTimeout   time.Duration
	FlushInterval time.Duration
	Metrics       prometheus.Registerer
}

type Store struct{}

type Key struct {
	ID        string
	Account   string
	Tier      string
	Scopes    []string
	RateLimit ratelimit.Rate
	SpendCap  money.Micros
}

func (k *Key) HasScope(scope string) bool  { return false }
func (k *Key) ActiveAt(now time.Time) bool { return false }
func ValidSecretFormat(secret string) bool { return false }

func Open(path string, o Options) (*Store, error) { return nil, nil }
func (s *Store) Run(ctx context.Context) error    { return nil }
func (s *Store) Flush() error                     { return nil }
func (s *Store) Close() error                     { return nil }
func (s *Store) CreateAccount(id, tier string, balance money.Micros, now time.Time) (Account, error) {
	return Account{}, nil
}
func (s *Store) Account(id string) (Account, error)                     { return Account{}, nil }
func (s *Store) Accounts() []Account                                    { return nil }
func (s *Store) Credit(id string, amount money.Micros) (Account, error) { return Account{}, nil }
func (s *Store) CreateKey(nk NewKey, now time.Time) (KeyInfo, string, error) {
	return KeyInfo{}, "", nil
}
func (s *Store) Key(id string) (KeyInfo, error)                   { return KeyInfo{}, nil }
func (s *Store) Keys(account string) []KeyInfo                    { return nil }
func (s *Store) Revoke(id string, now time.Time) (KeyInfo, error) { return KeyInfo{}, nil }
func (s *Store) Rotate(id string, grace time.Duration, now time.Time) (KeyInfo, KeyInfo, string, error) {
	return KeyInfo{}, KeyInfo{}, "", nil
}
func (s *Store) Lookup(secret string, now time.Time) (*Key, bool) { return nil, false }
func (s *Store) Debit(k *Key, price money.Micros) error           { return nil }
