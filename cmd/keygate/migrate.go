package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"math/big"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/spf13/cobra"
	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
	"go.uber.org/zap"

	"github.com/keygate/keygate/cmd/keygate/config"
	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/money"
	"github.com/keygate/keygate/keystore/rconn"
	"github.com/keygate/keygate/keystore/redisstore"
)

// migrateHelp is keygate migrate's --help.
const migrateHelp = `Copy a store: bbolt file into the Redis of a store: redis config, so that
every key keeps working (only the hashes of secrets are stored: keys cannot
be issued again), with every balance, spend (in its cap period), setting and
open reservation (settle: on_response).

migrate reads --db offline: stop keygate serve on it first (it refuses while
a server holds the file). It writes into the Redis that --config's redis:
block names (addr, db, key_prefix; KEYGATE_REDIS_PASSWORD as for serve), in
batches, and refuses a key prefix that already holds accounts, keys or
reservations: it never merges. The data becomes visible to replicas in one
last step; replicas already running on the prefix then sync in full.

If migrate stops midway (Redis went away, ^C), what it wrote stays under the
prefix, marked by PREFIX + "migrating"; migrating again refuses and says so.
Run it again with --force: that deletes every account, key and reservation
under the prefix (it is refused when no interrupted migration is there, so it
never deletes a deployment's data), then migrates.

The file is not changed. Afterwards, start every replica with the same
config and a NEW --db file of its own (with store: redis, --db is the
replica's cache of key records). Keep the old file as the backup of the
moment of migration; do not serve it with store: bbolt again, as nothing it
changes would reach Redis.`

// migrateTimeout bounds each Redis call of a migration (a batch is one).
// The config's redis.timeout bounds the Check path (50ms by default): too
// short for a script that writes hundreds of records over a network.
const migrateTimeout = 30 * time.Second

// errInUse is the message for a store file that a server holds.
func errInUse(path string) error {
	return fmt.Errorf("%s is in use by a running keygate serve: stop it first (migrate reads the store offline, so that no debit made meanwhile is lost)", path)
}

func newMigrateCmd() *cobra.Command {
	var db, cfgPath, output string
	var force bool
	c := &cobra.Command{
		Use:   "migrate --db FILE --config FILE [--force]",
		Short: "Copy a bbolt store's accounts, keys, balances, spend and reservations into Redis (store: redis)",
		Long:  migrateHelp,
		Args:  noArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			switch {
			case db == "":
				return errors.New("keygate migrate: --db FILE is required: the bbolt store to migrate")
			case cfgPath == "":
				return errors.New("keygate migrate: --config FILE is required: the store: redis config the replicas will run with")
			case output != "table" && output != "json":
				return fmt.Errorf("keygate migrate: -o %q: want table or json", output)
			}
			return runMigrate(c, db, cfgPath, force, output == "json")
		},
	}
	f := c.Flags()
	f.StringVar(&db, "db", "", "the store: bbolt file to migrate (no keygate serve may hold it)")
	f.StringVar(&cfgPath, "config", "", "the store: redis config whose redis: block names the target")
	f.BoolVar(&force, "force", false, "first delete what an interrupted migrate wrote under the key prefix (refused when there is none)")
	f.StringVarP(&output, "output", "o", "table", "output format: table or json")
	return c
}

// migrateSummary is what migrate prints (-o json: as is).
type migrateSummary struct {
	DB            string `json:"db"`
	RedisAddr     string `json:"redis_addr"`
	RedisDB       int    `json:"redis_db"`
	KeyPrefix     string `json:"key_prefix"`
	Accounts      int    `json:"accounts"`
	Keys          int    `json:"keys"`
	Reservations  int    `json:"reservations"`
	BalanceMicros string `json:"balance_micros"` // a decimal string: a sum may pass int64
	BalanceUSD    string `json:"balance_usd"`
	Cleared       int    `json:"cleared_redis_keys,omitempty"`
	Epoch         string `json:"redis_epoch"`
	Version       int64  `json:"redis_version"`
}

