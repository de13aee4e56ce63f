package redisstore

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/money"
)

// casAttempts bounds the retries of a compare-and-set on a key record that
// other admin commands keep changing (in practice one attempt does).
const casAttempts = 5

// CreateAccount creates an account with an opening balance in Redis, as
// keystore.Store.CreateAccount does (ErrInvalid, ErrAccountExists).
func (s *Store) CreateAccount(id, tier string, balance money.Micros, now time.Time, opts ...keystore.AccountOption) (keystore.Account, error) {
	rec, err := keystore.NewAccountRecord(id, tier, balance, now, opts...)
	if err != nil {
		return keystore.Account{}, err
	}
	op := "create account " + id
	if err := s.writable(op); err != nil {
		return keystore.Account{}, err
	}
	r, ctx, cancel := s.client(s.timeout)
	defer cancel()
	v, err := createAccountScript.Run(ctx, r,
		[]string{s.acctKey(id), s.accountsKey(), s.versionKey(), s.changesKey()},
		id, tier, rec.CreatedAt.UnixNano(), int64(rec.AlertBelow), int64(balance), streamMaxLen, s.replica).Int64()
	if err != nil {
		return keystore.Account{}, redisErr(op, err)
	}
	if v == 0 {
		return keystore.Account{}, fmt.Errorf("%w: %s", keystore.ErrAccountExists, id)
	}
	s.mirrorAfter(op, []string{id}, nil)
	s.log.Info("account created", zap.String("account", id), zap.String("tier", tier),
		zap.Int64("balance_micros", int64(balance)))
	return accountInfo(&rec, acctAmounts{bal: balance}), nil
}

// Account returns an account with the balance Redis holds: what every
// replica's reports have charged, without what is leased but not spent.
func (s *Store) Account(id string) (keystore.Account, error) {
	op := "account " + id
	if err := s.ready(op); err != nil {
		return keystore.Account{}, err
	}
	r, ctx, cancel := s.client(s.timeout)
	defer cancel()
	vals, err := r.HMGet(ctx, s.acctKey(id), accountFields...).Result()
	if err != nil {
		return keystore.Account{}, redisErr(op, err)
	}
	rec, amt, found, err := parseAccount(id, vals)
	switch {
	case err != nil:
		return keystore.Account{}, err
	case !found:
		return keystore.Account{}, fmt.Errorf("%w: %s", keystore.ErrAccountNotFound, id)
	}
	return accountInfo(&rec, amt), nil
}

// ListAccounts returns every account, sorted by ID.
func (s *Store) ListAccounts() ([]keystore.Account, error) {
	if err := s.ready("list accounts"); err != nil {
		return nil, err
	}
	r, ctx, cancel := s.client(10 * s.timeout)
	defer cancel()
	ids, err := r.SMembers(ctx, s.accountsKey()).Result()
	if err != nil {
		return nil, redisErr("list accounts", err)
	}
	out := make([]keystore.Account, 0, len(ids))
	err = s.readAccounts(ctx, r, ids, accountFields, func(rec *keystore.AccountRecord, amt acctAmounts) {
		out = append(out, accountInfo(rec, amt))
	})
	if err != nil {
		return nil, redisErr("list accounts", err)
	}
	slices.SortFunc(out, func(a, b keystore.Account) int { return strings.Compare(a.ID, b.ID) })
	return out, nil
}

