package redisstore

import "github.com/redis/go-redis/v9"

// Every admin write is one Lua script: its check, its write, the INCR of
// P version and the XADD to P changes happen at once, so that a replica
// that reads version V from Redis finds every change up to V in the
// stream (unless it was trimmed), and the stream's entries carry the
// versions 1, 2, 3... with no gap. Replicas rely on both (see Run).
//
// Lua numbers are doubles: amounts are compared as decimal strings (gt)
// and moved with HINCRBY, never through a Lua number.

// changedLua records one change. The last two ARGV of every script are the
// stream's MAXLEN and the replica's ID; the last two KEYS are P version
// and P changes.
const changedLua = `
local function changed(kind, id)
  local v = redis.call('INCR', KEYS[#KEYS - 1])
  redis.call('XADD', KEYS[#KEYS], 'MAXLEN', '~', ARGV[#ARGV - 1], '*',
    'kind', kind, 'id', id, 'v', v, 'by', ARGV[#ARGV])
  return v
end
`

// createAccountScript: KEYS acct, accounts, version, changes; ARGV id,
// tier, created_at, alert_below, balance. Returns 0 when the account
// exists, else the new version.
var createAccountScript = redis.NewScript(changedLua + `
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'tier', ARGV[2], 'created_at', ARGV[3], 'alert_below', ARGV[4],
  'bal', ARGV[5], 'leased', '0', 'reserved', '0')
redis.call('SADD', KEYS[2], ARGV[1])
return changed('acct', ARGV[1])
`)

// creditScript: KEYS acct, version, changes; ARGV id, amount, limit (the
// balance above which the credit would pass money.Max), set_alert ("1" or
// "0"), alert_below. Returns -1 for an unknown account, {-2, balance} when
// the credit would overflow, else the new version.
var creditScript = redis.NewScript(changedLua + `
local function gt(a, b)
  local an, bn = string.sub(a, 1, 1) == '-', string.sub(b, 1, 1) == '-'
  if an ~= bn then return bn end
  if an then a, b = string.sub(b, 2), string.sub(a, 2) end
  if #a ~= #b then return #a > #b end
  return a > b
end
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local bal = redis.call('HGET', KEYS[1], 'bal') or '0'
if gt(bal, ARGV[3]) then return {-2, bal} end
redis.call('HINCRBY', KEYS[1], 'bal', ARGV[2])
if ARGV[4] == '1' then redis.call('HSET', KEYS[1], 'alert_below', ARGV[5]) end
return changed('acct', ARGV[1])
`)

// createKeyScript: KEYS acct, key, keys, acctkeys, version, changes; ARGV
// key id, account, rec, period (the cap period its spend of 0 belongs
// to). Returns -1 for an unknown account, -2 when the key ID is taken,
// else the new version.
var createKeyScript = redis.NewScript(changedLua + `
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('EXISTS', KEYS[2]) == 1 then return -2 end
redis.call('HSET', KEYS[2], 'rec', ARGV[3], 'account', ARGV[2], 'spent', '0', 'period', ARGV[4], 'leased', '0',
  'reserved', '0')
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
return changed('key', ARGV[1])
`)

// updateKeyScript replaces a key's record if it is still the one the
// caller read (a compare-and-set: rlease's writes to the key's other
// fields do not get in the way). KEYS key, version, changes; ARGV key id,
// old rec, new rec. Returns -1 for an unknown key, -2 when the record
// changed meanwhile, else the new version.
var updateKeyScript = redis.NewScript(changedLua + `
local cur = redis.call('HGET', KEYS[1], 'rec')
if not cur then return -1 end
if cur ~= ARGV[2] then return -2 end
redis.call('HSET', KEYS[1], 'rec', ARGV[3])
return changed('key', ARGV[1])
`)

// rotateScript creates the new key and sets the old one's record (revoked
// at the grace's end, rotated to the new one) if it is still the one the
// caller read. KEYS old key, new key, keys, acctkeys, version, changes;
// ARGV old id, old rec as read, old rec rotated, new id, new rec, account,
// the new key's period.
// Returns -1 for an unknown key, -2 when its record changed meanwhile, -3
// when the new ID is taken, else the new version.
var rotateScript = redis.NewScript(changedLua + `
local cur = redis.call('HGET', KEYS[1], 'rec')
if not cur then return -1 end
if cur ~= ARGV[2] then return -2 end
if redis.call('EXISTS', KEYS[2]) == 1 then return -3 end
redis.call('HSET', KEYS[2], 'rec', ARGV[5], 'account', ARGV[6], 'spent', '0', 'period', ARGV[7], 'leased', '0',
  'reserved', '0')
redis.call('SADD', KEYS[3], ARGV[4])
redis.call('SADD', KEYS[4], ARGV[4])
redis.call('HSET', KEYS[1], 'rec', ARGV[3])
changed('key', ARGV[4])
return changed('key', ARGV[1])
`)
