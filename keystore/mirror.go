package keystore

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"
	"go.uber.org/zap"

	"github.com/keygate/keygate/authz/ratelimit"
	"github.com/keygate/keygate/keystore/money"
)

// A Store can also be a mirror: in store: redis mode, accounts and keys
// live in Redis, and each replica keeps the last records it saw in its own
// Store, so that Lookup stays local (and works while Redis is down, after a
// restart too). The records travel as AccountRecord and KeyRecord, in the
// encoding the bbolt file uses; Mirror upserts them. Balances and spend are
// not mirrored: in that mode they live in Redis, and the local ones stay 0.

// KeyRecord is a key's durable description as it travels between replicas:
// everything but its spend, with the SHA-256 of its secret, never the
// secret.
type KeyRecord struct {
	ID        string
	Hash      [hashSize]byte
	Account   string
	Name      string
	Scopes    []string
	RateLimit ratelimit.Rate // zero: the account tier's
	SpendCap  money.Micros   // zero: no cap
	CapPeriod Period
	CreatedAt time.Time
	ExpiresAt time.Time // zero: never
	RevokedAt time.Time // zero: not revoked; in the future during a rotation's grace
	RotatedTo string
}

// AccountRecord is an account's durable description as it travels between
// replicas: everything but its balance.
type AccountRecord struct {
	ID         string
	Tier       string
	AlertBelow money.Micros // 0: no low-balance alert
	CreatedAt  time.Time
}

// MarshalBinary encodes r as the bbolt file stores it. The ID is not part
// of the encoding: it names the record wherever it is stored. A record
// that CreateKey could not have made fails with ErrInvalid.
func (r KeyRecord) MarshalBinary() ([]byte, error) {
	rec, err := r.record()
	if err != nil {
		return nil, err
	}
	return rec.appendTo(nil), nil
}

// UnmarshalBinary decodes what MarshalBinary encoded, leaving r.ID as it
// is. Times come back in UTC.
func (r *KeyRecord) UnmarshalBinary(b []byte) error {
	v, err := decodeKey(b)
	if err != nil {
		return err
	}
	*r = KeyRecord{
		ID: r.ID, Hash: v.hash, Account: string(v.account), Name: string(v.name), Scopes: v.scopeList(),
		RateLimit: v.rate, SpendCap: v.spendCap, CapPeriod: v.capPeriod,
		CreatedAt: fromNanos(v.createdAt), ExpiresAt: fromNanos(v.expiresAt), RevokedAt: fromNanos(v.revokedAt),
		RotatedTo: string(v.rotatedTo),
	}
	return nil
}

// ActiveAt reports whether the key may be used at now, as Key.ActiveAt.
func (r *KeyRecord) ActiveAt(now time.Time) bool {
	return (r.RevokedAt.IsZero() || now.Before(r.RevokedAt)) && (r.ExpiresAt.IsZero() || now.Before(r.ExpiresAt))
}

// record checks r as CreateKey checks a new key and converts it.
func (r *KeyRecord) record() (keyRecord, error) {
	nk := NewKey{Account: r.Account, Name: r.Name, Scopes: r.Scopes, RateLimit: r.RateLimit,
		SpendCap: r.SpendCap, CapPeriod: r.CapPeriod}
	if err := validateKey(&nk); err != nil {
		return keyRecord{}, err
	}
	if r.Hash == [hashSize]byte{} {
		return keyRecord{}, fmt.Errorf("%w: no secret hash", ErrInvalid)
	}
	if r.RotatedTo != "" {
		if err := validateName(r.RotatedTo); err != nil {
			return keyRecord{}, fmt.Errorf("%w: rotated-to key id %s", ErrInvalid, err)
		}
	}
	created, err := nanos("creation time", r.CreatedAt)
	if err != nil {
		return keyRecord{}, err
	}
	expires, err := optNanos("expiry", r.ExpiresAt)
	if err != nil {
		return keyRecord{}, err
	}
	revoked, err := optNanos("revocation time", r.RevokedAt)
	if err != nil {
		return keyRecord{}, err
	}
	return keyRecord{
		Hash: r.Hash, Account: r.Account, Name: r.Name, Scopes: r.Scopes, RateLimit: nk.RateLimit,
		SpendCap: r.SpendCap, CreatedAt: created, ExpiresAt: expires, RevokedAt: revoked,
		RotatedTo: r.RotatedTo, CapPeriod: r.CapPeriod,
	}, nil
}

