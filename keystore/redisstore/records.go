package redisstore

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/money"
)

// The fields read from P acct:{id} and P key:{id}: the record's, then
// the amounts that reads show. fetch reads only the record's (a prefix).
var (
	accountFields = []string{"tier", "created_at", "alert_below", "bal", "reserved"}
	keyFields     = []string{"rec", "spent", "period", "reserved"}
)

// errBadRecord marks a record in Redis that this keygate cannot read.
var errBadRecord = errors.New("malformed record in redis")

// acctAmounts are the amounts of an account that reads show.
type acctAmounts struct {
	bal      money.Micros // committed balance
	reserved money.Micros // held by open reservations
}

// keyAmounts are the amounts of a key that reads show.
type keyAmounts struct {
	spent    money.Micros // committed, in cap period period
	period   int32
	reserved money.Micros // held by open reservations
}

// parseAccount reads the values of HMGET accountFields (the amounts may be
// left out). found is false when Redis has no such account. An absent
// amount is 0 (a hash written before the field existed).
func parseAccount(id string, vals []any) (rec keystore.AccountRecord, amt acctAmounts, found bool, err error) {
	if len(vals) < 3 || vals[1] == nil {
		return rec, amt, false, nil
	}
	str := func(i int) string {
		if i >= len(vals) {
			return ""
		}
		s, _ := vals[i].(string)
		return s
	}
	created, err := parseInt(str(1), "created_at")
	if err != nil {
		return rec, amt, true, fmt.Errorf("account %s: %w", id, err)
	}
	if created <= 0 {
		return rec, amt, true, fmt.Errorf("account %s: %w: created_at %d", id, errBadRecord, created)
	}
	alert, err := parseMicros(str(2), "alert_below")
	if err != nil {
		return rec, amt, true, fmt.Errorf("account %s: %w", id, err)
	}
	if amt.bal, err = parseMicros(str(3), "bal"); err != nil {
		return rec, acctAmounts{}, true, fmt.Errorf("account %s: %w", id, err)
	}
	if amt.reserved, err = parseMicros(str(4), "reserved"); err != nil || amt.reserved < 0 {
		return rec, acctAmounts{}, true, fmt.Errorf("account %s: %w: reserved %q", id, errBadRecord, str(4))
	}
	rec = keystore.AccountRecord{ID: id, Tier: str(0), AlertBelow: alert, CreatedAt: time.Unix(0, created).UTC()}
	return rec, amt, true, nil
}

// parseKey reads the values of HMGET keyFields (the amounts may be left
// out). found is false when Redis has no such key.
func parseKey(id string, vals []any) (rec keystore.KeyRecord, amt keyAmounts, found bool, err error) {
	if len(vals) < 1 || vals[0] == nil {
		return rec, amt, false, nil
	}
	raw, _ := vals[0].(string)
	rec.ID = id
	if err := rec.UnmarshalBinary([]byte(raw)); err != nil {
		return rec, amt, true, fmt.Errorf("key %s: %w: %w", id, errBadRecord, err)
	}
	str := func(i int) string {
		if i >= len(vals) {
			return ""
		}
		s, _ := vals[i].(string)
		return s
	}
	if amt.spent, err = parseMicros(str(1), "spent"); err != nil || amt.spent < 0 {
		return rec, keyAmounts{}, true, fmt.Errorf("key %s: %w: spent %q", id, errBadRecord, str(1))
	}
	n, err := parseInt(str(2), "period")
	if err != nil || n < 0 || n > 1<<31-1 {
		return rec, keyAmounts{}, true, fmt.Errorf("key %s: %w: period %q", id, errBadRecord, str(2))
	}
	amt.period = int32(n)
	if amt.reserved, err = parseMicros(str(3), "reserved"); err != nil || amt.reserved < 0 {
		return rec, keyAmounts{}, true, fmt.Errorf("key %s: %w: reserved %q", id, errBadRecord, str(3))
	}
	return rec, amt, true, nil
}

// parseInt reads a decimal integer field; "" (absent) is 0.
func parseInt(s, field string) (int64, error) {
	if s == "" {
		return 0, nil
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%w: %s %q", errBadRecord, field, s)
	}
	return n, nil
}

// parseMicros reads an amount, which may be below zero (a balance) but
// not beyond money.Max either way.
func parseMicros(s, field string) (money.Micros, error) {
	n, err := parseInt(s, field)
	if err != nil {
		return 0, err
	}
	if n < -int64(money.Max) || n > int64(money.Max) {
		return 0, fmt.Errorf("%w: %s %d out of range", errBadRecord, field, n)
	}
	return money.Micros(n), nil
}

// keyInfo describes a key as keystore.Store.Key does, with the amounts
// that Redis holds: a spend of a cap period that has ended reads as 0 (the
// next script that charges the key rolls it over; a read only looks).
func keyInfo(r *keystore.KeyRecord, amt keyAmounts, now time.Time) keystore.KeyInfo {
	spent := amt.spent
	if r.CapPeriod != keystore.PeriodNone && r.CapPeriod.Index(now) > amt.period {
		spent = 0
	}
	return keystore.KeyInfo{
		ID: r.ID, Account: r.Account, Name: r.Name, Scopes: r.Scopes, RateLimit: r.RateLimit,
		SpendCap: r.SpendCap, Spent: spent, Reserved: amt.reserved, CapPeriod: r.CapPeriod,
		PeriodResetsAt: r.CapPeriod.ResetsAt(now),
		CreatedAt:      r.CreatedAt, ExpiresAt: r.ExpiresAt, RevokedAt: r.RevokedAt, RotatedTo: r.RotatedTo,
	}
}

