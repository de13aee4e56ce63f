package keystore

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"runtime/debug"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
	"go.uber.org/zap"
)

// Options configures Open. The zero value is usable.
type Options struct {
	// Log receives open, close, admin and flush-failure messages; nil
	// discards them. Secrets never reach it.
	Log *zap.Logger
	// LockTimeout is how long Open waits for another process to release the
	// file before failing with ErrLocked; 0 means 2s.
	LockTimeout time.Duration
	// FlushInterval is how often Run writes the ledger to disk; 0 means 1s.
	FlushInterval time.Duration
	// Metrics, if not nil, receives the ledger's flush metrics.
	Metrics prometheus.Registerer
	// Now is the clock of cap periods, alerts and ExpireReservations in
	// Run; nil means time.Now. Tests inject theirs.
	Now func() time.Time

	// AlertThresholds are the fractions of a key's spend cap whose crossing
	// raises a key_spend alert; nil means DefaultAlertThresholds, empty
	// means none.
	AlertThresholds []float64
	// Outbox keeps alerts in the store until AckAlerts: set it when
	// something delivers them (a webhook), so that a restart loses none.
	Outbox bool
	// OnAlert, if not nil, is given the alerts of each flush after its
	// write. It runs on the flushing goroutine and must not block.
	OnAlert func([]Alert)
}

// Buckets of the bbolt file, and the meta bucket's entries.
var (
	bucketMeta         = []byte("meta")
	bucketAccounts     = []byte("accounts")      // account id -> accountRecord
	bucketKeys         = []byte("keys")          // key id -> keyRecord (with the secret's hash)
	bucketReserved     = []byte("reservations")  // request id -> reservationRecord (schema 2)
	bucketOutbox       = []byte("outbox")        // alert id -> JSON alert, until delivered (schema 2)
	bucketAccountSlots = []byte("account_slots") // account id -> 4-byte ledger slot (schema 3)
	bucketKeySlots     = []byte("key_slots")     // key id -> 4-byte ledger slot (schema 3)
	bucketLedger       = []byte("ledger")        // block key -> balances or spends (schema 3: see slots.go)
	// bucketOutage is a Redis replica's journal of outage spends (see
	// outage.go): made by its first write, so not in allBuckets.
	bucketOutage = []byte("outage")

	allBuckets = [][]byte{bucketMeta, bucketAccounts, bucketKeys, bucketReserved, bucketOutbox,
		bucketAccountSlots, bucketKeySlots, bucketLedger}
	// v2Buckets are the buckets that schema 2 added to schema 1.
	v2Buckets = [][]byte{bucketReserved, bucketOutbox}
	// Schema 3 moved balances and spends from these (balances: account id
	// -> 8-byte balance; spend: key id -> 8-byte spend [+ 4-byte cap
	// period], absent: 0) into ledger blocks.
	bucketBalancesV2 = []byte("balances")
	bucketSpendV2    = []byte("spend")

	metaMagic   = []byte("magic")
	metaSchema  = []byte("schema_version")
	magicValue  = []byte("keygate store")
	openTimeout = 2 * time.Second
)

// schemaVersion is the layout this keygate writes. Open refuses a store with
// a higher one: an older binary must not half-understand newer records.
// Schema 2 added reservations, the alert outbox, and optional trailing
// fields (an account's alert level, a key's cap period); schema 3 moved
// balances and spends into ledger blocks (slots.go). Open upgrades an
// older store in place.
const schemaVersion = 3

// maxNanos is the latest time the store can hold, in 2262.
const maxNanos = math.MaxInt64

// Store is keygate's store of accounts, keys and balances: a bbolt file, an
// in-memory index for the hot path and a write-behind ledger. All methods
// are safe for concurrent use. Lookup and Debit never touch the disk or a
// store-wide lock; every other write is one fsync'd bbolt transaction.
type Store struct {
	log        *zap.Logger
	path       string
	db         *bolt.DB
	flushEvery time.Duration
	metrics    *ledgerMetrics

	idx        *hashIndex              // the hot path's view of keys: lock-free
	dirty      atomic.Pointer[account] // accounts with unflushed changes, linked through nextDirty
	dirtyCount atomic.Int64            // about how many: the pacer's estimate
	endOfList  *keyEntry               // ends an account's list of dirty keys
	endOfRes   *reservation            // ends an account's list of changed reservations
	waiting    atomic.Int32            // admin writes, Flush or Close waiting for wmu: a paced flush hurries

	now        func() time.Time
	thresholds []float64
	outbox     bool
	onAlert    func([]Alert)
	alertSeq   atomic.Uint32

	res              [reservationShards]reservationShard
	openReservations atomic.Int64
	resSeq           atomic.Uint64 // starts at the clock: unique across restarts

	// wmu serialises admin writes and flushes, so that memory is changed
	// only after the disk, in the disk's order. The hot path never takes it.
	wmu    sync.Mutex
	closed bool
	batch  flushBatch
	// flushPart is the most values a flush writes in one transaction:
	// defaultFlushPart, lowered by tests to see a flush in many parts.
	flushPart int
	// afterPart, when not nil, runs after each of a flush's transactions
	// commits: tests copy the file there, as a crash would leave it.
	afterPart func()
	// The next free ledger slots of accounts and of keys.
	accountSlots, keySlots slotSpace
	interned               map[string]string   // tiers and scopes
	scopeSets              map[string][]string // encoded scope list -> shared slice

	// mu guards the admin index: accounts, byID, account.keys and
	// keyEntry.cur/rotatedTo. Writers hold wmu too, so holding wmu is
	// enough to read.
	mu       sync.RWMutex
	accounts map[string]*account
	byID     []*keyEntry // sorted by key ID
}

