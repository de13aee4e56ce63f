package rlease

import "github.com/redis/go-redis/v9"

// The Lua scripts below are each one atomic step of the shared state. Redis
// runs a script alone, so a grant, a report or a reclaim never interleaves
// with another replica's.
//
// Lua numbers are doubles: amounts and counts are exact up to 2^53 (nine
// billion dollars in micros), and every write goes through HINCRBY with an
// integer formatted by int(), never through Lua's default number-to-string
// conversion (which would write 1e+15). Times in nanoseconds exceed 2^53, so
// the rate script splits them into seconds and nanoseconds.
//
// The scripts read the live-replica window and the clock of Redis (TIME):
// heartbeats and reclaims then agree whatever the replicas' clocks say.

// luaCommon is the prelude of the money scripts: int(), now_ms() and
// roll(), which starts a key's spent over when its cap period (a number
// the caller computes: days or months since 1970, 0 for a key without
// one) is past the period its hash records. Periods only move forward: a
// replica whose clock is behind never rolls a key back.
const luaCommon = `
local function int(x) return string.format('%d', x) end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function roll(kk, period)
  if period <= 0 then return end
  if period > tonumber(redis.call('HGET', kk, 'period') or '0') then
    redis.call('HSET', kk, 'spent', '0', 'period', int(period))
  end
end
`

// leaseScript grants a money lease to one replica for one key.
//
//	KEYS: acct:{a}, key:{k}, lease:{replica}, replicas, contended
//	ARGV: keyID, need, want, cap, replica, live window (ms), price, period,
//	      account, contention window (ms)
//
// It heartbeats the replica, counts live replicas L, and grants
// g = min(want, avail/(2L)) rounded down to whole prices, at least need
// (at most avail), where avail is the smaller of the account's
// bal − leased − reserved and, when cap > 0, the key's cap − spent −
// leased − reserved (a missing field is 0; reserved is what redisstore's
// open reservations hold). Whole prices keep leases from fragmenting: with
// one price per key, a replica is refused only when what is left
// everywhere is less than the price. It returns {g, L, what the replica
// now holds for the key}, or {-1, L, 0} when the account cannot cover
// need, {-2, L, 0} when the key's cap cannot: then nothing changes but the
// heartbeat and the period roll.
//
// When it grants less than want, or refuses, it marks what limited it
// contended (acct:{a} or key:{k} in the contended ZSET, scored by when the
// mark expires): every replica's next heartbeat learns it and returns its
// idle leases of that account or key within a second, rather than keeping
// them as it does while nothing is contended.
//
// period is the key's current cap period number (0: the key has none).
// When it is past the key's period field, the key's spent belongs to an
// earlier period: it starts over at 0 in this one before the cap is
// checked. Leases outstanding stay leased.
var leaseScript = redis.NewScript(luaCommon + `
local ms = now_ms()
redis.call('ZADD', KEYS[4], ms, ARGV[5])
local live = redis.call('ZCOUNT', KEYS[4], ms - tonumber(ARGV[6]), '+inf')
if live < 1 then live = 1 end
local need, want, cap, price = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[7])
local function flag(m) redis.call('ZADD', KEYS[5], ms + tonumber(ARGV[10]), m) end
roll(KEYS[2], tonumber(ARGV[8]))
local a = redis.call('HMGET', KEYS[1], 'bal', 'leased', 'reserved')
local avail = (tonumber(a[1]) or 0) - (tonumber(a[2]) or 0) - (tonumber(a[3]) or 0)
if avail < need then
  flag('acct:' .. ARGV[9])
  return {-1, live, 0}
end
local bykey = false
if cap > 0 then
  local k = redis.call('HMGET', KEYS[2], 'spent', 'leased', 'reserved')
  local c = cap - (tonumber(k[1]) or 0) - (tonumber(k[2]) or 0) - (tonumber(k[3]) or 0)
  if c < need then
    flag('key:' .. ARGV[1])
    return {-2, live, 0}
  end
  if c < avail then avail, bykey = c, true end
end
local g = math.floor(avail / (2 * live))
if g > want then g = want end
g = g - g % price
if g < need then g = need end
if g < want then
  if bykey then flag('key:' .. ARGV[1]) else flag('acct:' .. ARGV[9]) end
end
redis.call('HINCRBY', KEYS[1], 'leased', int(g))
redis.call('HINCRBY', KEYS[2], 'leased', int(g))
local held = redis.call('HINCRBY', KEYS[3], ARGV[1], int(g))
return {g, live, held}
`)