// MarshalBinary encodes r as the bbolt file stores it, without the ID.
func (r AccountRecord) MarshalBinary() ([]byte, error) {
	rec, err := r.record()
	if err != nil {
		return nil, err
	}
	return rec.appendTo(nil), nil
}

// UnmarshalBinary decodes what MarshalBinary encoded, leaving r.ID as it
// is.
func (r *AccountRecord) UnmarshalBinary(b []byte) error {
	v, err := decodeAccount(b)
	if err != nil {
		return err
	}
	*r = AccountRecord{ID: r.ID, Tier: string(v.tier), AlertBelow: v.alertBelow, CreatedAt: fromNanos(v.createdAt)}
	return nil
}

func (r *AccountRecord) record() (accountRecord, error) {
	if err := validateTier(r.Tier); err != nil {
		return accountRecord{}, err
	}
	if r.AlertBelow < 0 || r.AlertBelow > money.Max {
		return accountRecord{}, fmt.Errorf("%w: alert level %s out of range", ErrInvalid, r.AlertBelow)
	}
	created, err := nanos("creation time", r.CreatedAt)
	if err != nil {
		return accountRecord{}, err
	}
	return accountRecord{Tier: r.Tier, CreatedAt: created, AlertBelow: r.AlertBelow}, nil
}

func optNanos(what string, t time.Time) (int64, error) {
	if t.IsZero() {
		return 0, nil
	}
	return nanos(what, t)
}

// NewAccountRecord checks what CreateAccount is given, as CreateAccount
// checks it (errors wrap ErrInvalid), and returns the new account's record.
// The balance is checked but is not part of the record.
func NewAccountRecord(id, tier string, balance money.Micros, now time.Time, opts ...AccountOption) (AccountRecord, error) {
	if err := validateNewAccount(id, tier, balance); err != nil {
		return AccountRecord{}, err
	}
	o, err := accountOpts(opts)
	if err != nil {
		return AccountRecord{}, err
	}
	if _, err := nanos("now", now); err != nil {
		return AccountRecord{}, err
	}
	return AccountRecord{ID: id, Tier: tier, AlertBelow: o.alertBelow, CreatedAt: now.UTC()}, nil
}

// NewKeyRecord checks nk as CreateKey checks it (errors wrap ErrInvalid)
// and returns the record of a new key, with a fresh ID, and its secret,
// which exists only in what NewKeyRecord returns. Whether the account
// exists, or the ID is already taken, is the caller's to check.
func NewKeyRecord(nk NewKey, now time.Time) (KeyRecord, string, error) {
	created, err := nanos("now", now)
	if err != nil {
		return KeyRecord{}, "", err
	}
	expires, err := validateNewKey(&nk, created, now)
	if err != nil {
		return KeyRecord{}, "", err
	}
	id, err := newKeyID()
	if err != nil {
		return KeyRecord{}, "", err
	}
	secret, hash, err := newSecret()
	if err != nil {
		return KeyRecord{}, "", err
	}
	return KeyRecord{
		ID: id, Hash: hash, Account: nk.Account, Name: nk.Name, Scopes: nk.Scopes, RateLimit: nk.RateLimit,
		SpendCap: nk.SpendCap, CapPeriod: nk.CapPeriod, CreatedAt: fromNanos(created), ExpiresAt: fromNanos(expires),
	}, secret, nil
}

// AccountOptions reads opts as Credit does: whether they set the
// account's alert level, and to what. An alert level out of range fails
// with ErrInvalid.
func AccountOptions(opts ...AccountOption) (alertBelow money.Micros, set bool, err error) {
	o, err := accountOpts(opts)
	return o.alertBelow, o.setAlertBelow, err
}

// NewSecret returns a fresh secret and its SHA-256, the hash a KeyRecord
// holds.
func NewSecret() (secret string, hash [hashSize]byte, err error) { return newSecret() }

// NewKeyID returns a fresh key ID ("key_" and 16 random base62 characters).
func NewKeyID() (string, error) { return newKeyID() }