// Credit adds amount to an account's balance in Redis (and sets its alert
// level when an option says so), as keystore.Store.Credit does
// (ErrInvalid, ErrAccountNotFound).
func (s *Store) Credit(id string, amount money.Micros, opts ...keystore.AccountOption) (keystore.Account, error) {
	if amount <= 0 || amount > money.Max {
		return keystore.Account{}, fmt.Errorf("%w: credit of %s (it must be positive)", keystore.ErrInvalid, amount)
	}
	alert, setAlert, err := keystore.AccountOptions(opts...)
	if err != nil {
		return keystore.Account{}, err
	}
	op := "credit " + id
	if err := s.writable(op); err != nil {
		return keystore.Account{}, err
	}
	r, ctx, cancel := s.client(s.timeout)
	defer cancel()
	set := "0"
	if setAlert {
		set = "1"
	}
	res, err := creditScript.Run(ctx, r, []string{s.acctKey(id), s.versionKey(), s.changesKey()},
		id, int64(amount), strconv.FormatInt(int64(money.Max-amount), 10), set, int64(alert),
		streamMaxLen, s.replica).Result()
	if err != nil {
		return keystore.Account{}, redisErr(op, err)
	}
	switch res := res.(type) {
	case int64:
		if res == -1 {
			return keystore.Account{}, fmt.Errorf("%w: %s", keystore.ErrAccountNotFound, id)
		}
	case []any:
		return keystore.Account{}, fmt.Errorf("%w: crediting %s to %s would take its balance past %s",
			keystore.ErrInvalid, amount, id, money.Max)
	default:
		return keystore.Account{}, fmt.Errorf("%s: %w: %v", op, errUnexpected, res)
	}
	if setAlert {
		s.mirrorAfter(op, []string{id}, nil)
	}
	s.log.Info("account credited", zap.String("account", id), zap.Int64("amount_micros", int64(amount)))
	return s.Account(id)
}

// CreateKey creates a key for an existing account, as
// keystore.Store.CreateKey does (ErrInvalid, ErrAccountNotFound). The
// secret is made here and only its hash reaches Redis; the key is usable
// by this replica's Lookup when CreateKey returns, and by the others
// within a second.
func (s *Store) CreateKey(nk keystore.NewKey, now time.Time) (keystore.KeyInfo, string, error) {
	rec, secret, err := keystore.NewKeyRecord(nk, now)
	if err != nil {
		return keystore.KeyInfo{}, "", err
	}
	op := "create key for " + nk.Account
	if err := s.writable(op); err != nil {
		return keystore.KeyInfo{}, "", err
	}
	raw, err := rec.MarshalBinary()
	if err != nil {
		return keystore.KeyInfo{}, "", err
	}
	r, ctx, cancel := s.client(s.timeout)
	defer cancel()
	for attempt := 0; ; attempt++ {
		v, err := createKeyScript.Run(ctx, r,
			[]string{s.acctKey(rec.Account), s.keyKey(rec.ID), s.keysKey(), s.acctKeysKey(rec.Account), s.versionKey(), s.changesKey()},
			rec.ID, rec.Account, raw, rec.CapPeriod.Index(now), streamMaxLen, s.replica).Int64()
		switch {
		case err != nil:
			return keystore.KeyInfo{}, "", redisErr(op, err)
		case v == -1:
			return keystore.KeyInfo{}, "", fmt.Errorf("%w: %s", keystore.ErrAccountNotFound, rec.Account)
		case v == -2 && attempt < casAttempts: // an ID clash: 95 random bits make it theoretical
			if rec.ID, err = keystore.NewKeyID(); err != nil {
				return keystore.KeyInfo{}, "", err
			}
			continue
		case v < 0:
			return keystore.KeyInfo{}, "", fmt.Errorf("%s: no free key ID after %d attempts", op, attempt+1)
		}
		break
	}
	s.mirrorAfter(op, nil, []string{rec.ID})
	s.log.Info("key created", zap.String("key_id", rec.ID), zap.String("account", rec.Account))
	return keyInfo(&rec, keyAmounts{period: rec.CapPeriod.Index(now)}, s.now()), secret, nil
}

// Key returns the key with this ID, with the spend Redis holds.
func (s *Store) Key(id string) (keystore.KeyInfo, error) {
	if err := s.ready("key " + id); err != nil {
		return keystore.KeyInfo{}, err
	}
	r, ctx, cancel := s.client(s.timeout)
	defer cancel()
	rec, amt, _, err := s.readKey(ctx, r, id)
	if err != nil {
		return keystore.KeyInfo{}, err
	}
	return keyInfo(&rec, amt, s.now()), nil
}

// readKey reads a key's record (and its encoding, for a compare-and-set)
// and amounts.
func (s *Store) readKey(ctx context.Context, r *redis.Client, id string) (rec keystore.KeyRecord, amt keyAmounts, raw string, err error) {
	vals, err := r.HMGet(ctx, s.keyKey(id), keyFields...).Result()
	if err != nil {
		return rec, amt, "", redisErr("key "+id, err)
	}
	rec, amt, found, err := parseKey(id, vals)
	switch {
	case err != nil:
		return rec, keyAmounts{}, "", err
	case !found:
		return rec, keyAmounts{}, "", fmt.Errorf("%w: %s", keystore.ErrKeyNotFound, id)
	}
	raw, _ = vals[0].(string)
	return rec, amt, raw, nil
}