// reportScript applies one replica's spend report, once.
//
//	KEYS: reports:{replica}, lease:{replica}, replicas, reported:{replica},
//	      then per entry acct:{a}, key:{k}
//	ARGV: seq, replica, mode ("hb": heartbeat, "final": leave the live
//	      set, "": neither), then per entry keyID, charge, release, period
//
// When seq is above the last applied one, each entry's key first rolls
// into the current cap period (period, as in leaseScript), then its charge
// is taken from the account's bal and added to the key's spent, and its
// release (at most what the replica holds for the key) is taken off the
// account's, the key's and the replica's leased.
//
// It returns {how, then per entry: what the replica holds for the key
// after the report (the replica adopts a grant whose reply it lost, and
// drops what a reclaim took), the key's spent and the account's bal just
// after the charge, and the account's alert_below}; with the charge, the
// caller knows the values before it, and so which alert thresholds it
// crossed. how is 1 when this call applied the report. A seq already
// applied (a retry) changes nothing and has how 0 and zeros for the
// charge's values, so that no replica raises an alert twice, except for
// the last seq applied, whose values reported:{replica} keeps (for an
// hour): a retry of it follows a lost reply, whose alerts no one raised,
// and gets them with how 2.
var reportScript = redis.NewScript(luaCommon + `
local seq = tonumber(ARGV[1])
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
local apply = seq > last
local saved = nil
if apply then
  redis.call('SET', KEYS[1], ARGV[1])
elseif seq == last then
  local s = redis.call('GET', KEYS[4])
  if s then
    saved = {}
    for v in string.gmatch(s, '[^,]+') do saved[#saved + 1] = tonumber(v) end
    if saved[1] ~= seq then saved = nil end
  end
end
if ARGV[3] == 'hb' then
  redis.call('ZADD', KEYS[3], now_ms(), ARGV[2])
elseif ARGV[3] == 'final' then
  redis.call('ZREM', KEYS[3], ARGV[2])
end
local out = {0}
if apply then out[1] = 1 elseif saved then out[1] = 2 end
local save = {ARGV[1]}
local charged = false
local n = (#KEYS - 4) / 2
for i = 1, n do
  local ak, kk = KEYS[3 + 2 * i], KEYS[4 + 2 * i]
  local j = 4 + 4 * (i - 1)
  local id, charge, release = ARGV[j], tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2])
  local cur = tonumber(redis.call('HGET', KEYS[2], id) or '0')
  local spent, bal, below = 0, 0, 0
  if apply then
    roll(kk, tonumber(ARGV[j + 3]))
    if charge > 0 then
      bal = redis.call('HINCRBY', ak, 'bal', int(-charge))
      spent = redis.call('HINCRBY', kk, 'spent', int(charge))
      below = tonumber(redis.call('HGET', ak, 'alert_below') or '0')
      charged = true
    end
    if release > cur then release = cur end
    if release > 0 then
      redis.call('HINCRBY', ak, 'leased', int(-release))
      redis.call('HINCRBY', kk, 'leased', int(-release))
      cur = redis.call('HINCRBY', KEYS[2], id, int(-release))
      if cur <= 0 then redis.call('HDEL', KEYS[2], id) end
    end
  elseif saved then
    local s = 2 + 3 * (i - 1)
    spent, bal, below = saved[s] or 0, saved[s + 1] or 0, saved[s + 2] or 0
  end
  local o = 2 + 4 * (i - 1)
  out[o], out[o + 1], out[o + 2], out[o + 3] = cur, spent, bal, below
  save[#save + 1] = int(spent) .. ',' .. int(bal) .. ',' .. int(below)
end
if apply then
  if charged then
    redis.call('SET', KEYS[4], table.concat(save, ','), 'EX', 3600)
  else
    redis.call('DEL', KEYS[4])
  end
end
return out
`)