// Index numbers the cap period that holds t (days or months since 1970,
// UTC; 0 for PeriodNone): what a shared store records beside a key's
// spend, so that a spend from an earlier period reads as 0.
func (p Period) Index(t time.Time) int32 { return p.index(t) }

// ResetsAt returns when the period that holds t ends; zero for PeriodNone.
func (p Period) ResetsAt(t time.Time) time.Time { return p.resetsAt(t) }

// CapPeriod returns the period of the key's spend cap. It never changes
// after the key's creation (Mirror refuses a change), so it needs no lock.
func (k *Key) CapPeriod() Period {
	if k.entry == nil { // a Key not published by a store
		return PeriodNone
	}
	return k.entry.capPeriod
}

// metaUserPrefix keeps the entries of Meta and SetMeta apart from the
// store's own in the meta bucket.
const metaUserPrefix = "x:"

// Meta returns the value that SetMeta stored under name; "" if none.
// Meta and SetMeta keep a caller's small values (a Redis mirror's epoch)
// in the file.
func (s *Store) Meta(name string) (string, error) {
	s.lock()
	defer s.wmu.Unlock()
	if s.closed {
		return "", ErrClosed
	}
	var v string
	err := s.db.View(func(tx *bolt.Tx) error {
		v = string(tx.Bucket(bucketMeta).Get([]byte(metaUserPrefix + name)))
		return nil
	})
	return v, err
}

// SetMeta stores value under name, durably when it returns; "" removes it.
func (s *Store) SetMeta(name, value string) error {
	s.lock()
	defer s.wmu.Unlock()
	if s.closed {
		return ErrClosed
	}
	return s.db.Update(func(tx *bolt.Tx) error {
		b, k := tx.Bucket(bucketMeta), []byte(metaUserPrefix+name)
		if value == "" {
			return b.Delete(k)
		}
		return b.Put(k, []byte(value))
	})
}

// mirroredKey is a checked KeyRecord on its way into the store.
type mirroredKey struct {
	id   string
	rec  keyRecord
	cur  *keyEntry // nil: a new key
	slot uint32    // of a new key
}

// mirroredAccount is a checked AccountRecord on its way into the store.
type mirroredAccount struct {
	id   string
	rec  accountRecord
	cur  *account // nil: a new account
	slot uint32   // of a new account
}

