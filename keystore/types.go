package keystore

import (
	"errors"
	"time"

	"github.com/keygate/keygate/authz/ratelimit"
	"github.com/keygate/keygate/keystore/money"
)

// Errors returned by Open.
var (
	// ErrLocked is returned when another process holds the file (a running
	// keygate serve): only one process may own a store at a time.
	ErrLocked = errors.New("the store is in use by another process")
	// ErrNotKeygate is returned for a file that is not a keygate store, or is
	// corrupt beyond bbolt's own checks.
	ErrNotKeygate = errors.New("not a keygate store")
	// ErrSchema is returned for a store written by a newer keygate.
	ErrSchema = errors.New("unsupported store schema version")
)

// Errors returned by admin mutations and reads.
var (
	// ErrClosed is returned by writes and Flush after Close.
	ErrClosed          = errors.New("the store is closed")
	ErrAccountNotFound = errors.New("account not found")
	ErrAccountExists   = errors.New("account already exists")
	ErrKeyNotFound     = errors.New("key not found")
	// ErrKeyInactive is returned when rotating a revoked or expired key.
	ErrKeyInactive = errors.New("key is revoked or expired")
	// ErrInvalid wraps every validation failure of an argument (a bad account
	// id, an empty scope list...); the message says which.
	ErrInvalid = errors.New("invalid argument")
)

// Errors returned by Debit and Reserve. Nothing changes when they fail.
var (
	ErrInsufficientBalance = errors.New("account balance is below the request's price")
	ErrSpendCap            = errors.New("key would exceed its spending cap")
	// ErrDuplicateRequest is returned by Reserve for a request ID that
	// already holds an open reservation.
	ErrDuplicateRequest = errors.New("request id already has an open reservation")
)

// Key states as shown to operators.
const (
	StateActive  = "active"
	StateRevoked = "revoked"
	StateExpired = "expired"
)

// Account is an account as an operator sees it. Balance includes every debit
// made so far, flushed to disk or not.
type Account struct {
	ID       string
	Tier     string
	Balance  money.Micros
	Reserved money.Micros // held by requests not yet settled; never counted in Balance
	// AlertBelow is the balance under which an account_balance_low alert
	// fires; 0: no alert.
	AlertBelow money.Micros
	CreatedAt  time.Time
}

// KeyInfo is a key as an operator sees it. It never holds the secret.
type KeyInfo struct {
	ID        string
	Account   string
	Name      string
	Scopes    []string
	RateLimit ratelimit.Rate // zero: the account tier's
	SpendCap  money.Micros   // zero: no cap
	Spent     money.Micros   // in the current cap period, including unflushed debits
	Reserved  money.Micros   // held by requests not yet settled; never counted in Spent
	CapPeriod Period
	// PeriodResetsAt is when Spent next goes back to 0; zero for PeriodNone.
	PeriodResetsAt time.Time
	CreatedAt      time.Time
	ExpiresAt      time.Time // zero: never
	RevokedAt      time.Time // zero: not revoked; in the future during a rotation's grace
	RotatedTo      string    // the key that replaced this one, if rotated
}

// State returns StateActive, StateRevoked or StateExpired at now.
func (k KeyInfo) State(now time.Time) string {
	switch {
	case !k.RevokedAt.IsZero() && !now.Before(k.RevokedAt):
		return StateRevoked
	case !k.ExpiresAt.IsZero() && !now.Before(k.ExpiresAt):
		return StateExpired
	}
	return StateActive
}

// NewKey is what CreateKey needs. Scopes are taken as given (the admin layer
// checks them against the route table).
type NewKey struct {
	Account   string
	Name      string
	Scopes    []string
	RateLimit ratelimit.Rate
	SpendCap  money.Micros
	CapPeriod Period // PeriodNone: the cap is for the key's lifetime
	ExpiresAt time.Time
}
