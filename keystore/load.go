package keystore

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"runtime"
	"runtime/debug"
	"sync"

	bolt "go.etcd.io/bbolt"
	"go.uber.org/zap"

	"github.com/keygate/keygate/keystore/money"
)

// Open must load a million keys in well under two seconds and keep them in
// about 300 bytes each, so loading is built for it:
//
//   - Keys and their entries live in two slabs, strings are cut from shared
//     chunks, and every slice is sized once: a few large objects instead of
//     millions of small ones, which keeps the garbage collector's work low,
//     at startup and in every later cycle.
//   - The keys bucket is split into one range per CPU, each decoded by its
//     own goroutine in its own read transaction (bbolt transactions are not
//     shared between goroutines), into its own part of the slabs.
//   - The slabs that Checks read, and the index's arrays, are advised onto
//     huge pages (hugePages) before they are written: one TLB entry for
//     2 MiB of them instead of 4 KiB.

// load reads the whole store into memory: accounts with their balances, and
// keys with their spend, into the admin index and the hot-path index.
func (s *Store) load() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%s: %w: %s", s.path, ErrNotKeygate, fmt.Sprintf(format, args...))
	}
	var ranges []keyRange
	var version uint64
	err := s.db.View(func(tx *bolt.Tx) error {
		meta := tx.Bucket(bucketMeta)
		if meta == nil || !bytes.Equal(meta.Get(metaMagic), magicValue) {
			return bad("no keygate metadata (is it another program's bbolt file?)")
		}
		raw := meta.Get(metaSchema)
		if len(raw) != 8 || binary.BigEndian.Uint64(raw) == 0 {
			return bad("bad schema version %x", raw)
		}
		version = binary.BigEndian.Uint64(raw)
		if version > schemaVersion {
			return fmt.Errorf("%s: %w: schema version %d, this keygate reads up to %d (upgrade keygate)",
				s.path, ErrSchema, version, schemaVersion)
		}
		return nil
	})
	if err != nil {
		return err
	}
	if version < schemaVersion {
		if err := s.upgrade(version); err != nil {
			if errors.Is(err, errRecord) { // the old file's data, not the disk
				return bad("upgrade from schema %d: %v", version, err)
			}
			return fmt.Errorf("%s: upgrade from schema %d: %w", s.path, version, err)
		}
	}
	err = s.db.View(func(tx *bolt.Tx) error {
		for _, name := range allBuckets {
			if tx.Bucket(name) == nil {
				return bad("bucket %q is missing", name)
			}
		}
		if err := s.loadAccounts(tx); err != nil {
			return bad("%v", err)
		}
		ranges = splitKeys(tx.Bucket(bucketKeys), min(runtime.GOMAXPROCS(0), 8))
		return nil
	})
	if err != nil {
		return err
	}
	if err := s.loadKeys(ranges); err != nil {
		return bad("%v", err)
	}
	if err := s.db.View(s.loadReservations); err != nil {
		return bad("%v", err)
	}
	return nil
}

// upgrade brings a store of an older schema to this one, in one
// transaction: schema 2 only added buckets (its new record fields are
// optional); schema 3 moved balances and spends into ledger blocks.
func (s *Store) upgrade(from uint64) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		for _, name := range v2Buckets {
			if _, err := tx.CreateBucketIfNotExists(name); err != nil {
				return err
			}
		}
		if err := upgradeLedger(tx); err != nil {
			return err
		}
		var v [8]byte
		binary.BigEndian.PutUint64(v[:], schemaVersion)
		s.log.Info("store upgraded", zap.String("path", s.path), zap.Uint64("from_schema", from),
			zap.Int("to_schema", schemaVersion))
		return tx.Bucket(bucketMeta).Put(metaSchema, v[:])
	})
}

// upgradeLedger gives every account and key a slot, in ID order, moves
// their balances and spends into ledger blocks, and drops the schema 2
// buckets that held them.
func upgradeLedger(tx *bolt.Tx) error {
	for _, name := range [][]byte{bucketAccountSlots, bucketKeySlots, bucketLedger} {
		if _, err := tx.CreateBucket(name); err != nil {
			return err
		}
	}
	w := newBlockWriter(tx)
	for _, part := range []struct {
		kind                byte
		from, values, slots []byte
		read                func(v []byte) (money.Micros, int32, error)
	}{
		{blockAccounts, bucketAccounts, bucketBalancesV2, bucketAccountSlots, func(v []byte) (money.Micros, int32, error) {
			if v == nil {
				return 0, 0, fmt.Errorf("%w: no balance", errRecord)
			}
			m, err := getBalance(v)
			return m, 0, err
		}},
		{blockKeys, bucketKeys, bucketSpendV2, bucketKeySlots, func(v []byte) (money.Micros, int32, error) {
			if v == nil {
				return 0, 0, nil // never spent
			}
			return getSpend(v)
		}},
	} {
		values := tx.Bucket(part.values)
		if values == nil {
			return fmt.Errorf("%w: the bucket of %s values is missing", errRecord, part.from)
		}
		slots := tx.Bucket(part.slots)
		var slot uint32
		c := tx.Bucket(part.from).Cursor()
		for k, _ := c.First(); k != nil; k, _ = c.Next() {
			m, period, err := part.read(values.Get(k))
			if err != nil {
				return fmt.Errorf("value of %s: %w", k, err)
			}
			if err := slots.Put(k, slotRecord(slot)); err != nil {
				return err
			}
			if m != 0 || period != 0 {
				if err := w.set(part.kind, slot, m, period); err != nil {
					return err
				}
			}
			slot++
		}
	}
	if err := w.flush(); err != nil {
		return err
	}
	for _, name := range [][]byte{bucketBalancesV2, bucketSpendV2} {
		if err := tx.DeleteBucket(name); err != nil {
			return err
		}
	}
	return nil
}

