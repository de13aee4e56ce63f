package keystore

import (
	"encoding/binary"
	"fmt"
	"slices"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"
	"go.uber.org/zap"

	"github.com/keygate/keygate/keystore/money"
)

// ImportAccount is an account for Import: what CreateAccount takes.
type ImportAccount struct {
	ID      string
	Tier    string // empty: the caller's default tier
	Balance money.Micros
}

// ImportedKey is a key that Import created.
type ImportedKey struct {
	ID string
	// Secret is returned this once: the store keeps only its hash.
	Secret string
}

// Import creates accounts and keys in one fsync'd transaction: every one of
// them, or none. It is for seeding and migrations, where one transaction
// per account and per key (CreateAccount, CreateKey) spends most of its time
// waiting for the disk: 100,000 accounts take a second or two instead of
// minutes.
//
// Every entry is checked as CreateAccount and CreateKey check it, and the
// first problem fails the whole import with an error that names the entry
// (by position, from 1) and wraps the same errors: ErrInvalid,
// ErrAccountExists (also for an ID listed twice), ErrAccountNotFound. A
// key's account is one of accounts or one already in the store. The
// imported keys are returned in the order of keys, with their secrets; like
// everything else, they are durable and usable by Lookup when Import
// returns.
func (s *Store) Import(accounts []ImportAccount, keys []NewKey, now time.Time) ([]ImportedKey, error) {
	created, err := nanos("now", now)
	if err != nil {
		return nil, err
	}
	if len(accounts) == 0 && len(keys) == 0 {
		return nil, nil
	}
	newAccounts := make(map[string]int, len(accounts))
	for i, ia := range accounts {
		if err := validateNewAccount(ia.ID, ia.Tier, ia.Balance); err != nil {
			return nil, fmt.Errorf("import: account %d: %w", i+1, err)
		}
		if j, dup := newAccounts[ia.ID]; dup {
			return nil, fmt.Errorf("import: account %d: %w: %s is also account %d", i+1, ErrAccountExists, ia.ID, j+1)
		}
		newAccounts[ia.ID] = i
	}
	nks := slices.Clone(keys) // validateKey normalises its argument
	expires := make([]int64, len(nks))
	for i := range nks {
		if expires[i], err = validateNewKey(&nks[i], created, now); err != nil {
			return nil, fmt.Errorf("import: key %d: %w", i+1, err)
		}
	}

	s.lock()
	defer s.wmu.Unlock()
	if s.closed {
		return nil, ErrClosed
	}
	for i, ia := range accounts {
		if s.accounts[ia.ID] != nil {
			return nil, fmt.Errorf("import: account %d: %w: %s", i+1, ErrAccountExists, ia.ID)
		}
	}
	for i := range nks {
		if _, ok := newAccounts[nks[i].Account]; !ok && s.accounts[nks[i].Account] == nil {
			return nil, fmt.Errorf("import: key %d: %w: %s", i+1, ErrAccountNotFound, nks[i].Account)
		}
	}
	out, recs, err := s.newKeyRecordsLocked(nks, expires, created)
	if err != nil {
		return nil, err
	}
	slots, err := s.writeImport(accounts, out, recs, created)
	if err != nil {
		return nil, fmt.Errorf("import %d accounts and %d keys: %w", len(accounts), len(keys), err)
	}
	s.publishImportLocked(accounts, out, recs, created, slots)
	s.log.Info("import", zap.Int("accounts", len(accounts)), zap.Int("keys", len(keys)))
	return out, nil
}