// Mirror makes the store hold these accounts and keys as given: new ones
// are created (a new account's local balance is 0), known ones take the
// given record (a key's revocation, rotation, expiry, name, scopes, rate
// limit and cap; an account's alert level). Records equal to what the store
// holds change nothing, so mirroring the same records again is free. The
// changes are one fsync'd transaction, and Lookup sees them when Mirror
// returns: a revoked key is refused from the next Lookup on.
//
// A record that fails the checks of CreateAccount or CreateKey, a key whose
// account is neither given nor known, or a record that contradicts the
// known one where it cannot change (a key's hash, account, creation time
// or cap period) is left out, and named in the error (which wraps
// ErrInvalid or ErrAccountNotFound); the others are applied. A failed
// write applies nothing. An account's tier is immutable in memory: a new
// tier is written to the file and applies after a restart. When an ID is
// given twice, the last record wins.
func (s *Store) Mirror(accounts []AccountRecord, keys []KeyRecord) error {
	var problems []error
	accts := make([]mirroredAccount, 0, len(accounts))
	acctAt := make(map[string]int, len(accounts))
	for i := range accounts {
		r := &accounts[i]
		rec, err := r.record()
		if err == nil {
			err = validateAccountID(r.ID)
		}
		if err != nil {
			problems = append(problems, fmt.Errorf("account %q: %w", r.ID, err))
			continue
		}
		if j, ok := acctAt[r.ID]; ok {
			accts[j].rec = rec
			continue
		}
		acctAt[r.ID] = len(accts)
		accts = append(accts, mirroredAccount{id: r.ID, rec: rec})
	}
	ks := make([]mirroredKey, 0, len(keys))
	keyAt := make(map[string]int, len(keys))
	for i := range keys {
		r := &keys[i]
		rec, err := r.record()
		if err == nil {
			if err = validateName(r.ID); err != nil {
				err = fmt.Errorf("%w: key id %w", ErrInvalid, err)
			}
		}
		if err != nil {
			problems = append(problems, fmt.Errorf("key %q: %w", r.ID, err))
			continue
		}
		if j, ok := keyAt[r.ID]; ok {
			ks[j].rec = rec
			continue
		}
		keyAt[r.ID] = len(ks)
		ks = append(ks, mirroredKey{id: r.ID, rec: rec})
	}

	s.lock()
	defer s.wmu.Unlock()
	if s.closed {
		return ErrClosed
	}
	// Keep only what changes; s.wmu keeps the store as it is meanwhile.
	changedAccts := accts[:0]
	for _, m := range accts {
		m.cur = s.accounts[m.id]
		if m.cur != nil {
			m.cur.mu.Lock()
			same := m.cur.tier == m.rec.Tier && m.cur.createdAt == m.rec.CreatedAt && m.cur.alertBelow == m.rec.AlertBelow
			m.cur.mu.Unlock()
			if same {
				continue
			}
		}
		changedAccts = append(changedAccts, m)
	}
	changedKeys := ks[:0]
	for _, m := range ks {
		if s.accounts[m.rec.Account] == nil {
			if _, ok := acctAt[m.rec.Account]; !ok {
				problems = append(problems, fmt.Errorf("key %s: %w: %s", m.id, ErrAccountNotFound, m.rec.Account))
				continue
			}
		}
		m.cur = s.keyByIDLocked(m.id)
		if m.cur != nil {
			if err := s.immutableKeyLocked(m.cur, &m.rec); err != nil {
				problems = append(problems, fmt.Errorf("key %s: %w", m.id, err))
				continue
			}
			if s.sameKeyLocked(m.cur, &m.rec) {
				continue
			}
		}
		changedKeys = append(changedKeys, m)
	}
	problem := errors.Join(problems...)
	if len(changedAccts) == 0 && len(changedKeys) == 0 {
		return problem
	}

	// New accounts and keys get fresh ledger slots: their balance and
	// spend there are 0 already (balances live in Redis).
	nextAcct, err := s.accountSlots.peek(len(changedAccts))
	if err != nil {
		return errors.Join(fmt.Errorf("mirror: %w", err), problem)
	}
	nextKey, err := s.keySlots.peek(len(changedKeys))
	if err != nil {
		return errors.Join(fmt.Errorf("mirror: %w", err), problem)
	}
	err = s.db.Update(func(tx *bolt.Tx) error {
		acc, as, kb, ks := tx.Bucket(bucketAccounts), tx.Bucket(bucketAccountSlots), tx.Bucket(bucketKeys), tx.Bucket(bucketKeySlots)
		for i := range changedAccts {
			m := &changedAccts[i]
			if err := acc.Put([]byte(m.id), m.rec.appendTo(nil)); err != nil {
				return err
			}
			if m.cur == nil {
				m.slot = nextAcct
				nextAcct++
				if err := as.Put([]byte(m.id), slotRecord(m.slot)); err != nil {
					return err
				}
			}
		}
		for i := range changedKeys {
			m := &changedKeys[i]
			if err := kb.Put([]byte(m.id), m.rec.appendTo(nil)); err != nil {
				return err
			}
			if m.cur == nil {
				m.slot = nextKey
				nextKey++
				if err := ks.Put([]byte(m.id), slotRecord(m.slot)); err != nil {
					return err
				}
			}
		}
		return nil
	})
	if err != nil {
		return errors.Join(fmt.Errorf("mirror %d accounts and %d keys: %w", len(changedAccts), len(changedKeys), err), problem)
	}
	s.accountSlots.commit(nextAcct)
	s.keySlots.commit(nextKey)
	s.publishMirrorLocked(changedAccts, changedKeys)
	s.log.Debug("mirrored", zap.Int("accounts", len(changedAccts)), zap.Int("keys", len(changedKeys)))
	return problem
}

