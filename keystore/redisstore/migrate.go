package redisstore

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/money"
	"github.com/keygate/keygate/keystore/rconn"
)

// Migration from a bbolt store (keygate migrate). An operator moving from
// store: bbolt to store: redis must keep every key working (only the
// secrets' hashes exist, so keys cannot be issued again), every balance,
// spend and setting, and the open reservations of settle: on_response.
// Migrate writes them into an empty prefix of a Redis in the data model
// of this package, as if every record had been made here:
//
//   - P acct:{id} with its committed balance as bal, leased 0, and reserved
//     the sum of its open reservations; P accounts.
//   - P key:{id} with its record (rec), account, spent and period as the
//     bbolt file holds them (the period that spent belongs to: both stores
//     start a cap period over the same way), leased 0, reserved; P keys and
//     P acctkeys:{account}.
//   - P res:{request} and P resdue as Reserve leaves them (settle.go).
//
// Safety:
//
//   - It refuses a prefix that already holds accounts, keys or reservations
//     (ErrTargetNotEmpty): a migration never merges into live data.
//   - Before writing, it sets P migrating (a hash: a token, the source, the
//     start time, the host). Every batch checks the token, and the last
//     step, one script, bumps P version, appends to P changes and deletes
//     P migrating, all at once. So a migration is either complete, or it
//     left P migrating behind: the next Migrate then refuses
//     (ErrMigrationInterrupted) unless told to clear what the interrupted
//     one wrote (MigrateOptions.Force), and Force clears nothing else: it
//     is refused for a prefix without P migrating.
//   - Replicas already running on the prefix see nothing until that last
//     step (P version does not move before it); the change it appends
//     skips versions, which makes each of them sync in full (see Run). A
//     migration of a single account names it: that one record is all.
//   - It initialises the data-loss marker (rconn.InitMarker) if Redis has
//     none, so that replicas remember the epoch of the migrated data.
//
// The admin scripts (scripts.go) are not reused for the records: each
// writes one record with a change of its own and a spend of 0, whereas a
// migration writes thousands per script with their spend, and announces
// them once. The announcement reuses changedLua.

// Errors of Migrate.
var (
	// ErrTargetNotEmpty is returned when the prefix already holds keygate
	// accounts, keys or reservations.
	ErrTargetNotEmpty = errors.New("redis already holds keygate data under this key prefix")
	// ErrMigrationInterrupted is returned when an earlier migration into
	// the prefix did not finish (or is still running), and
	// MigrateOptions.Force is not set.
	ErrMigrationInterrupted = errors.New("an earlier migration into this redis key prefix did not finish")
	// ErrMigrationDisplaced is returned when another migration cleared this
	// one's records (with Force) while it ran.
	ErrMigrationDisplaced = errors.New("another migration took over this redis key prefix")
	// ErrNothingToForce is returned for MigrateOptions.Force when the
	// prefix has no interrupted migration: Force never clears live data.
	ErrNothingToForce = errors.New("force clears only what an interrupted migration left")
)

// A Migration is what Migrate writes: a bbolt store's content, as
// keystore's Store.Export reads it (see there for the meaning of each
// field: spend in the cap period it belongs to, balances that may be below
// zero, and a second open reservation of one request ID named so that no
// request settles it).
type (
	Migration          = keystore.Export
	MigrateAccount     = keystore.ExportedAccount
	MigrateKey         = keystore.ExportedKey
	MigrateReservation = keystore.ExportedReservation
)

// MigrateOptions configures Migrate.
type MigrateOptions struct {
	// Force clears what an interrupted migration wrote (every account,
	// key and reservation under the prefix) before migrating. It is
	// refused when the prefix has no interrupted migration.
	Force bool
	// Source names the migrated store in P migrating and in the logs.
	Source string
	// Batch is the number of records per script; 0 means 500.
	Batch int
	// Timeout bounds each Redis call (a batch is one); 0 means 30s.
	Timeout time.Duration
	Log     *zap.Logger // nil: no logs
}

