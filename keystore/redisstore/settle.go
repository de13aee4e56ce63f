package redisstore

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/money"
)

// Settlement after the response (settle: on_response) in Redis mode. A
// reservation lives in Redis, not in the replica that made it: the access
// log of a request may reach any replica (Envoy picks one per stream), and
// the replica that reserved may be gone by then. Each step is one Lua
// script, so a reservation is settled or expired once whichever replicas
// race for it, and each charge, applied once, is seen once by alert
// detection: by the replica whose script applied it.

// Limits of a request ID, as keystore's: Envoy's are UUIDs; a client's own
// must not make Redis keep kilobytes per request.
const maxRequestIDLen = 128

// settleTimeout bounds one Settle's wait for Redis. A Settle comes from
// Envoy's access-log stream, which tolerates waiting, and failing it makes
// a failed request pay its price at expiry: worth a longer wait than a
// Check's.
const settleTimeout = time.Second

// Expiry: every replica sweeps every second, expireBatch reservations per
// script so that one call never holds Redis for long.
const (
	expireEvery = time.Second
	expireBatch = 256
)

var (
	errRequestID = fmt.Errorf("%w: request id empty or longer than %d bytes", keystore.ErrInvalid, maxRequestIDLen)
	errPrice     = fmt.Errorf("%w: negative or too large price", keystore.ErrInvalid)
)

// Reserve holds price against the key's account balance and its spend cap
// for the request requestID, in Redis, until a Settle from any replica, or
// the deadline, after which the sweep of any replica commits it at price.
// It fails like keystore.Store.Reserve (ErrInsufficientBalance, ErrSpendCap,
// ErrDuplicateRequest when requestID already holds an open reservation,
// from whichever replica), with ErrDataLost once Redis has lost its data,
// and with an error wrapping rconn.ErrUnavailable when Redis cannot answer
// within the connection's timeout (or the breaker is open). Nothing changes
// when it fails. Reservations count against what rlease may lease, and
// leases against what Reserve may hold: the account's bal − leased −
// reserved, the key's cap − spent − leased − reserved.
func (s *Store) Reserve(k *keystore.Key, requestID string, price, maxPrice money.Micros, deadline time.Time) error {
	if price <= 0 || price > money.Max || maxPrice < price || maxPrice > money.Max {
		return errPrice
	}
	if requestID == "" || len(requestID) > maxRequestIDLen {
		return errRequestID
	}
	if s.lost.Load() {
		return ErrDataLost
	}
	period := k.CapPeriod()
	var code int64
	err := s.conn.Call(context.Background(), "reserve", func(ctx context.Context, r *redis.Client) error {
		var err error
		code, err = reserveScript.Run(ctx, r,
			[]string{s.resKey(requestID), s.resDueKey(), s.acctKey(k.Account()), s.keyKey(k.ID), s.conn.Key("contended")},
			requestID, k.ID, k.Account(), int64(price), int64(maxPrice), deadlineMS(deadline), s.replica,
			int64(k.SpendCap), int(period), period.Index(s.now())).Int64()
		return err
	})
	if err != nil {
		return redisErr("reserve "+requestID, err)
	}
	switch code {
	case reserveOK:
		return nil
	case reserveBalance:
		return keystore.ErrInsufficientBalance
	case reserveCap:
		return keystore.ErrSpendCap
	case reserveDuplicate:
		return keystore.ErrDuplicateRequest
	case reserveNoAccount:
		return fmt.Errorf("reserve %s: %w: %s", requestID, keystore.ErrAccountNotFound, k.Account())
	case reserveNoKey:
		return fmt.Errorf("reserve %s: %w: %s", requestID, keystore.ErrKeyNotFound, k.ID)
	}
	return fmt.Errorf("reserve %s: %w: %d", requestID, errUnexpected, code)
}