// heartbeatScript marks a replica live, counts the live ones and reclaims
// the leases of replicas silent for longer than the dead window: for each
// of a dead replica's keys, the key's and its account's leased drop by what
// the replica held, and its lease hash and heartbeat go. Its reports:
// sequence stays, so that a late journal replay under its name is still
// applied once. At most 16 dead replicas per call; the rest wait a second.
//
//	KEYS: replicas, contended
//	ARGV: replica, acct: prefix, key: prefix, lease: prefix, live window (ms), dead window (ms)
//
// It returns {live replicas, replicas reclaimed, then the members of the
// contended ZSET whose mark has not expired (at most 1,000)}, and
// drops the expired marks.
var heartbeatScript = redis.NewScript(luaCommon + luaContended + `
local ms = now_ms()
redis.call('ZADD', KEYS[1], ms, ARGV[1])
local live = redis.call('ZCOUNT', KEYS[1], ms - tonumber(ARGV[5]), '+inf')
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. (ms - tonumber(ARGV[6])), 'LIMIT', 0, 16)
for _, d in ipairs(dead) do
  local lk = ARGV[4] .. d
  local h = redis.call('HGETALL', lk)
  for i = 1, #h, 2 do
    local kk = ARGV[3] .. h[i]
    local amt = tonumber(h[i + 1])
    local acct = redis.call('HGET', kk, 'account')
    redis.call('HINCRBY', kk, 'leased', int(-amt))
    if acct then redis.call('HINCRBY', ARGV[2] .. acct, 'leased', int(-amt)) end
  end
  redis.call('DEL', lk)
  redis.call('ZREM', KEYS[1], d)
end
local out = {live, #dead}
for _, m in ipairs(contended(KEYS[2], ms)) do out[#out + 1] = m end
return out
`)

// luaContended is contended(), which drops the expired contention marks of
// the ZSET k and returns the others: each is acct:{a}, key:{k} or rl:{key}.
// At most 1,000 are returned; beyond that, some leases are kept as if
// uncontended.
const luaContended = `
local function contended(k, ms)
  redis.call('ZREMRANGEBYSCORE', k, '-inf', '(' .. ms)
  return redis.call('ZRANGEBYSCORE', k, ms, '+inf', 'LIMIT', 0, 1000)
end
`

// luaTime is the prelude of the rate scripts: unix nanoseconds as
// (seconds, nanoseconds) pairs, so that differences are exact in doubles.
const luaTime = `
local function split(s)
  local n = #s
  if n <= 9 then return 0, tonumber(s) end
  return tonumber(string.sub(s, 1, n - 9)), tonumber(string.sub(s, n - 8))
end
local function diff(as, an, bs, bn) return (as - bs) * 1000000000 + (an - bn) end
local function add(s, n, d)
  local t = n + d
  local q = math.floor(t / 1000000000)
  return s + q, t - q * 1000000000
end
local function fmt(s, n)
  if s == 0 then return string.format('%d', n) end
  return string.format('%d%09d', s, n)
end
`