func runMigrate(c *cobra.Command, db, cfgPath string, force, asJSON bool) error {
	cfg, err := config.Load(cfgPath)
	if err != nil {
		return err
	}
	if cfg.Store != config.StoreRedis {
		return fmt.Errorf("keygate migrate: --config %s has store: %s; give the store: redis config the replicas will run with", cfgPath, cfg.Store)
	}
	if _, err := os.Stat(db); errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("keygate migrate: --db %s: no such store file", db)
	}
	snap, release, err := readBBolt(db)
	if err != nil {
		return fmt.Errorf("keygate migrate: %w", err)
	}
	// The file stays locked (shared) until the end: a keygate serve started
	// on it meanwhile fails instead of taking debits Redis would not see.
	defer release()
	stderr := c.ErrOrStderr()
	for _, w := range snap.warnings(cfg) {
		fmt.Fprintln(stderr, "keygate migrate: warning: "+w)
	}

	r := cfg.Redis
	rc := rconn.Config{Addr: r.Addr, Password: r.Password, DB: r.DB, KeyPrefix: r.KeyPrefix, Timeout: max(cfg.RedisTimeout, migrateTimeout)}
	if r.TLS != nil {
		rc.TLS = &rconn.TLS{CAFile: r.TLS.CAFile, ServerName: r.TLS.ServerName}
	}
	// go-redis logs dial failures through a process-wide logger; the
	// error this command returns says it all.
	redis.SetLogger(redisLog{zap.NewNop().Sugar()})
	conn, err := rconn.Dial(rc, rconn.Options{})
	if err != nil {
		return fmt.Errorf("keygate migrate: redis: %w", err)
	}
	defer conn.Close()
	ctx := c.Context()
	if ctx == nil {
		ctx = context.Background()
	}
	pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	if err := conn.Client().WithTimeout(5 * time.Second).Ping(pctx).Err(); err != nil {
		cancel()
		return fmt.Errorf("keygate migrate: cannot reach redis at %s: %w", r.Addr, err)
	}
	for _, w := range conn.CheckPersistence(pctx) {
		fmt.Fprintln(stderr, "keygate migrate: warning: redis persistence: "+w)
	}
	cancel()

	res, err := redisstore.Migrate(ctx, conn, snap.m, redisstore.MigrateOptions{
		Force: force, Source: db, Timeout: migrateTimeout, Log: zap.NewNop(),
	})
	if err != nil {
		return migrateErr(err, db, cfgPath, r)
	}
	sum := migrateSummary{
		DB: db, RedisAddr: r.Addr, RedisDB: r.DB, KeyPrefix: conn.Prefix(),
		Accounts: res.Accounts, Keys: res.Keys, Reservations: res.Reservations,
		BalanceMicros: snap.balance.String(), BalanceUSD: bigUSD(snap.balance),
		Cleared: res.Cleared, Epoch: res.Epoch, Version: res.Version,
	}
	if asJSON {
		return writeJSON(c.OutOrStdout(), sum)
	}
	return printMigrateSummary(c.OutOrStdout(), sum)
}