// deadlineMS is the deadline in Unix milliseconds, rounded up: a
// reservation never expires before its deadline.
func deadlineMS(t time.Time) int64 {
	ns := t.UnixNano()
	ms := ns / 1e6
	if ns%1e6 > 0 {
		ms++
	}
	return ms
}

// Settle ends the reservation of requestID, whichever replica made it. A
// successful request is charged cost clamped to [0, the reservation's
// maxPrice] when hasCost, else the reserved price; a failed one is
// released. It returns what it did and the amount charged; SettleUnknown
// when requestID holds no open reservation (never reserved, settled
// already, or expired and committed: a committed reservation is final).
//
// Settle runs off the Check path (from the access-log stream), so it may
// wait up to settleTimeout, not the Check path's timeout: a loaded Redis
// still settles. When Redis cannot settle (down, or slower than that), Settle logs it, counts it
// in keygate_settle_errors_total and returns SettleUnknown: the
// reservation stays and expires at its price after settle_timeout, so a
// request that failed may then be charged, and one that cost more than its
// price is charged its price. (A Settle whose reply was lost may also have
// been applied: then it is final, and only the alerts of its charge are
// lost.)
func (s *Store) Settle(requestID string, success bool, cost money.Micros, hasCost bool) (keystore.Settled, money.Micros) {
	if requestID == "" || len(requestID) > maxRequestIDLen {
		return keystore.SettleUnknown, 0 // Reserve refuses such IDs: nothing to settle
	}
	now := s.now()
	ok, costArg := "0", ""
	if success {
		ok = "1"
	}
	if hasCost {
		costArg = strconv.FormatInt(int64(max(cost, 0)), 10)
	}
	args := append([]any{requestID, ok, costArg, s.conn.Key("acct", ""), s.conn.Key("key", "")}, periodIndexes(now)...)
	var reply []any
	err := s.conn.CallFor(context.Background(), "settle", settleTimeout, func(ctx context.Context, r *redis.Client) error {
		var err error
		reply, err = settleScript.Run(ctx, r, []string{s.resKey(requestID), s.resDueKey()}, args...).Slice()
		return err
	})
	if err == nil && len(reply) == 0 {
		err = errUnexpected
	}
	if err != nil {
		s.settleFailed(requestID, err)
		return keystore.SettleUnknown, 0
	}
	s.settleOK()
	code, _ := reply[0].(int64)
	switch code {
	case settleUnknown:
		return keystore.SettleUnknown, 0
	case settleReleased:
		return keystore.SettleReleased, 0
	case settleMissing:
		s.log.Error("a reservation's key or account is missing from Redis; the reservation was dropped uncharged",
			zap.String("request_id", requestID))
		return keystore.SettleUnknown, 0
	case settleCommitted:
		if len(reply) == 2 {
			c, err := parseCommit(reply[1])
			if err == nil {
				s.raise(c, now)
				return keystore.SettleCommitted, c.charge
			}
			// The charge is applied; only what alerts need is unreadable.
			s.log.Error("settled, but the reply cannot be read: no alert for this charge",
				zap.String("request_id", requestID), zap.Error(err))
			return keystore.SettleCommitted, 0
		}
	}
	s.settleFailed(requestID, fmt.Errorf("%w: %v", errUnexpected, reply))
	return keystore.SettleUnknown, 0
}

// settleFailed logs and counts a Settle that Redis did not apply: the
// first of a run of failures as an error, the others at debug level, so
// that an outage does not log every access-log entry.
func (s *Store) settleFailed(requestID string, err error) {
	s.m.settleErrors.Inc()
	if !s.settleFailing.Swap(true) {
		s.log.Error("settle in Redis failed: the reservation stays and is committed at its price when settle_timeout passes",
			zap.String("request_id", requestID), zap.Error(err))
		return
	}
	s.log.Debug("settle in Redis failed", zap.String("request_id", requestID), zap.Error(err))
}

func (s *Store) settleOK() {
	if s.settleFailing.Load() && s.settleFailing.Swap(false) {
		s.log.Info("settle in Redis works again")
	}
}