// MigrateResult says what Migrate did.
type MigrateResult struct {
	Accounts, Keys, Reservations int
	// Cleared is how many Redis keys Force deleted.
	Cleared int
	// Epoch is the data-loss marker's epoch; MarkerCreated is true when
	// Migrate wrote it.
	Epoch         string
	MarkerCreated bool
	// Version is P version after the migration.
	Version int64
}

// Defaults of MigrateOptions.
const (
	defaultMigrateBatch   = 500
	defaultMigrateTimeout = 30 * time.Second
	migrateBy             = "migrate" // the change stream's "by", and reservations'
)

// Fields of P migrating.
const (
	migTokenField   = "token"
	migSourceField  = "source"
	migStartedField = "started_at"
	migHostField    = "host"
)

// Replies of the migration scripts.
const (
	migOK        = 1
	migDisplaced = -1 // P migrating holds another token
	migExists    = -2 // a record to write exists already
	migNoAccount = -3 // a key's account is missing
	migNoKey     = -4 // a reservation's key is missing
)

// migrateAccountsScript writes a batch of accounts.
//
//	KEYS: migrating, accounts, acct:{id}...
//	ARGV: token, then per account: id, tier, created_at, alert_below, bal, reserved
//
// Returns {1}, or {code, id} with nothing written.
var migrateAccountsScript = redis.NewScript(`
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return {-1} end
local n = #KEYS - 2
for i = 1, n do
  if redis.call('EXISTS', KEYS[2 + i]) == 1 then return {-2, ARGV[2 + (i - 1) * 6]} end
end
for i = 1, n do
  local o = 1 + (i - 1) * 6
  redis.call('HSET', KEYS[2 + i], 'tier', ARGV[o + 2], 'created_at', ARGV[o + 3], 'alert_below', ARGV[o + 4],
    'bal', ARGV[o + 5], 'leased', '0', 'reserved', ARGV[o + 6])
  redis.call('SADD', KEYS[2], ARGV[o + 1])
end
return {1}
`)

// migrateKeysScript writes a batch of keys.
//
//	KEYS: migrating, keys, then per key: key:{id}, acctkeys:{account}, acct:{account}
//	ARGV: token, then per key: id, account, rec, spent, period, reserved
//
// Returns {1}, or {code, id} with nothing written.
var migrateKeysScript = redis.NewScript(`
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return {-1} end
local n = (#KEYS - 2) / 3
for i = 1, n do
  local k, id = 2 + (i - 1) * 3, ARGV[2 + (i - 1) * 6]
  if redis.call('EXISTS', KEYS[k + 1]) == 1 then return {-2, id} end
  if redis.call('EXISTS', KEYS[k + 3]) == 0 then return {-3, id} end
end
for i = 1, n do
  local k, o = 2 + (i - 1) * 3, 1 + (i - 1) * 6
  redis.call('HSET', KEYS[k + 1], 'rec', ARGV[o + 3], 'account', ARGV[o + 2], 'spent', ARGV[o + 4],
    'period', ARGV[o + 5], 'leased', '0', 'reserved', ARGV[o + 6])
  redis.call('SADD', KEYS[2], ARGV[o + 1])
  redis.call('SADD', KEYS[k + 2], ARGV[o + 1])
end
return {1}
`)

// migrateReservationsScript writes a batch of reservations in the form
// reserveScript leaves them (the accounts' and keys' reserved fields were
// written with them).
//
//	KEYS: migrating, resdue, then per reservation: res:{id}, key:{key}
//	ARGV: token, then per reservation: id, key, account, price, max, cap,
//	      cap period kind, deadline ms
//
// Returns {1}, or {code, id} with nothing written.
var migrateReservationsScript = redis.NewScript(`
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return {-1} end
local n = (#KEYS - 2) / 2
for i = 1, n do
  local k, id = 2 + (i - 1) * 2, ARGV[2 + (i - 1) * 8]
  if redis.call('EXISTS', KEYS[k + 1]) == 1 then return {-2, id} end
  if redis.call('EXISTS', KEYS[k + 2]) == 0 then return {-4, id} end
end
for i = 1, n do
  local k, o = 2 + (i - 1) * 2, 1 + (i - 1) * 8
  redis.call('HSET', KEYS[k + 1], 'key', ARGV[o + 2], 'account', ARGV[o + 3], 'price', ARGV[o + 4],
    'max', ARGV[o + 5], 'cap', ARGV[o + 6], 'cp', ARGV[o + 7], 'deadline', ARGV[o + 8], 'by', 'migrate')
  redis.call('ZADD', KEYS[2], ARGV[o + 8], ARGV[o + 1])
end
return {1}
`)