// Open opens the store at path, creating it if the file does not exist, and
// loads every account and key into memory. A file held by another process
// fails with ErrLocked after LockTimeout; a file that is not a keygate store,
// or is corrupt, fails with ErrNotKeygate (never a panic); a store written
// by a newer keygate fails with ErrSchema.
func Open(path string, o Options) (*Store, error) {
	start := time.Now()
	if o.Log == nil {
		o.Log = zap.NewNop()
	}
	if o.LockTimeout <= 0 {
		o.LockTimeout = openTimeout
	}
	if o.FlushInterval <= 0 {
		o.FlushInterval = time.Second
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.AlertThresholds == nil {
		o.AlertThresholds = DefaultAlertThresholds
	}
	o.AlertThresholds = slices.Sorted(slices.Values(o.AlertThresholds))
	m, err := newLedgerMetrics(o.Metrics)
	if err != nil {
		return nil, err
	}
	switch _, err := os.Stat(path); {
	case errors.Is(err, fs.ErrNotExist):
		if err := create(path); err != nil {
			return nil, fmt.Errorf("create %s: %w", path, err)
		}
	case err != nil:
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	if err := checkHeader(path); err != nil {
		return nil, err
	}
	s := &Store{
		log:        o.Log,
		path:       path,
		flushEvery: o.FlushInterval,
		flushPart:  defaultFlushPart,
		metrics:    m,
		idx:        new(hashIndex),
		endOfList:  new(keyEntry),
		endOfRes:   new(reservation),
		now:        o.Now,
		thresholds: o.AlertThresholds,
		outbox:     o.Outbox,
		onAlert:    o.OnAlert,
		interned:   make(map[string]string),
		scopeSets:  make(map[string][]string),
		accounts:   make(map[string]*account),
	}
	for i := range s.res {
		s.res[i].m = make(map[string]*reservation)
	}
	s.resSeq.Store(uint64(time.Now().UnixNano()))
	m.openReservations(s)
	if err := s.openDB(o.LockTimeout); err != nil {
		return nil, err
	}
	s.log.Info("store opened", zap.String("path", path), zap.Int("accounts", len(s.accounts)),
		zap.Int("keys", len(s.byID)), zap.Duration("took", time.Since(start)))
	return s, nil
}

// openDB opens the bbolt file and loads it.
//
// It is the one place that recovers from a panic, and asks the runtime to
// turn memory faults into panics: bbolt trusts the pages under a meta page
// whose checksum is good, so a damaged page can make it index out of range,
// or read through a wild offset into the memory-mapped file (a fault that
// would otherwise kill the process). Open is where an untrusted file is read
// whole for the first time; a file that loads cleanly has had every page of
// every bucket walked. After a panic in load, closing the DB unmaps the file
// and releases its lock. bbolt.Open itself reads only what checkHeader has
// already checked; should it still panic, the file handle captured from its
// OpenFile hook is closed, but the mapping (and so the lock) stays until the
// process exits, since bbolt never handed the DB back.
func (s *Store) openDB(lockTimeout time.Duration) (err error) {
	var file *os.File
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if p := recover(); p != nil {
			if s.db != nil {
				s.db.Close()
				s.db = nil
			} else if file != nil {
				file.Close()
			}
			err = fmt.Errorf("%s: %w: the file is corrupt (%v)", s.path, ErrNotKeygate, p)
		}
	}()
	db, err := bolt.Open(s.path, 0o600, &bolt.Options{
		Timeout:         lockTimeout,
		InitialMmapSize: initialMmapSize(s.path),
		OpenFile: func(name string, flag int, perm os.FileMode) (*os.File, error) {
			f, err := os.OpenFile(name, flag, perm)
			file = f
			return f, err
		},
	})
	switch {
	case errors.Is(err, bolterrors.ErrTimeout):
		return fmt.Errorf("%s: %w (is keygate serve running? use --server)", s.path, ErrLocked)
	case errors.Is(err, bolterrors.ErrInvalid), errors.Is(err, bolterrors.ErrChecksum),
		errors.Is(err, bolterrors.ErrVersionMismatch):
		return fmt.Errorf("%s: %w: %w", s.path, ErrNotKeygate, err)
	case err != nil:
		return fmt.Errorf("open %s: %w", s.path, err)
	}
	s.db = db
	if err := s.load(); err != nil {
		db.Close()
		return err
	}
	return nil
}

// initialMmapSize is how much of the file bbolt maps at first: for a store
// of 16 MiB or more, twice its size (address space, not memory: only the
// pages read are resident). When a write transaction outgrows the mapping,
// bbolt remaps the file inside the commit, after copying every key and
// value the transaction changed out of the old mapping: for a flush of
// 100,000 accounts, a burst of tens of milliseconds that pacing cannot
// split. Smaller files are left to bbolt: below its allocation step
// (16 MiB) it grows the file to the size of the mapping, so a larger
// mapping would make a small store's file that large.
func initialMmapSize(path string) int {
	const boltAllocStep = 16 << 20 // bbolt's default DB.AllocSize
	fi, err := os.Stat(path)
	if err != nil || fi.Size() < boltAllocStep {
		return 0
	}
	return int(min(2*fi.Size(), 1<<30))
}

// Close flushes the ledger and closes the file. It is safe to call more than
// once; after it, reads still answer from memory and writes fail with
// ErrClosed.
func (s *Store) Close() error {
	s.lock()
	defer s.wmu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	ferr := s.flushLocked(nil)
	if err := s.db.Close(); err != nil {
		return errors.Join(ferr, fmt.Errorf("close %s: %w", s.path, err))
	}
	if ferr != nil {
		return ferr
	}
	s.log.Info("store closed", zap.String("path", s.path))
	return nil
}

// create makes a new, empty store at path. It is built under a temporary
// name and linked into place complete, so that a crash never leaves a
// half-made store at path (Open refuses a file without keygate's metadata).
// If another process creates path first, theirs is kept.
func create(path string) error {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	f, err := os.CreateTemp(dir, "."+base+".new-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	f.Close()
	defer os.Remove(tmp)
	db, err := bolt.Open(tmp, 0o600, &bolt.Options{Timeout: openTimeout})
	if err != nil {
		return err
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, name := range allBuckets {
			if _, err := tx.CreateBucket(name); err != nil {
				return err
			}
		}
		meta := tx.Bucket(bucketMeta)
		var v [8]byte
		binary.BigEndian.PutUint64(v[:], schemaVersion)
		if err := meta.Put(metaMagic, magicValue); err != nil {
			return err
		}
		return meta.Put(metaSchema, v[:])
	})
	if cerr := db.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	if err := os.Link(tmp, path); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return nil
		}
		if err := os.Rename(tmp, path); err != nil { // a file system without hard links
			return err
		}
	}
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil && !errors.Is(err, os.ErrInvalid) {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}