// ExpireReservations commits, at their reserved price, the reservations
// of every replica whose deadline is not after now, and returns how many
// it committed: a request whose log entry never came is charged as if it
// had succeeded, so that revenue is never lost silently. Every replica's
// Run calls it each second; a reservation is committed once, by whichever
// script takes it first. It works in batches of expireBatch until fewer
// are due. A failure of Redis is logged (once per run of failures) and
// ends the call; the next one retries.
func (s *Store) ExpireReservations(now time.Time) int {
	args := append([]any{strconv.FormatInt(now.UnixMilli(), 10), expireBatch, s.conn.Key("res", ""),
		s.conn.Key("acct", ""), s.conn.Key("key", "")}, periodIndexes(now)...)
	total := 0
	for {
		var reply []any
		err := s.conn.Call(context.Background(), "expire", func(ctx context.Context, r *redis.Client) error {
			var err error
			reply, err = expireScript.Run(ctx, r, []string{s.resDueKey()}, args...).Slice()
			return err
		})
		if err == nil && len(reply) == 0 {
			err = fmt.Errorf("%w: an empty reply", errUnexpected)
		}
		if err != nil {
			if !s.expireFailing.Swap(true) {
				s.log.Warn("expire reservations in Redis failed; retrying every second", zap.Error(err))
			}
			return total
		}
		if s.expireFailing.Load() && s.expireFailing.Swap(false) {
			s.log.Info("expiring reservations in Redis works again")
		}
		scanned, _ := reply[0].(int64)
		n := 0
		for _, v := range reply[1:] {
			n++
			c, err := parseCommit(v)
			if err != nil {
				s.log.Error("a reservation expired, but the reply cannot be read: no alert for this charge", zap.Error(err))
				continue
			}
			s.raise(c, now)
		}
		if n > 0 {
			s.m.expired.Add(float64(n))
			s.log.Info("reservations expired: committed at their price", zap.Int("count", n))
		}
		total += n
		if scanned < expireBatch {
			return total
		}
	}
}

// expireLoop runs ExpireReservations every second until ctx is done.
func (s *Store) expireLoop(ctx context.Context) {
	t := time.NewTicker(expireEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if s.conn.Available() {
				s.ExpireReservations(s.now())
			}
		}
	}
}

// periodIndexes are the numbers of the cap periods that hold now, one per
// keystore.Period in order (PeriodNone's is 0): the scripts pick the one
// of a reservation's key, which they do not know beforehand.
func periodIndexes(now time.Time) []any {
	out := make([]any, 0, 3)
	for p := keystore.PeriodNone; p <= keystore.PeriodMonth; p++ {
		out = append(out, p.Index(now))
	}
	return out
}

// A commit is one charge that a script applied, with what alert detection
// needs: the key's spend (in the period charged) and the account's balance
// before and after, its alert level, and the key's cap when it was
// reserved.
type commit struct {
	keyID, account          string
	charge                  money.Micros
	spentBefore, spentAfter money.Micros
	balBefore, balAfter     money.Micros
	alertBelow, cap         money.Micros
}

// parseCommit reads a script's commit: {key, account, charge, spent
// before, spent after, balance before, balance after, alert_below, cap}.
func parseCommit(v any) (commit, error) {
	vals, ok := v.([]any)
	if !ok || len(vals) != 9 {
		return commit{}, fmt.Errorf("%w: commit %v", errUnexpected, v)
	}
	var c commit
	c.keyID, _ = vals[0].(string)
	c.account, _ = vals[1].(string)
	for i, dst := range []*money.Micros{&c.charge, &c.spentBefore, &c.spentAfter, &c.balBefore, &c.balAfter, &c.alertBelow, &c.cap} {
		str, _ := vals[2+i].(string)
		m, err := parseMicros(str, "amount")
		if err != nil {
			return commit{}, err
		}
		*dst = m
	}
	return c, nil
}