// migrateCommitScript ends a migration: P version moves by the number of
// records written (the one change appended names the first account), and
// P migrating goes, at once.
//
//	KEYS: migrating, version, changes
//	ARGV: token, records − 1, first account, maxlen, by
//
// Returns the new version, or -1 when P migrating holds another token.
var migrateCommitScript = redis.NewScript(changedLua + `
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return -1 end
redis.call('INCRBY', KEYS[2], ARGV[2])
local v = changed('acct', ARGV[3])
redis.call('DEL', KEYS[1])
return v
`)

// migrateBeginScript sets P migrating unless it exists. KEYS: migrating;
// ARGV: token, source, started_at, host. Returns 1, or 0 when it exists.
var migrateBeginScript = redis.NewScript(`
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'token', ARGV[1], 'source', ARGV[2], 'started_at', ARGV[3], 'host', ARGV[4])
return 1
`)

// Migrate writes m into the empty key prefix of conn's Redis; see the
// comment above for what and how. m is checked in full before anything is
// written (errors wrap keystore.ErrInvalid or keystore.ErrAccountNotFound
// and name the record). It fails with ErrTargetNotEmpty,
// ErrMigrationInterrupted or ErrMigrationDisplaced as described there;
// any failure after P migrating was set leaves it set, so that the next
// Migrate says so.
func Migrate(ctx context.Context, conn *rconn.Conn, m Migration, o MigrateOptions) (MigrateResult, error) {
	if o.Batch <= 0 {
		o.Batch = defaultMigrateBatch
	}
	if o.Timeout <= 0 {
		o.Timeout = defaultMigrateTimeout
	}
	if o.Log == nil {
		o.Log = zap.NewNop()
	}
	p, err := prepareMigration(m)
	if err != nil {
		return MigrateResult{}, err
	}
	mg := &migrator{s: &Store{conn: conn}, r: conn.Client().WithTimeout(o.Timeout), o: o, token: rand.Text()}
	var res MigrateResult
	if res.Cleared, err = mg.begin(ctx); err != nil {
		return res, err
	}
	mctx, cancel := context.WithTimeout(ctx, o.Timeout)
	res.Epoch, res.MarkerCreated, err = conn.InitMarker(mctx)
	cancel()
	if err != nil {
		return res, err
	}
	if err := mg.writeAccounts(ctx, p); err != nil {
		return res, err
	}
	if err := mg.writeKeys(ctx, p); err != nil {
		return res, err
	}
	if err := mg.writeReservations(ctx, p); err != nil {
		return res, err
	}
	if res.Version, err = mg.commit(ctx, p); err != nil {
		return res, err
	}
	res.Accounts, res.Keys, res.Reservations = len(m.Accounts), len(m.Keys), len(m.Reservations)
	o.Log.Info("migration into redis done", zap.String("source", o.Source), zap.Int("accounts", res.Accounts),
		zap.Int("keys", res.Keys), zap.Int("reservations", res.Reservations), zap.Int64("version", res.Version))
	return res, nil
}

// prepared is a checked Migration, encoded for the scripts.
type prepared struct {
	m          Migration
	acctRes    map[string]money.Micros // reserved per account
	keyRes     map[string]money.Micros // reserved per key
	keyRaw     [][]byte                // Keys[i].Record encoded
	keyOf      map[string]*keystore.KeyRecord
	resByIndex []resArgs
}