// migrateErr says what to do about a failed migration.
func migrateErr(err error, db, cfgPath string, r *config.Redis) error {
	where := fmt.Sprintf("redis %s (db %d, key_prefix %q)", r.Addr, r.DB, r.KeyPrefix)
	rerun := fmt.Sprintf("keygate migrate --db %s --config %s --force", db, cfgPath)
	switch {
	case errors.Is(err, redisstore.ErrTargetNotEmpty):
		return fmt.Errorf("keygate migrate: %w; migrate never merges, so nothing was written: migrate into an empty key_prefix or db "+
			"(this was %s), or delete that data with redis tools first if it is unwanted", err, where)
	case errors.Is(err, redisstore.ErrMigrationInterrupted):
		return fmt.Errorf("keygate migrate: %w: %s holds what it wrote, unfinished. Make sure no migrate is running, then run `%s` "+
			"to delete every account, key and reservation under the prefix and migrate again", err, where, rerun)
	case errors.Is(err, redisstore.ErrNothingToForce):
		return fmt.Errorf("keygate migrate: %w (drop --force)", err)
	case errors.Is(err, keystore.ErrInvalid), errors.Is(err, keystore.ErrAccountNotFound), errors.Is(err, keystore.ErrKeyNotFound):
		return fmt.Errorf("keygate migrate: %s holds a record that keygate would not accept: %w; nothing was written", db, err)
	}
	return fmt.Errorf("keygate migrate: %w. What was written so far stays in %s, unfinished, and replicas do not see it; "+
		"once the cause is fixed, run `%s` to delete it and migrate again", err, where, rerun)
}

func printMigrateSummary(w io.Writer, s migrateSummary) error {
	var b strings.Builder
	fmt.Fprintf(&b, "migrated %s into redis %s (db %d, key_prefix %q)\n", s.DB, s.RedisAddr, s.RedisDB, s.KeyPrefix)
	fmt.Fprintf(&b, "  accounts      %d (total balance $%s)\n", s.Accounts, s.BalanceUSD)
	fmt.Fprintf(&b, "  keys          %d\n", s.Keys)
	fmt.Fprintf(&b, "  reservations  %d\n", s.Reservations)
	if s.Cleared > 0 {
		fmt.Fprintf(&b, "  cleared first %d redis keys of the interrupted migration\n", s.Cleared)
	}
	fmt.Fprintf(&b, "  redis epoch   %s\n", s.Epoch)
	fmt.Fprintf(&b, `next:
  - start every replica with this config and a NEW --db file of its own: with
    store: redis, --db is the replica's cache of key records. Do not give a
    replica %s: it would become that replica's cache.
  - keep %s as the backup of this moment; do not serve it with store: bbolt
    again: nothing it changes would reach Redis.
`, s.DB, s.DB)
	_, err := io.WriteString(w, b.String())
	return err
}

// bigUSD formats micro-dollars as money.Micros.USD does, for any sum.
func bigUSD(m *big.Int) string {
	if m.IsInt64() {
		if v := m.Int64(); v >= -int64(money.Max) && v <= int64(money.Max) {
			return money.Micros(v).USD()
		}
	}
	whole, frac := new(big.Int).QuoRem(new(big.Int).Abs(m), big.NewInt(int64(money.PerUSD)), new(big.Int))
	fs := strings.TrimRight(fmt.Sprintf("%06d", frac.Int64()), "0")
	for len(fs) < 2 {
		fs += "0"
	}
	sign := ""
	if m.Sign() < 0 {
		sign = "-"
	}
	return sign + whole.String() + "." + fs
}

// ---------------------------------------------------------------------------
// Reading the bbolt store

// The bbolt file's layout (keystore/store.go and codec.go), read here
// because keystore exports records but not a walk of the file with the
// secrets' hashes, raw spend and reservations. readBBolt checks every
// value read here against what keystore itself loads from the same file.
var (
	bucketMeta     = []byte("meta")
	bucketAccounts = []byte("accounts")     // id → keystore.AccountRecord encoding
	bucketBalances = []byte("balances")     // id → 8-byte big-endian balance
	bucketKeys     = []byte("keys")         // id → keystore.KeyRecord encoding
	bucketSpend    = []byte("spend")        // id → 8-byte spend [+ 4-byte cap period]; absent: 0
	bucketReserved = []byte("reservations") // request id, 0, 8-byte seq → reservation record
	bucketOutbox   = []byte("outbox")       // undelivered alerts
	metaMagic      = []byte("magic")
	metaSchema     = []byte("schema_version")
	magicValue     = []byte("keygate store")
)