// validateNewKey checks nk (normalising it) as CreateKey does, and returns
// its expiry in Unix nanoseconds (0: never).
func validateNewKey(nk *NewKey, created int64, now time.Time) (int64, error) {
	var expires int64
	if !nk.ExpiresAt.IsZero() {
		var err error
		if expires, err = nanos("expiry", nk.ExpiresAt); err != nil {
			return 0, err
		}
		if expires <= created {
			return 0, fmt.Errorf("%w: expiry %s is not after now (%s)", ErrInvalid,
				nk.ExpiresAt.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
		}
	}
	return expires, validateKey(nk)
}

// newKeyRecordsLocked draws an unused ID and a secret for each key.
func (s *Store) newKeyRecordsLocked(nks []NewKey, expires []int64, created int64) ([]ImportedKey, []keyRecord, error) {
	out := make([]ImportedKey, len(nks))
	recs := make([]keyRecord, len(nks))
	ids := make(map[string]struct{}, len(nks))
	for i := range nks {
		for {
			id, err := newKeyID()
			if err != nil {
				return nil, nil, err
			}
			if _, dup := ids[id]; !dup && s.keyByIDLocked(id) == nil {
				ids[id] = struct{}{}
				out[i].ID = id
				break
			}
		}
		secret, hash, err := newSecret()
		if err != nil {
			return nil, nil, err
		}
		out[i].Secret = secret
		nk := &nks[i]
		recs[i] = keyRecord{
			Hash: hash, Account: nk.Account, Name: nk.Name, Scopes: nk.Scopes,
			RateLimit: nk.RateLimit, SpendCap: nk.SpendCap, CreatedAt: created, ExpiresAt: expires[i],
			CapPeriod: nk.CapPeriod,
		}
	}
	return out, recs, nil
}

// importSlots are the ledger slots of an import's accounts and keys, in
// the order they were given.
type importSlots struct{ accounts, keys []uint32 }

// writeImport writes the import in one transaction, each bucket in key
// order, and gives the accounts and then the keys consecutive ledger slots
// in that order. bbolt keeps the values until the commit: they are cut
// from a few large buffers rather than allocated one by one.
func (s *Store) writeImport(accounts []ImportAccount, keys []ImportedKey, recs []keyRecord, created int64) (importSlots, error) {
	byID := func(n int, id func(int) string) []int {
		order := make([]int, n)
		for i := range order {
			order[i] = i
		}
		slices.SortFunc(order, func(x, y int) int { return strings.Compare(id(x), id(y)) })
		return order
	}
	acctOrder := byID(len(accounts), func(i int) string { return accounts[i].ID })
	keyOrder := byID(len(keys), func(i int) string { return keys[i].ID })
	firstAcct, err := s.accountSlots.peek(len(accounts))
	if err != nil {
		return importSlots{}, err
	}
	firstKey, err := s.keySlots.peek(len(keys))
	if err != nil {
		return importSlots{}, err
	}
	slots := importSlots{accounts: make([]uint32, len(accounts)), keys: make([]uint32, len(keys))}
	for rank, i := range acctOrder {
		slots.accounts[i] = firstAcct + uint32(rank)
	}
	for rank, i := range keyOrder {
		slots.keys[i] = firstKey + uint32(rank)
	}
	buf := make([]byte, 0, 40*len(accounts)+136*len(keys)) // about right: fewer copies
	cut := func(start int) []byte { return buf[start:len(buf):len(buf)] }
	err = s.db.Update(func(tx *bolt.Tx) error {
		acc, as, kb, ks := tx.Bucket(bucketAccounts), tx.Bucket(bucketAccountSlots), tx.Bucket(bucketKeys), tx.Bucket(bucketKeySlots)
		w := newBlockWriter(tx)
		for _, i := range acctOrder {
			ia := &accounts[i]
			if acc.Get([]byte(ia.ID)) != nil {
				return fmt.Errorf("account %d: %w: %s (on disk)", i+1, ErrAccountExists, ia.ID)
			}
			start := len(buf)
			buf = (&accountRecord{Tier: ia.Tier, CreatedAt: created}).appendTo(buf)
			if err := acc.Put([]byte(ia.ID), cut(start)); err != nil {
				return err
			}
			start = len(buf)
			buf = binary.BigEndian.AppendUint32(buf, slots.accounts[i])
			if err := as.Put([]byte(ia.ID), cut(start)); err != nil {
				return err
			}
			if err := w.set(blockAccounts, slots.accounts[i], ia.Balance, 0); err != nil {
				return err
			}
		}
		if err := w.flush(); err != nil {
			return err
		}
		for _, i := range keyOrder {
			start := len(buf)
			buf = recs[i].appendTo(buf)
			if err := kb.Put([]byte(keys[i].ID), cut(start)); err != nil {
				return err
			}
			start = len(buf)
			buf = binary.BigEndian.AppendUint32(buf, slots.keys[i])
			if err := ks.Put([]byte(keys[i].ID), cut(start)); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return importSlots{}, err
	}
	s.accountSlots.commit(firstAcct + uint32(len(accounts)))
	s.keySlots.commit(firstKey + uint32(len(keys)))
	return slots, nil
}

// publishImportLocked makes a committed import visible to reads and to
// Lookup. The accounts, keys and entries each live in one array, as after
// Open. The caller holds s.wmu.
func (s *Store) publishImportLocked(accounts []ImportAccount, keys []ImportedKey, recs []keyRecord, created int64, slots importSlots) {
	slab := make([]account, len(accounts))
	for i, ia := range accounts {
		slab[i] = account{id: ia.ID, tier: s.internLocked(ia.Tier), createdAt: created, balance: ia.Balance, slot: slots.accounts[i]}
	}
	ks := make([]Key, len(keys))
	es := make([]keyEntry, len(keys))
	added := make([]*keyEntry, len(keys))
	hashes := make([]hashEntry, len(keys))
	s.mu.Lock()
	for i := range slab {
		s.accounts[slab[i].id] = &slab[i]
	}
	for i := range keys {
		rec := &recs[i]
		a := s.accounts[rec.Account]
		e, k := &es[i], &ks[i]
		*e = keyEntry{name: rec.Name, createdAt: rec.CreatedAt, capPeriod: rec.CapPeriod, cur: k, slot: slots.keys[i]}
		*k = Key{
			ID: keys[i].ID, Scopes: s.scopeSetLocked(rec.Scopes),
			RateLimit: rec.RateLimit, SpendCap: rec.SpendCap, expiresAt: rec.ExpiresAt, acct: a, entry: e,
		}
		a.keys = append(a.keys, e)
		added[i] = e
		hashes[i] = hashEntry{hash: rec.Hash, key: k}
	}
	slices.SortFunc(added, func(x, y *keyEntry) int { return strings.Compare(x.cur.ID, y.cur.ID) })
	s.byID = mergeByID(s.byID, added)
	s.idx.putAll(hashes) // the entries' cur: the index's copies
	s.mu.Unlock()
}

// mergeByID returns the admin index old with the entries of add (sorted by
// ID, none already in old) in their places. It reads only the entries of
// old that a binary search visits, and copies the runs between them.
func mergeByID(old, add []*keyEntry) []*keyEntry {
	out := make([]*keyEntry, 0, len(old)+len(add))
	lo := 0
	for _, e := range add {
		i, _ := slices.BinarySearchFunc(old[lo:], e.cur.ID, func(x *keyEntry, id string) int {
			return strings.Compare(x.cur.ID, id)
		})
		out = append(out, old[lo:lo+i]...)
		out = append(out, e)
		lo += i
	}
	return append(out, old[lo:]...)
}