// immutableKeyLocked refuses a record that contradicts e where a key
// never changes. The caller holds s.wmu.
func (s *Store) immutableKeyLocked(e *keyEntry, rec *keyRecord) error {
	switch {
	case e.cur.Account() != rec.Account:
		return fmt.Errorf("%w: the record's account %s is not the known key's %s", ErrInvalid, rec.Account, e.cur.Account())
	case e.createdAt != rec.CreatedAt:
		return fmt.Errorf("%w: the record's creation time is not the known key's", ErrInvalid)
	case e.capPeriod != rec.CapPeriod: // Key.CapPeriod reads it without a lock
		return fmt.Errorf("%w: the record's cap period %s is not the known key's %s", ErrInvalid, rec.CapPeriod, e.capPeriod)
	case s.idx.get(&rec.Hash) != e.cur:
		return fmt.Errorf("%w: the record's secret hash is not the known key's", ErrInvalid)
	}
	return nil
}

// sameKeyLocked reports whether e already holds rec. The caller holds
// s.wmu, and has checked the immutable fields.
func (s *Store) sameKeyLocked(e *keyEntry, rec *keyRecord) bool {
	k := e.cur
	return e.name == rec.Name && slices.Equal(k.Scopes, rec.Scopes) && k.RateLimit == rec.RateLimit &&
		k.SpendCap == rec.SpendCap && k.expiresAt == rec.ExpiresAt &&
		k.revokedAt == rec.RevokedAt && e.rotatedTo == rec.RotatedTo
}

// publishMirrorLocked makes committed mirrored records visible to reads and
// to Lookup. New keys are added as Import adds them (one array each, one
// merge into the admin index), so that a first sync of a million keys is
// not a million inserts; known keys are republished. The caller holds
// s.wmu.
func (s *Store) publishMirrorLocked(accts []mirroredAccount, keys []mirroredKey) {
	var fresh []account
	for _, m := range accts {
		if m.cur == nil {
			fresh = append(fresh, account{})
		}
	}
	s.mu.Lock()
	for _, m := range accts {
		if a := m.cur; a != nil {
			if a.tier != m.rec.Tier || a.createdAt != m.rec.CreatedAt {
				s.log.Warn("a mirrored account's tier or creation time changed; the new one applies after a restart",
					zap.String("account", m.id), zap.String("tier", m.rec.Tier))
			}
			a.mu.Lock()
			a.alertBelow = m.rec.AlertBelow
			a.mu.Unlock()
			continue
		}
		a := &fresh[0]
		fresh = fresh[1:]
		*a = account{id: m.id, tier: s.internLocked(m.rec.Tier), createdAt: m.rec.CreatedAt, alertBelow: m.rec.AlertBelow, slot: m.slot}
		s.accounts[m.id] = a
	}
	s.mu.Unlock()

	n := 0
	for _, m := range keys {
		if m.cur == nil {
			n++
		}
	}
	ks := make([]Key, n)
	es := make([]keyEntry, n)
	added := make([]*keyEntry, 0, n)
	hashes := make([]hashEntry, 0, n)
	s.mu.Lock()
	for _, m := range keys {
		rec := &m.rec
		if e := m.cur; e != nil {
			k := *e.cur
			k.Scopes = s.scopeSetLocked(rec.Scopes)
			k.RateLimit, k.SpendCap, k.expiresAt, k.revokedAt = rec.RateLimit, rec.SpendCap, rec.ExpiresAt, rec.RevokedAt
			e.cur, e.rotatedTo, e.name = &k, rec.RotatedTo, rec.Name
			hashes = append(hashes, hashEntry{hash: rec.Hash, key: &k})
			continue
		}
		a := s.accounts[rec.Account]
		e, k := &es[len(added)], &ks[len(added)]
		*e = keyEntry{name: rec.Name, createdAt: rec.CreatedAt, capPeriod: rec.CapPeriod, rotatedTo: rec.RotatedTo, cur: k, slot: m.slot}
		*k = Key{
			ID: m.id, Scopes: s.scopeSetLocked(rec.Scopes), RateLimit: rec.RateLimit,
			SpendCap: rec.SpendCap, expiresAt: rec.ExpiresAt, revokedAt: rec.RevokedAt, acct: a, entry: e,
		}
		a.keys = append(a.keys, e)
		added = append(added, e)
		hashes = append(hashes, hashEntry{hash: rec.Hash, key: k})
	}
	slices.SortFunc(added, func(x, y *keyEntry) int { return strings.Compare(x.cur.ID, y.cur.ID) })
	s.byID = mergeByID(s.byID, added)
	s.idx.putAll(hashes) // the entries' cur: the index's copies
	s.mu.Unlock()
}