// ListKeys returns the keys of account, or every key for "", sorted by
// creation time then ID. An unknown account has no keys.
func (s *Store) ListKeys(account string) ([]keystore.KeyInfo, error) {
	if err := s.ready("list keys"); err != nil {
		return nil, err
	}
	r, ctx, cancel := s.client(10 * s.timeout)
	defer cancel()
	set := s.keysKey()
	if account != "" {
		set = s.acctKeysKey(account)
	}
	ids, err := r.SMembers(ctx, set).Result()
	if err != nil {
		return nil, redisErr("list keys", err)
	}
	now := s.now()
	out := make([]keystore.KeyInfo, 0, len(ids))
	err = s.readKeys(ctx, r, ids, keyFields, func(rec *keystore.KeyRecord, amt keyAmounts) {
		out = append(out, keyInfo(rec, amt, now))
	})
	if err != nil {
		return nil, redisErr("list keys", err)
	}
	slices.SortFunc(out, func(a, b keystore.KeyInfo) int {
		if c := a.CreatedAt.Compare(b.CreatedAt); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	return out, nil
}

// Revoke revokes the key at now, as keystore.Store.Revoke does: this
// replica refuses it from its next Lookup on, the others within a second.
// During a rotation's grace it ends the grace at once; revoking a revoked
// key changes nothing.
func (s *Store) Revoke(id string, now time.Time) (keystore.KeyInfo, error) {
	if err := checkNow(now); err != nil {
		return keystore.KeyInfo{}, err
	}
	op := "revoke " + id
	if err := s.writable(op); err != nil {
		return keystore.KeyInfo{}, err
	}
	r, ctx, cancel := s.client(s.timeout)
	defer cancel()
	for attempt := 0; ; attempt++ {
		rec, amt, raw, err := s.readKey(ctx, r, id)
		if err != nil {
			return keystore.KeyInfo{}, err
		}
		if !rec.RevokedAt.IsZero() && !rec.RevokedAt.After(now) {
			return keyInfo(&rec, amt, s.now()), nil
		}
		rec.RevokedAt = now.UTC()
		updated, err := rec.MarshalBinary()
		if err != nil {
			return keystore.KeyInfo{}, err
		}
		v, err := updateKeyScript.Run(ctx, r, []string{s.keyKey(id), s.versionKey(), s.changesKey()},
			id, raw, updated, streamMaxLen, s.replica).Int64()
		switch {
		case err != nil:
			return keystore.KeyInfo{}, redisErr(op, err)
		case v == -1:
			return keystore.KeyInfo{}, fmt.Errorf("%w: %s", keystore.ErrKeyNotFound, id)
		case v == -2 && attempt < casAttempts:
			continue // changed meanwhile: read it again
		case v < 0:
			return keystore.KeyInfo{}, fmt.Errorf("%s: the key kept changing; try again", op)
		}
		s.mirrorAfter(op, nil, []string{id})
		s.log.Info("key revoked", zap.String("key_id", id), zap.String("account", rec.Account))
		return keyInfo(&rec, amt, s.now()), nil
	}
}

// Rotate replaces an active key with a new one, as keystore.Store.Rotate
// does (ErrInvalid, ErrKeyNotFound, ErrKeyInactive): the old key is
// revoked at now+grace, a time every replica compares with its own clock,
// so the grace's end needs no message.
func (s *Store) Rotate(id string, grace time.Duration, now time.Time) (old, nw keystore.KeyInfo, secret string, err error) {
	// The checks of keystore.Store.Rotate, which keystore does not export.
	if err := checkNow(now); err != nil {
		return old, nw, "", err
	}
	at := now.UnixNano()
	if grace < 0 {
		return old, nw, "", fmt.Errorf("%w: negative grace period %s", keystore.ErrInvalid, grace)
	}
	if int64(grace) > math.MaxInt64-at {
		return old, nw, "", fmt.Errorf("%w: grace period %s is too long", keystore.ErrInvalid, grace)
	}
	revokeAt := time.Unix(0, at+int64(grace)).UTC()
	op := "rotate " + id
	if err := s.writable(op); err != nil {
		return old, nw, "", err
	}
	r, ctx, cancel := s.client(s.timeout)
	defer cancel()
	for attempt := 0; ; attempt++ {
		cur, amt, raw, err := s.readKey(ctx, r, id)
		if err != nil {
			return old, nw, "", err
		}
		switch {
		case !cur.ActiveAt(now):
			state := keyInfo(&cur, keyAmounts{}, now).State(now)
			return old, nw, "", fmt.Errorf("%w: %s is %s", keystore.ErrKeyInactive, id, state)
		case !cur.RevokedAt.IsZero():
			return old, nw, "", fmt.Errorf("%w: %s was already rotated to %s and is revoked from %s",
				keystore.ErrKeyInactive, id, cur.RotatedTo, cur.RevokedAt.Format(time.RFC3339))
		}
		next := cur
		next.RotatedTo, next.RevokedAt, next.CreatedAt = "", time.Time{}, now.UTC()
		if !cur.ExpiresAt.IsZero() { // the same lifetime, from now
			life := cur.ExpiresAt.UnixNano() - cur.CreatedAt.UnixNano()
			if life > math.MaxInt64-at {
				return old, nw, "", fmt.Errorf("%w: the new key's expiry is out of range", keystore.ErrInvalid)
			}
			next.ExpiresAt = time.Unix(0, at+life).UTC()
		}
		if next.ID, err = keystore.NewKeyID(); err != nil {
			return old, nw, "", err
		}
		if secret, next.Hash, err = keystore.NewSecret(); err != nil {
			return old, nw, "", err
		}
		nextRaw, err := next.MarshalBinary()
		if err != nil {
			return old, nw, "", err
		}
		rotated := cur
		rotated.RevokedAt, rotated.RotatedTo = revokeAt, next.ID
		rotatedRaw, err := rotated.MarshalBinary()
		if err != nil {
			return old, nw, "", err
		}
		v, err := rotateScript.Run(ctx, r,
			[]string{s.keyKey(id), s.keyKey(next.ID), s.keysKey(), s.acctKeysKey(cur.Account), s.versionKey(), s.changesKey()},
			id, raw, rotatedRaw, next.ID, nextRaw, cur.Account, next.CapPeriod.Index(now), streamMaxLen, s.replica).Int64()
		switch {
		case err != nil:
			return old, nw, "", redisErr(op, err)
		case v == -1:
			return old, nw, "", fmt.Errorf("%w: %s", keystore.ErrKeyNotFound, id)
		case v < 0 && attempt < casAttempts:
			continue // changed meanwhile, or an ID clash: start again
		case v < 0:
			return old, nw, "", fmt.Errorf("%s: the key kept changing; try again", op)
		}
		s.mirrorAfter(op, nil, []string{next.ID, id})
		s.log.Info("key rotated", zap.String("key_id", id), zap.String("new_key_id", next.ID),
			zap.String("account", cur.Account), zap.Duration("grace", grace))
		t := s.now()
		return keyInfo(&rotated, amt, t), keyInfo(&next, keyAmounts{period: next.CapPeriod.Index(now)}, t), secret, nil
	}
}

// mirrorAfter mirrors what an admin command just wrote, so that this
// replica reflects it when the command returns. The write is done: a
// failure here is logged, and Run applies the change from the stream.
func (s *Store) mirrorAfter(op string, acctIDs, keyIDs []string) {
	r, ctx, cancel := s.client(s.timeout)
	defer cancel()
	if err := s.pull(ctx, r, acctIDs, keyIDs); err != nil {
		s.log.Error("mirror an admin command locally; the change stream will apply it", zap.String("op", op), zap.Error(err))
	}
}

var errUnexpected = errors.New("unexpected reply from redis")

// checkNow refuses a time the stored form cannot hold, as keystore does
// (which does not export its check).
func checkNow(now time.Time) error {
	if now.Unix() <= 0 || now.After(time.Unix(0, math.MaxInt64)) {
		return fmt.Errorf("%w: now %s is out of range (1970 to 2262)", keystore.ErrInvalid, now.Format(time.RFC3339))
	}
	return nil
}