func (s *Store) loadAccounts(tx *bolt.Tx) error {
	n := tx.Bucket(bucketAccounts).Stats().KeyN
	slab := make([]account, 0, n)
	var strs stringArena
	blocks, err := readBlocks(tx, blockAccounts)
	if err != nil {
		return err
	}
	// Slots are keyed like accounts, so both cursors advance together.
	sc := tx.Bucket(bucketAccountSlots).Cursor()
	sk, sv := sc.First()
	c := tx.Bucket(bucketAccounts).Cursor()
	for k, v := c.First(); k != nil; k, v = c.Next() {
		if len(slab) == n {
			return errors.New("the accounts bucket holds more accounts than it counts")
		}
		if err := validateAccountID(string(k)); err != nil {
			return err
		}
		rec, err := decodeAccount(v)
		if err != nil {
			return fmt.Errorf("account %s: %w", k, err)
		}
		if sk == nil || !bytes.Equal(sk, k) {
			return fmt.Errorf("account %s has no ledger slot (or the slot of %q has no account)", k, sk)
		}
		slot, err := getSlot(sv)
		if err != nil {
			return fmt.Errorf("account %s: %w", k, err)
		}
		b, err := blocks.balance(slot)
		if err != nil {
			return fmt.Errorf("account %s: %w", k, err)
		}
		sk, sv = sc.Next()
		s.accountSlots.commit(slot + 1)
		slab = append(slab, account{createdAt: rec.createdAt, balance: b, alertBelow: rec.alertBelow, slot: slot})
		a := &slab[len(slab)-1]
		strs.add(&a.id, k)
		strs.add(&a.tier, rec.tier)
	}
	if sk != nil {
		return fmt.Errorf("the ledger slot of %q has no account", sk)
	}
	strs.flush()
	for i := range slab {
		a := &slab[i]
		a.tier = s.internLocked(a.tier)
		s.accounts[a.id] = a
	}
	return nil
}

// keyRange is a part of the keys bucket: from from (nil: the first key) up
// to to (nil: past the last), holding n keys.
type keyRange struct {
	from, to []byte
	n        int
}

// splitKeys cuts the keys bucket into up to parts ranges of equal size.
func splitKeys(b *bolt.Bucket, parts int) []keyRange {
	n := b.Stats().KeyN
	if n < 10_000 || parts < 2 {
		return []keyRange{{n: n}}
	}
	ranges := make([]keyRange, 0, parts)
	from, count := []byte(nil), 0
	c := b.Cursor()
	for k, _ := c.First(); k != nil; k, _ = c.Next() {
		if len(ranges) < parts-1 && count == n/parts {
			to := bytes.Clone(k)
			ranges = append(ranges, keyRange{from: from, to: to, n: count})
			from, count = to, 0
		}
		count++
	}
	return append(ranges, keyRange{from: from, n: count})
}

// keyLoader fills the slabs; each range writes only its own part.
type keyLoader struct {
	s       *Store
	keys    []Key
	entries []keyEntry
	hashes  []pendingHash

	mu sync.Mutex // guards the store's intern tables while loading
}

// loadKeys builds the key indexes from the ranges, in parallel.
func (s *Store) loadKeys(ranges []keyRange) error {
	n := 0
	for _, r := range ranges {
		n += r.n
	}
	l := &keyLoader{
		s:       s,
		keys:    make([]Key, n),
		entries: make([]keyEntry, n),
		hashes:  make([]pendingHash, n),
	}
	hugePages(l.keys) // read by every Lookup: see hugePages
	hugePages(l.entries)
	errs := make([]error, len(ranges))
	var wg sync.WaitGroup
	next := 0
	for i, r := range ranges {
		lo := next
		wg.Go(func() {
			errs[i] = recoverCorrupt(func() error {
				return s.db.View(func(tx *bolt.Tx) error { return l.loadRange(tx, r, lo) })
			})
		})
		next += r.n
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}

	s.byID = make([]*keyEntry, n)
	for i := range l.entries {
		s.byID[i] = &l.entries[i] // the ranges are in key order: byID comes out sorted
	}
	// Each account's key list is a window of one array.
	perAccount := make(map[*account]int, len(s.accounts))
	for i := range l.keys {
		perAccount[l.keys[i].acct]++
	}
	lists := make([]*keyEntry, n)
	for a, count := range perAccount {
		a.keys, lists = lists[:0:count], lists[count:]
	}
	for i := range l.keys {
		a := l.keys[i].acct
		a.keys = append(a.keys, &l.entries[i])
	}
	err := s.db.View(func(tx *bolt.Tx) error { return s.loadSpend(tx) })
	if err != nil {
		return err
	}
	s.idx.build(l.hashes, l.keys)
	return nil
}

