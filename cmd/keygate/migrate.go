package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"math/big"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/spf13/cobra"
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
	st, err := openSource(db)
	if err != nil {
		return fmt.Errorf("keygate migrate: %w", err)
	}
	// The file stays locked until the end: a keygate serve started on it
	// meanwhile fails instead of taking debits Redis would not see. Nothing
	// is written to it (no Check runs), so closing it loses nothing.
	defer st.Close() //nolint:errcheck // see above
	snap, err := readSource(st)
	if err != nil {
		return fmt.Errorf("keygate migrate: %w", err)
	}
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

// migrateSource is a store file's content, ready for redisstore.Migrate.
type migrateSource struct {
	m       redisstore.Migration
	balance *big.Int // the sum of the balances
	outbox  int      // alerts not yet delivered
}

// openSource opens the store at path as every --db command does: it
// refuses a file that a server holds (ErrLocked), that is not a keygate
// store or is corrupt, or that is a Redis replica's cache, and upgrades an
// older schema. The caller keeps it open, and so the file locked, until
// the migration ends: a keygate serve started on it meanwhile fails
// instead of taking debits Redis would not see.
func openSource(path string) (*keystore.Store, error) {
	st, err := keystore.Open(path, keystore.Options{LockTimeout: time.Second})
	if errors.Is(err, keystore.ErrLocked) {
		return nil, errInUse(path)
	}
	if err != nil {
		return nil, err
	}
	mirror, err := redisstore.IsMirror(st)
	if err == nil && mirror {
		err = fmt.Errorf("%s is the local cache of a store: redis replica, not a bbolt store: its balances are not the truth, and Redis already has its keys; migrate the bbolt file the deployment used before Redis", path)
	}
	if err != nil {
		st.Close() //nolint:errcheck // the error above matters more
		return nil, err
	}
	return st, nil
}

// readSource reads what migrate copies, and what it leaves behind.
func readSource(st *keystore.Store) (*migrateSource, error) {
	exp, err := st.Export()
	if err != nil {
		return nil, err
	}
	alerts, err := st.PendingAlerts()
	if err != nil {
		return nil, err
	}
	src := &migrateSource{m: exp, balance: new(big.Int), outbox: len(alerts)}
	for _, a := range exp.Accounts {
		src.balance.Add(src.balance, big.NewInt(int64(a.Balance)))
	}
	return src, nil
}

// warnings are what the operator should know before the data moves: what
// migrate leaves behind, and records the config does not fit.
func (s *migrateSource) warnings(cfg *config.Config) []string {
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