type resArgs struct {
	account  string
	cap      money.Micros
	period   keystore.Period
	deadline int64 // unix ms
}

// prepareMigration checks m as the stores would (records as CreateAccount
// and CreateKey check them; IDs unique; keys of known accounts,
// reservations of known keys; amounts in range) and sums the reservations.
func prepareMigration(m Migration) (*prepared, error) {
	p := &prepared{m: m, acctRes: map[string]money.Micros{}, keyRes: map[string]money.Micros{},
		keyOf: make(map[string]*keystore.KeyRecord, len(m.Keys))}
	accts := make(map[string]bool, len(m.Accounts))
	for _, a := range m.Accounts {
		if _, err := keystore.NewAccountRecord(a.Record.ID, a.Record.Tier, 0, a.Record.CreatedAt); err != nil {
			return nil, fmt.Errorf("account %q: %w", a.Record.ID, err)
		}
		if _, err := a.Record.MarshalBinary(); err != nil {
			return nil, fmt.Errorf("account %s: %w", a.Record.ID, err)
		}
		if a.Balance < -money.Max || a.Balance > money.Max {
			return nil, fmt.Errorf("%w: account %s: balance %d out of range", keystore.ErrInvalid, a.Record.ID, int64(a.Balance))
		}
		if accts[a.Record.ID] {
			return nil, fmt.Errorf("%w: account %s listed twice", keystore.ErrInvalid, a.Record.ID)
		}
		accts[a.Record.ID] = true
	}
	p.keyRaw = make([][]byte, len(m.Keys))
	for i := range m.Keys {
		k := &m.Keys[i]
		id := k.Record.ID
		if id == "" || strings.ContainsAny(id, "\x00") {
			return nil, fmt.Errorf("%w: key ID %q", keystore.ErrInvalid, id)
		}
		raw, err := k.Record.MarshalBinary()
		if err != nil {
			return nil, fmt.Errorf("key %s: %w", id, err)
		}
		if !accts[k.Record.Account] {
			return nil, fmt.Errorf("key %s: %w: %s", id, keystore.ErrAccountNotFound, k.Record.Account)
		}
		if k.Spent < 0 || k.Spent > money.Max || k.Period < 0 {
			return nil, fmt.Errorf("%w: key %s: spent %d in period %d out of range", keystore.ErrInvalid, id, int64(k.Spent), k.Period)
		}
		if p.keyOf[id] != nil {
			return nil, fmt.Errorf("%w: key %s listed twice", keystore.ErrInvalid, id)
		}
		p.keyRaw[i], p.keyOf[id] = raw, &k.Record
	}
	seen := make(map[string]bool, len(m.Reservations))
	p.resByIndex = make([]resArgs, len(m.Reservations))
	for i, r := range m.Reservations {
		k := p.keyOf[r.KeyID]
		switch {
		case r.ID == "" || seen[r.ID]:
			return nil, fmt.Errorf("%w: reservation ID %q empty or listed twice", keystore.ErrInvalid, r.ID)
		case k == nil:
			return nil, fmt.Errorf("reservation %q: %w: %s", r.ID, keystore.ErrKeyNotFound, r.KeyID)
		case r.Price <= 0 || r.MaxPrice < r.Price || r.MaxPrice > money.Max:
			return nil, fmt.Errorf("%w: reservation %q: price %d, at most %d", keystore.ErrInvalid, r.ID, int64(r.Price), int64(r.MaxPrice))
		}
		seen[r.ID] = true
		ar, kr := p.acctRes[k.Account]+r.Price, p.keyRes[k.ID]+r.Price
		if ar > money.Max || kr > money.Max {
			return nil, fmt.Errorf("%w: the reservations of key %s hold more than %s", keystore.ErrInvalid, k.ID, money.Max)
		}
		p.acctRes[k.Account], p.keyRes[k.ID] = ar, kr
		p.resByIndex[i] = resArgs{account: k.Account, cap: k.SpendCap, period: k.CapPeriod, deadline: deadlineMS(r.Deadline)}
	}
	return p, nil
}