// bboltSchema is the one layout read here: keystore.Open upgrades older
// ones, and refuses newer ones.
const bboltSchema = 2

// bboltSnapshot is a store file's content, ready for redisstore.Migrate.
type bboltSnapshot struct {
	m       redisstore.Migration
	balance *big.Int // the sum of the balances
	outbox  int      // alerts not yet delivered
}

// readBBolt reads the store at path. keystore.Open opens it first, as
// every --db command does: it refuses a file that a server holds
// (ErrLocked), that is not a keygate store or is corrupt, or that is a
// Redis replica's cache, upgrades an older schema, and loads every record,
// so the walk that follows reads a file known to be sound, and its results
// must equal what keystore loaded. The file is then opened read-only,
// holding bbolt's shared lock until release: a keygate serve cannot take it
// while the migration runs.
func readBBolt(path string) (*bboltSnapshot, func(), error) {
	st, err := keystore.Open(path, keystore.Options{LockTimeout: time.Second})
	if errors.Is(err, keystore.ErrLocked) {
		return nil, nil, errInUse(path)
	}
	if err != nil {
		return nil, nil, err
	}
	mirror, err := redisstore.IsMirror(st)
	if err == nil && mirror {
		err = fmt.Errorf("%s is the local cache of a store: redis replica, not a bbolt store: its balances are not the truth, and Redis already has its keys; migrate the bbolt file the deployment used before Redis", path)
	}
	if err != nil {
		st.Close() //nolint:errcheck // the error above matters more
		return nil, nil, err
	}
	now := time.Now()
	accts, keys := st.Accounts(), st.Keys("")
	if err := st.Close(); err != nil {
		return nil, nil, fmt.Errorf("close %s: %w", path, err)
	}

	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
	switch {
	case errors.Is(err, bolterrors.ErrTimeout):
		return nil, nil, errInUse(path)
	case err != nil:
		return nil, nil, fmt.Errorf("open %s: %w", path, err)
	}
	release := func() { db.Close() } //nolint:errcheck // read-only: nothing to lose
	snap := &bboltSnapshot{balance: new(big.Int)}
	if err := db.View(snap.read); err != nil {
		release()
		return nil, nil, fmt.Errorf("%s: %w: %w", path, keystore.ErrNotKeygate, err)
	}
	if err := snap.agrees(accts, keys, now); err != nil {
		release()
		return nil, nil, fmt.Errorf("%s: %w (did a keygate serve run on it meanwhile? run migrate again)", path, err)
	}
	return snap, release, nil
}