// raise hands the alerts that charge c crossed to Options.Alerts.
func (s *Store) raise(c commit, now time.Time) {
	if s.alerts == nil {
		return
	}
	alerts := keystore.Crossings(keystore.Crossing{
		KeyID: c.keyID, Account: c.account, Cap: c.cap, SpentBefore: c.spentBefore, SpentAfter: c.spentAfter,
		AlertBelow: c.alertBelow, BalanceBefore: c.balBefore, BalanceAfter: c.balAfter,
	}, s.thresholds, now)
	if len(alerts) > 0 {
		s.alerts(alerts)
	}
}

// Redis keys of reservations.
func (s *Store) resKey(requestID string) string { return s.conn.Key("res", requestID) }
func (s *Store) resDueKey() string              { return s.conn.Key("resdue") }

// Replies of reserveScript.
const (
	reserveOK        = 1
	reserveBalance   = -1
	reserveCap       = -2
	reserveDuplicate = -3
	reserveNoAccount = -4
	reserveNoKey     = -5
)

// First elements of settleScript's reply.
const (
	settleUnknown   = 0
	settleCommitted = 1
	settleReleased  = 2
	settleMissing   = -1
)

// The reservation scripts. Lua numbers are doubles: comparisons of
// amounts are exact up to 2^53 micros (nine billion dollars), as in
// rlease; amounts are written with HINCRBY from the decimal strings that
// Go or the hashes hold, and returned as the strings HGET reads, so that
// nothing written or returned goes through a Lua number.
//
//	P res:{requestID}  HASH key, account, price, max, cap, cp (the key's
//	                   keystore.Period), deadline (unix ms), by (replica)
//	P resdue           ZSET request ID → deadline (unix ms)
//
// The account's and the key's `reserved` fields hold the sum of their
// open reservations' prices.

// reserveScript opens a reservation.
//
//	KEYS: res:{id}, resdue, acct:{a}, key:{k}, contended
//	ARGV: id, key id, account, price, max, deadline ms, replica, cap,
//	      cap period kind, current period index
//
// A key's spend of an earlier cap period than the current one is rolled
// over (spent 0) before the cap is checked. Returns reserveOK or one of the
// refusals, with nothing changed but the roll and, on a refusal for the
// balance or the cap, a contention mark (as rlease's lease script leaves):
// replicas then give back the money leases they hold idle for it within a
// second, so a retry finds what they were keeping.
var reserveScript = redis.NewScript(`
if redis.call('EXISTS', KEYS[1]) == 1 then return -3 end
local a = redis.call('HMGET', KEYS[3], 'bal', 'leased', 'reserved')
if not a[1] then return -4 end
local k = redis.call('HMGET', KEYS[4], 'spent', 'leased', 'reserved', 'period')
if not k[1] then return -5 end
local price = tonumber(ARGV[4])
local function flag(m)
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[5], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + 2000, m)
end
if tonumber(a[1]) - (tonumber(a[2]) or 0) - (tonumber(a[3]) or 0) < price then
  flag('acct:' .. ARGV[3])
  return -1
end
if tonumber(ARGV[10]) > (tonumber(k[4]) or 0) then
  redis.call('HSET', KEYS[4], 'spent', '0', 'period', ARGV[10])
  k[1] = '0'
end
local cap = tonumber(ARGV[8])
if cap > 0 and tonumber(k[1]) + (tonumber(k[2]) or 0) + (tonumber(k[3]) or 0) + price > cap then
  flag('key:' .. ARGV[2])
  return -2
end
redis.call('HINCRBY', KEYS[3], 'reserved', ARGV[4])
redis.call('HINCRBY', KEYS[4], 'reserved', ARGV[4])
redis.call('HSET', KEYS[1], 'key', ARGV[2], 'account', ARGV[3], 'price', ARGV[4], 'max', ARGV[5],
  'cap', ARGV[8], 'cp', ARGV[9], 'deadline', ARGV[6], 'by', ARGV[7])
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[1])
return 1
`)