// migrator writes one migration.
type migrator struct {
	s     *Store // for the key names; only conn is set
	r     *redis.Client
	o     MigrateOptions
	token string
}

// call runs one script with the migrator's timeout.
func (mg *migrator) call(ctx context.Context, sc *redis.Script, keys []string, args ...any) ([]any, error) {
	ctx, cancel := context.WithTimeout(ctx, mg.o.Timeout)
	defer cancel()
	return sc.Run(ctx, mg.r, keys, args...).Slice()
}

// begin checks that the prefix may be migrated into, clears an
// interrupted migration's records when Force says so, and sets P
// migrating. It returns how many Redis keys it cleared.
func (mg *migrator) begin(ctx context.Context) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, mg.o.Timeout)
	defer cancel()
	flagKey := mg.flagKey()
	flag, err := mg.r.HGetAll(ctx, flagKey).Result()
	if err != nil {
		return 0, fmt.Errorf("read %s: %w", flagKey, err)
	}
	host := hostname()
	started := time.Now().UTC().Format(time.RFC3339)
	if len(flag) > 0 {
		if !mg.o.Force {
			return 0, fmt.Errorf("%w (%s, from %s, started %s on %s; or is it still running?)", ErrMigrationInterrupted,
				flagKey, orUnknown(flag[migSourceField]), orUnknown(flag[migStartedField]), orUnknown(flag[migHostField]))
		}
		// Take the flag over first: a migration still running stops at
		// its next batch, whose token no longer matches.
		err := mg.r.HSet(ctx, flagKey, migTokenField, mg.token, migSourceField, mg.o.Source,
			migStartedField, started, migHostField, host).Err()
		if err != nil {
			return 0, fmt.Errorf("take over %s: %w", flagKey, err)
		}
		n, err := mg.clear(ctx)
		if err != nil {
			return n, fmt.Errorf("clear the interrupted migration: %w", err)
		}
		mg.o.Log.Warn("cleared what an interrupted migration wrote", zap.Int("redis_keys", n),
			zap.String("interrupted_source", flag[migSourceField]))
		return n, nil
	}
	if mg.o.Force {
		return 0, fmt.Errorf("%w: %q holds no interrupted migration to clear; nothing was changed", ErrNothingToForce, mg.s.conn.Prefix())
	}
	if err := mg.checkEmpty(ctx); err != nil {
		return 0, err
	}
	v, err := migrateBeginScript.Run(ctx, mg.r, []string{flagKey}, mg.token, mg.o.Source, started, host).Int64()
	if err != nil {
		return 0, fmt.Errorf("set %s: %w", flagKey, err)
	}
	if v != 1 {
		return 0, fmt.Errorf("%w: another migration started at the same time", ErrMigrationInterrupted)
	}
	return 0, nil
}

// checkEmpty fails with ErrTargetNotEmpty when the prefix holds accounts,
// keys or reservations: listed in P accounts or P keys, or not.
func (mg *migrator) checkEmpty(ctx context.Context) error {
	s := mg.s
	var accts, keys, due *redis.IntCmd
	_, err := mg.r.Pipelined(ctx, func(p redis.Pipeliner) error {
		accts = p.SCard(ctx, s.accountsKey())
		keys = p.SCard(ctx, s.keysKey())
		due = p.Exists(ctx, s.resDueKey())
		return nil
	})
	if err != nil {
		return fmt.Errorf("check that %s is empty: %w", s.conn.Prefix(), err)
	}
	if accts.Val() > 0 || keys.Val() > 0 {
		return fmt.Errorf("%w: %d accounts and %d keys under %q", ErrTargetNotEmpty, accts.Val(), keys.Val(), s.conn.Prefix())
	}
	if due.Val() > 0 {
		return fmt.Errorf("%w: reservations under %q", ErrTargetNotEmpty, s.conn.Prefix())
	}
	for _, kind := range recordKinds {
		var found string
		err := mg.scan(ctx, kind, func(keys []string) error {
			found = keys[0]
			return errStopScan
		})
		if err != nil && !errors.Is(err, errStopScan) {
			return fmt.Errorf("check that %s is empty: %w", s.conn.Prefix(), err)
		}
		if found != "" {
			return fmt.Errorf("%w: %s exists (a record that P accounts and P keys do not list)", ErrTargetNotEmpty, found)
		}
	}
	return nil
}