// rateScript leases up to want tokens from a key's global GCRA bucket.
//
//	KEYS: rl:{key}, replicas, contended, rlh:{key}
//	ARGV: now (unix ns), T (ns per token), N, want, replica, live window (ms),
//	      key, contention window (ms), dead window (ms)
//
// The bucket is the theoretical arrival time tat (unix ns; missing means
// full) of the tokens reported spent, and rlh:{key}, the tokens each
// replica holds, leased and not yet reported. A request at now is allowed
// while tat − now <= (N−1)T, as in ratelimit.Limiter, counting held tokens
// as spent, so g tokens may be leased while
// max(tat, now) − now + (held + g)T <= NT. The tokens of a replica not
// heard from within the dead window are counted spent, into tat: it may
// have spent them without reporting (and it stops spending them well
// before: leaseValidFor).
//
// It returns {g, ahead, live}: ahead is tat − now with every held token
// counted as spent, after the grant. With g = 0 nothing changed but the
// heartbeat. When it grants less than want, it marks rl:{key} contended
// (as leaseScript does), so that the other replicas return their unused
// tokens of the key within a second.
var rateScript = redis.NewScript(luaTime + `
local ns, nn = split(ARGV[1])
local T, N, want = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local me = ARGV[5]
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[2], ms, me)
local live = redis.call('ZCOUNT', KEYS[2], ms - tonumber(ARGV[6]), '+inf')
local ahead = 0
local cur = redis.call('GET', KEYS[1])
if cur then
  local cs, cn = split(cur)
  ahead = diff(cs, cn, ns, nn)
  if ahead < 0 then ahead = 0 end
end
local held, dead = 0, 0
local h = redis.call('HGETALL', KEYS[4])
for i = 1, #h, 2 do
  local r, v = h[i], tonumber(h[i + 1])
  if r ~= me then
    local seen = redis.call('ZSCORE', KEYS[2], r)
    if not seen or tonumber(seen) < ms - tonumber(ARGV[9]) then
      redis.call('HDEL', KEYS[4], r)
      dead, v = dead + v, 0
    end
  end
  held = held + v
end
if dead > 0 then
  ahead = ahead + dead * T
  local s, n = add(ns, nn, ahead)
  redis.call('SET', KEYS[1], fmt(s, n), 'PX', string.format('%d', math.floor(ahead / 1000000) + 1000))
end
ahead = ahead + held * T
local free = math.floor((N * T - ahead) / T)
if free < want then redis.call('ZADD', KEYS[3], ms + tonumber(ARGV[8]), 'rl:' .. ARGV[7]) end
if free < 1 then return {0, ahead, live} end
local g = math.min(free, want)
redis.call('HINCRBY', KEYS[4], me, string.format('%d', g))
redis.call('PEXPIRE', KEYS[4], 600000)
return {g, ahead + g * T, live}
`)

// rateReportScript applies one replica's token report, once: per key, the
// tokens it spent move from what it holds into the bucket (tat moves on
// from max(tat, now) by their worth of time), and those it gives back
// stop being held. A replica never holds less than nothing: what Redis
// reclaimed from it (counted dead) is not taken twice.
//
//	KEYS: rlseq:{replica}, replicas, contended, then per key rl:{key}, rlh:{key}
//	ARGV: seq, now (unix ns), replica, seq ttl (s), then per key used, returned, T
//
// It heartbeats the replica, and returns what the replica holds for each
// key after the report (whether this call applied it or an earlier one
// did), then the contention marks not yet expired.
var rateReportScript = redis.NewScript(luaTime + luaContended + `
local ns, nn = split(ARGV[2])
local me = ARGV[3]
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[2], ms, me)
local seq = tonumber(ARGV[1])
local apply = seq > tonumber(redis.call('GET', KEYS[1]) or '0')
if apply then redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[4])) end
local out = {}
for i = 1, (#KEYS - 3) / 2 do
  local rk, hk = KEYS[2 + 2 * i], KEYS[3 + 2 * i]
  local j = 5 + 3 * (i - 1)
  local used, ret, T = tonumber(ARGV[j]), tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2])
  local held = tonumber(redis.call('HGET', hk, me) or '0')
  if apply then
    if used > 0 then
      local ts, tn = ns, nn
      local cur = redis.call('GET', rk)
      if cur then
        local cs, cn = split(cur)
        if diff(cs, cn, ns, nn) > 0 then ts, tn = cs, cn end
      end
      local ahead = diff(ts, tn, ns, nn) + used * T
      ts, tn = add(ts, tn, used * T)
      redis.call('SET', rk, fmt(ts, tn), 'PX', string.format('%d', math.floor(ahead / 1000000) + 1000))
    end
    local dec = math.min(used + ret, held)
    if dec > 0 then
      held = held - dec
      if held <= 0 then
        redis.call('HDEL', hk, me)
      else
        redis.call('HSET', hk, me, string.format('%d', held))
      end
    end
  end
  out[i] = held
end
for _, m in ipairs(contended(KEYS[3], ms)) do out[#out + 1] = m end
return out
`)