// loadRange decodes the keys of r into the slabs from index lo on.
func (l *keyLoader) loadRange(tx *bolt.Tx, r keyRange, lo int) error {
	var (
		strs   stringArena
		scopes = map[string][]string{} // this goroutine's view of the intern table
		i      = lo
		c      = tx.Bucket(bucketKeys).Cursor()
		k, v   []byte
	)
	if r.from == nil {
		k, v = c.First()
	} else {
		k, v = c.Seek(r.from)
	}
	for ; k != nil && (r.to == nil || bytes.Compare(k, r.to) < 0); k, v = c.Next() {
		if i == lo+r.n {
			return errors.New("the keys bucket holds more keys than it counts")
		}
		rec, err := decodeKey(v)
		if err != nil {
			return fmt.Errorf("key %s: %w", k, err)
		}
		a := l.s.accounts[string(rec.account)]
		if a == nil {
			return fmt.Errorf("key %s: account %q does not exist", k, rec.account)
		}
		set, ok := scopes[string(rec.scopes)]
		if !ok {
			l.mu.Lock()
			set = l.s.scopeSetLocked(rec.scopeList())
			l.mu.Unlock()
			scopes[string(rec.scopes)] = set
		}
		e := &l.entries[i]
		e.createdAt, e.capPeriod = rec.createdAt, rec.capPeriod
		key := &l.keys[i]
		*key = Key{
			Scopes: set, RateLimit: rec.rate, SpendCap: rec.spendCap,
			expiresAt: rec.expiresAt, revokedAt: rec.revokedAt, acct: a, entry: e,
		}
		e.cur = key
		strs.add(&key.ID, k)
		strs.add(&e.name, rec.name)
		strs.add(&e.rotatedTo, rec.rotatedTo)
		l.hashes[i] = pendingHash{hash: rec.hash, ord: uint32(i)}
		i++
	}
	if i != lo+r.n {
		return errors.New("the keys bucket holds fewer keys than it counts")
	}
	strs.flush()
	return nil
}

// loadSpend sets each key's slot and spend. Slots are keyed like keys,
// and byID is in key order: both are walked together.
func (s *Store) loadSpend(tx *bolt.Tx) error {
	blocks, err := readBlocks(tx, blockKeys)
	if err != nil {
		return err
	}
	i := 0
	c := tx.Bucket(bucketKeySlots).Cursor()
	for k, v := c.First(); k != nil; k, v = c.Next() {
		if i == len(s.byID) || s.byID[i].cur.ID != string(k) {
			return fmt.Errorf("the ledger slot of %q has no key (or a key has no slot)", k)
		}
		slot, err := getSlot(v)
		if err != nil {
			return fmt.Errorf("key %s: %w", k, err)
		}
		m, period, err := blocks.spend(slot)
		if err != nil {
			return fmt.Errorf("key %s: %w", k, err)
		}
		e := s.byID[i]
		e.slot, e.spent, e.period = slot, m, period
		s.keySlots.commit(slot + 1)
		i++
	}
	if i != len(s.byID) {
		return fmt.Errorf("key %s has no ledger slot", s.byID[i].cur.ID)
	}
	return nil
}

// recoverCorrupt runs f, turning a panic or a memory fault (see openDB) into
// an error. Open's loading goroutines need their own: a panic cannot cross
// goroutines.
func recoverCorrupt(f func() error) (err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("the file is corrupt (%v)", p)
		}
	}()
	return f()
}

// stringArena makes many small strings out of few allocations: bytes are
// gathered into a chunk, and when it is full, one string of the chunk is
// made and each destination gets its slice of it. Destinations must not be
// read before flush.
type stringArena struct {
	buf     []byte
	pending []pendingString
}

type pendingString struct {
	dst     *string
	off, at int
}

const arenaChunk = 64 << 10

func (a *stringArena) add(dst *string, b []byte) {
	if len(b) == 0 {
		return
	}
	a.pending = append(a.pending, pendingString{dst: dst, off: len(a.buf), at: len(a.buf) + len(b)})
	a.buf = append(a.buf, b...)
	if len(a.buf) >= arenaChunk {
		a.flush()
	}
}

func (a *stringArena) flush() {
	if len(a.pending) == 0 {
		return
	}
	chunk := string(a.buf)
	for _, p := range a.pending {
		*p.dst = chunk[p.off:p.at]
	}
	a.buf, a.pending = a.buf[:0], a.pending[:0]
}