// recordKinds are the hashes and sets of accounts, keys and reservations,
// one per ID: what an interrupted migration may have written.
var recordKinds = []string{"acct", "key", "acctkeys", "res"}

var errStopScan = errors.New("stop scanning")

// scan calls fn with the Redis keys P kind:*, a batch at a time.
func (mg *migrator) scan(ctx context.Context, kind string, fn func([]string) error) error {
	match := globEscape(mg.s.conn.Key(kind, "")) + "*"
	var cursor uint64
	for {
		keys, next, err := mg.r.Scan(ctx, cursor, match, 1000).Result()
		if err != nil {
			return err
		}
		if len(keys) > 0 {
			if err := fn(keys); err != nil {
				return err
			}
		}
		if next == 0 {
			return nil
		}
		cursor = next
	}
}

// clear deletes every account, key and reservation under the prefix, and
// their sets. The marker, P version and P changes stay: a migration
// changes them only in its last step, and replicas may remember the
// marker.
func (mg *migrator) clear(ctx context.Context) (int, error) {
	s := mg.s
	n := 0
	for _, kind := range recordKinds {
		err := mg.scan(ctx, kind, func(keys []string) error {
			d, err := mg.r.Unlink(ctx, keys...).Result()
			n += int(d)
			return err
		})
		if err != nil {
			return n, err
		}
	}
	d, err := mg.r.Unlink(ctx, s.accountsKey(), s.keysKey(), s.resDueKey()).Result()
	return n + int(d), err
}