// bbolt's meta page, as laid out by go.etcd.io/bbolt/internal/common: a
// 16-byte page header, then magic, version, page size, flags, root bucket
// (page, sequence), freelist page, high-water page, txid and an FNV-64a
// checksum of the fields before it, in the machine's byte order.
const (
	boltMagic        = 0xED0CDAED
	boltVersion      = 2
	metaOff          = 16
	metaSumOff       = metaOff + 56
	metaLen          = metaSumOff + 8
	freelistPageFlag = 0x10
)

type boltMeta struct {
	pageSize              uint32
	root, freelist, pages uint64
	txid                  uint64
}

// checkHeader reads the bbolt meta pages and the freelist itself before
// bbolt maps the file: those are all bbolt's Open reads, so a file that
// passes cannot make bbolt.Open panic (see openDB for why that matters).
// Not a bbolt file, a damaged header or freelist, or a file shorter than its
// header says (reading past its end would crash the process with SIGBUS) all
// fail here with ErrNotKeygate.
func checkHeader(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("open %s: %w", path, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("open %s: %w", path, err)
	}
	size := fi.Size()
	if size == 0 {
		return fmt.Errorf("%s: %w: the file is empty (remove it to start a new store)", path, ErrNotKeygate)
	}
	m0, ok0, magic0 := readMeta(f, 0)
	var best boltMeta
	found, sawMagic := ok0, magic0
	if ok0 {
		best = m0
	}
	// The second meta page sits one page in; without the first, try the
	// page sizes bbolt supports, as bbolt does.
	for ps := int64(1024); ps <= 16<<20 && ps < size; ps <<= 1 {
		if ok0 && ps != int64(m0.pageSize) {
			continue
		}
		m1, ok1, magic1 := readMeta(f, ps)
		sawMagic = sawMagic || magic1
		if ok1 && int64(m1.pageSize) == ps {
			if !found || m1.txid > best.txid {
				best = m1
			}
			found = true
			break
		}
	}
	notKeygate := func(format string, args ...any) error {
		return fmt.Errorf("%s: %w: %s", path, ErrNotKeygate, fmt.Sprintf(format, args...))
	}
	ps := int64(best.pageSize)
	switch {
	case !found && sawMagic:
		return notKeygate("both bbolt meta pages are damaged")
	case !found:
		return notKeygate("not a bbolt database")
	case ps < 1024 || ps > 16<<20 || best.pages > uint64(math.MaxInt64/ps):
		return notKeygate("bad page size %d", ps)
	case int64(best.pages)*ps > size:
		return notKeygate("the file is truncated (%d bytes, its header needs %d)", size, int64(best.pages)*ps)
	case best.root < 2 || best.root >= best.pages || best.freelist < 2 || best.freelist >= best.pages:
		return notKeygate("the bbolt header points outside the data")
	}
	if err := checkFreelist(f, best); err != nil {
		return notKeygate("damaged freelist: %v", err)
	}
	return nil
}