// resLua is the prelude of settleScript and expireScript, whose ARGV[4]
// and ARGV[5] are the prefixes of account and key hashes and ARGV[6...]
// the current period index of each cap period kind.
const resLua = `
-- gtu: a > b, for decimal strings of non-negative integers (no leading zeros).
local function gtu(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end

-- take ends reservation id (hash rk, due set due): its key, account,
-- price, max, cap and cap period kind, or nil when it has none.
local function take(rk, due, id)
  redis.call('ZREM', due, id)
  local r = redis.call('HMGET', rk, 'key', 'account', 'price', 'max', 'cap', 'cp')
  if not r[1] then return nil end
  redis.call('DEL', rk)
  return r
end

-- release gives back what reservation r holds; false (and nothing
-- changed) when its account or key is gone.
local function release(r)
  local ak, kk = ARGV[4] .. r[2], ARGV[5] .. r[1]
  if redis.call('EXISTS', ak) == 0 or redis.call('EXISTS', kk) == 0 then return false end
  redis.call('HINCRBY', ak, 'reserved', '-' .. r[3])
  redis.call('HINCRBY', kk, 'reserved', '-' .. r[3])
  return true
end

-- commit charges charge (a decimal string) for reservation r, in the
-- key's current cap period (rolled over first), and returns {key,
-- account, charge, spent before, spent after, bal before, bal after,
-- alert_below, cap}.
local function commit(r, charge)
  local ak, kk = ARGV[4] .. r[2], ARGV[5] .. r[1]
  local cur = ARGV[6 + (tonumber(r[6]) or 0)]
  if cur and tonumber(cur) > (tonumber(redis.call('HGET', kk, 'period')) or 0) then
    redis.call('HSET', kk, 'spent', '0', 'period', cur)
  end
  local sb = redis.call('HGET', kk, 'spent') or '0'
  local a = redis.call('HMGET', ak, 'bal', 'alert_below')
  local bb = a[1] or '0'
  local sa, ba = sb, bb
  if charge ~= '0' then
    redis.call('HINCRBY', ak, 'bal', '-' .. charge)
    redis.call('HINCRBY', kk, 'spent', charge)
    sa = redis.call('HGET', kk, 'spent')
    ba = redis.call('HGET', ak, 'bal')
  end
  return {r[1], r[2], charge, sb, sa, bb, ba, a[2] or '0', r[5] or '0'}
end
`

// settleScript settles one reservation.
//
//	KEYS: res:{id}, resdue
//	ARGV: id, success ("1" or "0"), cost ("" : none; else >= 0), acct
//	      prefix, key prefix, period index per kind...
//
// Returns {0} for no reservation, {2} when released, {1, commit} when
// charged, {-1} when its key or account is gone (dropped uncharged).
var settleScript = redis.NewScript(resLua + `
local r = take(KEYS[1], KEYS[2], ARGV[1])
if not r then return {0} end
if not release(r) then return {-1} end
if ARGV[2] ~= '1' then return {2} end
local charge = r[3]
if ARGV[3] ~= '' then
  charge = ARGV[3]
  if gtu(charge, r[4]) then charge = r[4] end
end
return {1, commit(r, charge)}
`)

// expireScript commits at their price up to a batch of due reservations.
//
//	KEYS: resdue
//	ARGV: now (unix ms), batch, res prefix, acct prefix, key prefix,
//	      period index per kind...
//
// Returns {due entries taken, commit...}: fewer taken than the batch
// means no more are due.
var expireScript = redis.NewScript(resLua + `
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {#ids}
for _, id in ipairs(ids) do
  local r = take(ARGV[3] .. id, KEYS[1], id)
  if r and release(r) then
    out[#out + 1] = commit(r, r[3])
  end
end
return out
`)