// read walks the file in one transaction.
func (s *bboltSnapshot) read(tx *bolt.Tx) error {
	meta := tx.Bucket(bucketMeta)
	if meta == nil || !bytes.Equal(meta.Get(metaMagic), magicValue) {
		return errors.New("no keygate metadata")
	}
	if raw := meta.Get(metaSchema); len(raw) != 8 || binary.BigEndian.Uint64(raw) != bboltSchema {
		return fmt.Errorf("schema version %x, want %d", raw, bboltSchema)
	}
	for _, name := range [][]byte{bucketAccounts, bucketBalances, bucketKeys, bucketSpend, bucketReserved, bucketOutbox} {
		if tx.Bucket(name) == nil {
			return fmt.Errorf("bucket %q is missing", name)
		}
	}
	bal := tx.Bucket(bucketBalances)
	err := tx.Bucket(bucketAccounts).ForEach(func(k, v []byte) error {
		a := redisstore.MigrateAccount{Record: keystore.AccountRecord{ID: string(k)}}
		if err := a.Record.UnmarshalBinary(v); err != nil {
			return fmt.Errorf("account %s: %w", k, err)
		}
		b := bal.Get(k)
		if len(b) != 8 {
			return fmt.Errorf("balance of %s: %d bytes, want 8", k, len(b))
		}
		a.Balance = money.Micros(binary.BigEndian.Uint64(b))
		s.m.Accounts = append(s.m.Accounts, a)
		s.balance.Add(s.balance, big.NewInt(int64(a.Balance)))
		return nil
	})
	if err != nil {
		return err
	}
	spend := tx.Bucket(bucketSpend)
	err = tx.Bucket(bucketKeys).ForEach(func(k, v []byte) error {
		key := redisstore.MigrateKey{Record: keystore.KeyRecord{ID: string(k)}}
		if err := key.Record.UnmarshalBinary(v); err != nil {
			return fmt.Errorf("key %s: %w", k, err)
		}
		if b := spend.Get(k); b != nil {
			switch len(b) {
			case 12:
				key.Period = int32(binary.BigEndian.Uint32(b[8:]))
				if key.Period <= 0 {
					return fmt.Errorf("spend of %s: cap period %d", k, key.Period)
				}
			case 8:
			default:
				return fmt.Errorf("spend of %s: %d bytes, want 8 or 12", k, len(b))
			}
			key.Spent = money.Micros(binary.BigEndian.Uint64(b[:8]))
		}
		s.m.Keys = append(s.m.Keys, key)
		return nil
	})
	if err != nil {
		return err
	}
	if err := s.readReservations(tx.Bucket(bucketReserved)); err != nil {
		return err
	}
	s.outbox = tx.Bucket(bucketOutbox).Stats().KeyN
	return nil
}

// readReservations reads the open reservations. Two of one request ID
// (what a crash can leave; see keystore's loadReservations) both stay
// held: the newest keeps the request ID, which a Settle names, and the
// older ones get an ID no request has, so that they expire at their price.
func (s *bboltSnapshot) readReservations(b *bolt.Bucket) error {
	type disk struct {
		r   redisstore.MigrateReservation
		seq uint64
	}
	byID := map[string][]disk{}
	var order []string
	err := b.ForEach(func(dk, v []byte) error {
		if len(dk) < 10 || dk[len(dk)-9] != 0 {
			return fmt.Errorf("reservation key %q", dk)
		}
		id, seq := string(dk[:len(dk)-9]), binary.BigEndian.Uint64(dk[len(dk)-8:])
		r, err := decodeReservation(v)
		if err != nil {
			return fmt.Errorf("reservation %q: %w", id, err)
		}
		r.ID = id
		if byID[id] == nil {
			order = append(order, id)
		}
		byID[id] = append(byID[id], disk{r, seq})
		return nil
	})
	if err != nil {
		return err
	}
	for _, id := range order {
		ds := byID[id]
		slices.SortFunc(ds, func(a, b disk) int { return -cmpUint(a.seq, b.seq) }) // newest first
		for i, d := range ds {
			if i > 0 {
				d.r.ID = id + "\x00" + strconv.FormatUint(d.seq, 10)
			}
			s.m.Reservations = append(s.m.Reservations, d.r)
		}
	}
	return nil
}