// checkFreelist checks the freelist page as bbolt's Open will read it: its
// type, its length and its page IDs (sorted, unique, inside the file).
func checkFreelist(r io.ReaderAt, m boltMeta) error {
	ps := int64(m.pageSize)
	off := int64(m.freelist) * ps
	var hdr [metaOff + 8]byte
	if _, err := r.ReadAt(hdr[:], off); err != nil {
		return err
	}
	ne := binary.NativeEndian
	flags, count, overflow := ne.Uint16(hdr[8:]), uint64(ne.Uint16(hdr[10:])), uint64(ne.Uint32(hdr[12:]))
	if flags != freelistPageFlag {
		return fmt.Errorf("page %d has type %#x", m.freelist, flags)
	}
	if m.freelist+overflow >= m.pages {
		return fmt.Errorf("overflows the file")
	}
	first := int64(metaOff)
	if count == 0xFFFF { // the real count is the first element
		count, first = ne.Uint64(hdr[metaOff:]), metaOff+8
	}
	room := (int64(overflow) + 1) * ps
	if count > uint64(room-first)/8 {
		return fmt.Errorf("%d IDs do not fit in %d bytes", count, room)
	}
	ids := make([]byte, count*8)
	if _, err := r.ReadAt(ids, off+first); err != nil {
		return err
	}
	// bbolt sorts the IDs; check for what would make it panic after that.
	seen := make(map[uint64]struct{}, count)
	for i := 0; i < len(ids); i += 8 {
		id := ne.Uint64(ids[i:])
		if id < 2 || id >= m.pages {
			return fmt.Errorf("free page %d is outside the file", id)
		}
		if _, dup := seen[id]; dup {
			return fmt.Errorf("page %d is free twice", id)
		}
		seen[id] = struct{}{}
	}
	return nil
}

// readMeta reads and validates the meta page at off; sawMagic reports a
// bbolt magic number even if the page is otherwise damaged.
func readMeta(r io.ReaderAt, off int64) (m boltMeta, ok, sawMagic bool) {
	var b [metaLen]byte
	if _, err := r.ReadAt(b[:], off); err != nil {
		return m, false, false
	}
	ne := binary.NativeEndian
	if ne.Uint32(b[metaOff:]) != boltMagic {
		return m, false, false
	}
	h := fnv.New64a()
	h.Write(b[metaOff:metaSumOff])
	if ne.Uint32(b[metaOff+4:]) != boltVersion || ne.Uint64(b[metaSumOff:]) != h.Sum64() {
		return m, false, true
	}
	return boltMeta{
		pageSize: ne.Uint32(b[metaOff+8:]),
		root:     ne.Uint64(b[metaOff+16:]),
		freelist: ne.Uint64(b[metaOff+32:]),
		pages:    ne.Uint64(b[metaOff+40:]),
		txid:     ne.Uint64(b[metaOff+48:]),
	}, true, true
}

// nanos converts a time the caller gave into the stored form, Unix
// nanoseconds, refusing what that cannot hold (and the zero time, which
// the stored form keeps for "unset").
func nanos(what string, t time.Time) (int64, error) {
	if t.Unix() <= 0 || t.After(time.Unix(0, maxNanos)) {
		return 0, fmt.Errorf("%w: %s %s is out of range (1970 to 2262)", ErrInvalid, what, t.Format(time.RFC3339))
	}
	return t.UnixNano(), nil
}

// fromNanos converts a stored time back, as UTC.
func fromNanos(n int64) time.Time {
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n).UTC()
}