// globEscape escapes the characters that SCAN MATCH reads as a pattern.
func globEscape(s string) string {
	var b strings.Builder
	for _, c := range s {
		if strings.ContainsRune(`*?[]\`, c) {
			b.WriteByte('\\')
		}
		b.WriteRune(c)
	}
	return b.String()
}

func (mg *migrator) writeAccounts(ctx context.Context, p *prepared) error {
	s := mg.s
	accts := p.m.Accounts
	for lo := 0; lo < len(accts); lo += mg.o.Batch {
		part := accts[lo:min(lo+mg.o.Batch, len(accts))]
		keys := make([]string, 0, 2+len(part))
		keys = append(keys, mg.flagKey(), s.accountsKey())
		args := make([]any, 0, 1+6*len(part))
		args = append(args, mg.token)
		for _, a := range part {
			keys = append(keys, s.acctKey(a.Record.ID))
			args = append(args, a.Record.ID, a.Record.Tier, a.Record.CreatedAt.UnixNano(), int64(a.Record.AlertBelow),
				int64(a.Balance), int64(p.acctRes[a.Record.ID]))
		}
		if err := mg.batch(ctx, "accounts", migrateAccountsScript, keys, args); err != nil {
			return err
		}
	}
	return nil
}

func (mg *migrator) writeKeys(ctx context.Context, p *prepared) error {
	s := mg.s
	ks := p.m.Keys
	for lo := 0; lo < len(ks); lo += mg.o.Batch {
		hi := min(lo+mg.o.Batch, len(ks))
		keys := make([]string, 0, 2+3*(hi-lo))
		keys = append(keys, mg.flagKey(), s.keysKey())
		args := make([]any, 0, 1+6*(hi-lo))
		args = append(args, mg.token)
		for i := lo; i < hi; i++ {
			k := &ks[i]
			keys = append(keys, s.keyKey(k.Record.ID), s.acctKeysKey(k.Record.Account), s.acctKey(k.Record.Account))
			args = append(args, k.Record.ID, k.Record.Account, p.keyRaw[i], int64(k.Spent), k.Period,
				int64(p.keyRes[k.Record.ID]))
		}
		if err := mg.batch(ctx, "keys", migrateKeysScript, keys, args); err != nil {
			return err
		}
	}
	return nil
}

func (mg *migrator) writeReservations(ctx context.Context, p *prepared) error {
	s := mg.s
	rs := p.m.Reservations
	for lo := 0; lo < len(rs); lo += mg.o.Batch {
		hi := min(lo+mg.o.Batch, len(rs))
		keys := make([]string, 0, 2+2*(hi-lo))
		keys = append(keys, mg.flagKey(), s.resDueKey())
		args := make([]any, 0, 1+8*(hi-lo))
		args = append(args, mg.token)
		for i := lo; i < hi; i++ {
			r, ra := &rs[i], &p.resByIndex[i]
			keys = append(keys, s.resKey(r.ID), s.keyKey(r.KeyID))
			args = append(args, r.ID, r.KeyID, ra.account, int64(r.Price), int64(r.MaxPrice), int64(ra.cap),
				int(ra.period), ra.deadline)
		}
		if err := mg.batch(ctx, "reservations", migrateReservationsScript, keys, args); err != nil {
			return err
		}
	}
	return nil
}

// batch runs one batch script and reads its reply.
func (mg *migrator) batch(ctx context.Context, what string, sc *redis.Script, keys []string, args []any) error {
	reply, err := mg.call(ctx, sc, keys, args...)
	if err != nil {
		return fmt.Errorf("write %s: %w", what, err)
	}
	code, _ := reply[0].(int64)
	var id string
	if len(reply) > 1 {
		id, _ = reply[1].(string)
	}
	switch code {
	case migOK:
		return nil
	case migDisplaced:
		return fmt.Errorf("write %s: %w", what, ErrMigrationDisplaced)
	case migExists:
		return fmt.Errorf("write %s: %w: %s was written meanwhile (by a replica?)", what, ErrTargetNotEmpty, id)
	case migNoAccount:
		return fmt.Errorf("write %s: key %s: its account disappeared from redis meanwhile", what, id)
	case migNoKey:
		return fmt.Errorf("write %s: reservation %q: its key disappeared from redis meanwhile", what, id)
	}
	return fmt.Errorf("write %s: %w: %v", what, errUnexpected, reply)
}

// commit ends the migration (see migrateCommitScript); with nothing
// migrated it only removes P migrating.
func (mg *migrator) commit(ctx context.Context, p *prepared) (int64, error) {
	s := mg.s
	ctx, cancel := context.WithTimeout(ctx, mg.o.Timeout)
	defer cancel()
	records := len(p.m.Accounts) + len(p.m.Keys)
	if records == 0 {
		if err := mg.r.Del(ctx, mg.flagKey()).Err(); err != nil {
			return 0, fmt.Errorf("end the migration: %w", err)
		}
		v, err := mg.r.Get(ctx, s.versionKey()).Int64()
		if errors.Is(err, redis.Nil) {
			err = nil
		}
		return v, err
	}
	v, err := migrateCommitScript.Run(ctx, mg.r, []string{mg.flagKey(), s.versionKey(), s.changesKey()},
		mg.token, records-1, p.m.Accounts[0].Record.ID, streamMaxLen, migrateBy).Int64()
	if err != nil {
		return 0, fmt.Errorf("end the migration: %w", err)
	}
	if v < 0 {
		return 0, fmt.Errorf("end the migration: %w", ErrMigrationDisplaced)
	}
	return v, nil
}

func (mg *migrator) flagKey() string { return mg.s.conn.Key("migrating") }

func orUnknown(s string) string {
	if s == "" {
		return "unknown"
	}
	return s
}

// hostname names this machine in P migrating.
func hostname() string {
	h, err := os.Hostname()
	if err != nil || h == "" {
		return "unknown"
	}
	return h
}