func cmpUint(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// decodeReservation reads a reservation record: a version byte (1), the
// key ID (uvarint length, bytes), then price, max price and deadline (unix
// nanos) as varints.
func decodeReservation(b []byte) (redisstore.MigrateReservation, error) {
	var r redisstore.MigrateReservation
	if len(b) == 0 || b[0] != 1 {
		return r, errors.New("unknown record version")
	}
	b = b[1:]
	n, w := binary.Uvarint(b)
	if w <= 0 || n == 0 || n > 64 || uint64(len(b)-w) < n {
		return r, errors.New("bad key ID")
	}
	r.KeyID, b = string(b[w:w+int(n)]), b[w+int(n):]
	var vals [3]int64
	for i := range vals {
		v, w := binary.Varint(b)
		if w <= 0 {
			return r, errors.New("truncated")
		}
		vals[i], b = v, b[w:]
	}
	if len(b) != 0 {
		return r, errors.New("trailing bytes")
	}
	r.Price, r.MaxPrice, r.Deadline = money.Micros(vals[0]), money.Micros(vals[1]), time.Unix(0, vals[2])
	return r, nil
}

// agrees checks the walk against what keystore loaded from the file:
// accounts (records, balances, reserved amounts), keys (records, spend as
// shown at now, reserved amounts).
func (s *bboltSnapshot) agrees(accts []keystore.Account, keys []keystore.KeyInfo, now time.Time) error {
	if len(accts) != len(s.m.Accounts) || len(keys) != len(s.m.Keys) {
		return fmt.Errorf("read %d accounts and %d keys; keygate loads %d and %d",
			len(s.m.Accounts), len(s.m.Keys), len(accts), len(keys))
	}
	acctRes, keyRes := map[string]money.Micros{}, map[string]money.Micros{}
	keyAcct := make(map[string]string, len(s.m.Keys))
	for _, k := range s.m.Keys {
		keyAcct[k.Record.ID] = k.Record.Account
	}
	for _, r := range s.m.Reservations {
		acctRes[keyAcct[r.KeyID]] += r.Price
		keyRes[r.KeyID] += r.Price
	}
	byID := make(map[string]*redisstore.MigrateAccount, len(s.m.Accounts))
	for i := range s.m.Accounts {
		byID[s.m.Accounts[i].Record.ID] = &s.m.Accounts[i]
	}
	for _, a := range accts {
		m := byID[a.ID]
		if m == nil || m.Balance != a.Balance || m.Record.Tier != a.Tier || m.Record.AlertBelow != a.AlertBelow ||
			!m.Record.CreatedAt.Equal(a.CreatedAt) || acctRes[a.ID] != a.Reserved {
			return fmt.Errorf("account %s reads differently than keygate loads it", a.ID)
		}
	}
	kByID := make(map[string]*redisstore.MigrateKey, len(s.m.Keys))
	for i := range s.m.Keys {
		kByID[s.m.Keys[i].Record.ID] = &s.m.Keys[i]
	}
	for _, k := range keys {
		m := kByID[k.ID]
		if m == nil || m.Record.Account != k.Account || m.Record.SpendCap != k.SpendCap || m.Record.CapPeriod != k.CapPeriod ||
			!m.Record.RevokedAt.Equal(k.RevokedAt) || keyRes[k.ID] != k.Reserved {
			return fmt.Errorf("key %s reads differently than keygate loads it", k.ID)
		}
		spent := m.Spent
		if m.Record.CapPeriod != keystore.PeriodNone && m.Record.CapPeriod.Index(now) > m.Period {
			spent = 0 // a period that has ended: keygate shows it as 0, and so does Redis
		}
		if spent != k.Spent && !(k.Spent == 0 && m.Record.CapPeriod != keystore.PeriodNone) {
			return fmt.Errorf("key %s: spent %d, keygate loads %d", k.ID, int64(spent), int64(k.Spent))
		}
	}
	return nil
}

// warnings are what the operator should know before the data moves: what
// migrate leaves behind, and records the config does not fit.
func (s *bboltSnapshot) warnings(cfg *config.Config) []string {
	var out []string
	if s.outbox > 0 {
		out = append(out, fmt.Sprintf("%d alerts raised but not yet delivered stay in the bbolt file's outbox: they are not migrated "+
			"(to deliver them, serve the file with its bbolt config once before migrating)", s.outbox))
	}
	if len(cfg.Tiers) > 0 {
		unknown := map[string]bool{}
		for _, a := range s.m.Accounts {
			if _, ok := cfg.Tiers[a.Record.Tier]; !ok && a.Record.Tier != "" {
				unknown[a.Record.Tier] = true
			}
		}
		for _, t := range slices.Sorted(maps.Keys(unknown)) {
			out = append(out, fmt.Sprintf("tier %q of some accounts is not in the config's tiers", t))
		}
	}
	return out
}