func accountInfo(r *keystore.AccountRecord, amt acctAmounts) keystore.Account {
	return keystore.Account{ID: r.ID, Tier: r.Tier, Balance: amt.bal, Reserved: amt.reserved,
		AlertBelow: r.AlertBelow, CreatedAt: r.CreatedAt}
}

// readAccounts reads accounts from Redis, a pipeline per chunk, and calls
// each with what it found. Accounts that Redis does not have are left
// out; records it cannot read are logged and left out.
func (s *Store) readAccounts(ctx context.Context, r *redis.Client, ids []string, fields []string,
	each func(rec *keystore.AccountRecord, amt acctAmounts)) error {
	for lo := 0; lo < len(ids); lo += chunk {
		part := ids[lo:min(lo+chunk, len(ids))]
		cmds := make([]*redis.SliceCmd, len(part))
		_, err := r.Pipelined(ctx, func(p redis.Pipeliner) error {
			for i, id := range part {
				cmds[i] = p.HMGet(ctx, s.acctKey(id), fields...)
			}
			return nil
		})
		if err != nil {
			return err
		}
		for i, c := range cmds {
			rec, amt, found, err := parseAccount(part[i], c.Val())
			if err != nil {
				s.log.Error("an account in Redis cannot be read; left out", zap.Error(err))
				continue
			}
			if found {
				each(&rec, amt)
			}
		}
	}
	return nil
}

// readKeys is readAccounts for keys.
func (s *Store) readKeys(ctx context.Context, r *redis.Client, ids []string, fields []string,
	each func(rec *keystore.KeyRecord, amt keyAmounts)) error {
	for lo := 0; lo < len(ids); lo += chunk {
		part := ids[lo:min(lo+chunk, len(ids))]
		cmds := make([]*redis.SliceCmd, len(part))
		_, err := r.Pipelined(ctx, func(p redis.Pipeliner) error {
			for i, id := range part {
				cmds[i] = p.HMGet(ctx, s.keyKey(id), fields...)
			}
			return nil
		})
		if err != nil {
			return err
		}
		for i, c := range cmds {
			rec, amt, found, err := parseKey(part[i], c.Val())
			if err != nil {
				s.log.Error("a key in Redis cannot be read; left out", zap.Error(err))
				continue
			}
			if found {
				each(&rec, amt)
			}
		}
	}
	return nil
}

// fetch reads the records of these accounts and keys, and those of the
// keys' accounts that the local store does not know yet.
func (s *Store) fetch(ctx context.Context, r *redis.Client, acctIDs, keyIDs []string) ([]keystore.AccountRecord, []keystore.KeyRecord, error) {
	accts := make([]keystore.AccountRecord, 0, len(acctIDs))
	have := make(map[string]bool, len(acctIDs))
	addAcct := func(rec *keystore.AccountRecord, _ acctAmounts) {
		accts = append(accts, *rec)
		have[rec.ID] = true
	}
	if err := s.readAccounts(ctx, r, acctIDs, accountFields[:3], addAcct); err != nil {
		return nil, nil, err
	}
	keys := make([]keystore.KeyRecord, 0, len(keyIDs))
	var missing []string
	err := s.readKeys(ctx, r, keyIDs, keyFields[:1], func(rec *keystore.KeyRecord, _ keyAmounts) {
		keys = append(keys, *rec)
		if have[rec.Account] {
			return
		}
		if _, err := s.local.Account(rec.Account); errors.Is(err, keystore.ErrAccountNotFound) {
			missing = append(missing, rec.Account)
			have[rec.Account] = true
		}
	})
	if err != nil {
		return nil, nil, err
	}
	if err := s.readAccounts(ctx, r, missing, accountFields[:3], addAcct); err != nil {
		return nil, nil, err
	}
	return accts, keys, nil
}

// pull mirrors the current records of these accounts and keys into the
// local store. Records the mirror refuses are logged (the others are
// applied).
func (s *Store) pull(ctx context.Context, r *redis.Client, acctIDs, keyIDs []string) error {
	s.apply.Lock()
	defer s.apply.Unlock()
	return s.pullLocked(ctx, r, acctIDs, keyIDs)
}

func (s *Store) pullLocked(ctx context.Context, r *redis.Client, acctIDs, keyIDs []string) error {
	accts, keys, err := s.fetch(ctx, r, acctIDs, keyIDs)
	if err != nil {
		return err
	}
	return s.mirror(accts, keys)
}

// mirror applies records to the local store, logging those it refuses
// (invalid, or keys of an account Redis does not have either: fetch read
// the missing accounts): only a failure to write the file is returned.
func (s *Store) mirror(accts []keystore.AccountRecord, keys []keystore.KeyRecord) error {
	err := s.local.Mirror(accts, keys)
	if err == nil {
		return nil
	}
	s.log.Error("the local mirror refused records from Redis", zap.Error(err))
	for _, e := range unwrapJoined(err) {
		if !errors.Is(e, keystore.ErrInvalid) && !errors.Is(e, keystore.ErrAccountNotFound) {
			return err
		}
	}
	return nil
}

// unwrapJoined returns the errors that errors.Join joined into err, or err.
func unwrapJoined(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}
