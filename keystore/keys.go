package keystore

import (
	"fmt"
	"slices"
	"strings"
	"time"
	"unicode/utf8"

	bolt "go.etcd.io/bbolt"
	"go.uber.org/zap"

	"github.com/keygate/keygate/authz/ratelimit"
	"github.com/keygate/keygate/keystore/money"
)

// A Key is an API key as a Check sees it. A published Key never changes: an
// admin write publishes a new Key for the same ID, and both point to the one
// account balance and key spend, so a Check holding the old one still debits
// the right ledger. The index holds the Keys themselves (see hashIndex), so
// a write also moves the other Keys of its shard: hold a *Key for a
// request, and reach a key later through its entry.
//
// The fields are in the order a Check reads them, in two cache lines (128
// bytes: TestKeyLayout). The hash, the ID and the two times that Lookup
// checks fill the first, which it reads at once; the account, the entry,
// the scopes and the limits, which the rest of the Check reads, fill the
// second. At a million keys each line is a wait on main memory; the
// account's ID is the account's (Account), not a copy, to keep it to two.
type Key struct {
	hash      [hashSize]byte // set by the index
	ID        string
	expiresAt int64 // Unix nanoseconds; 0: never
	revokedAt int64 // Unix nanoseconds; 0: not revoked
	acct      *account
	entry     *keyEntry

	// Scopes is shared by every key with the same scopes: read it, never
	// modify it.
	Scopes    []string
	RateLimit ratelimit.Rate // zero: the account tier's
	SpendCap  money.Micros   // zero: no cap
}

// Account returns the ID of the key's account. (The account's own, not a
// copy: see Tier.)
func (k *Key) Account() string { return k.acct.id }

// Tier returns the key's account tier. (It is the account's, not a copy:
// a Key is 128 bytes, two cache lines, and a million of them count.)
func (k *Key) Tier() string { return k.acct.tier }

// RateBucket is the key's rate-limit bucket in this process: the same for
// every Key of one key ID, revocation and rotation grace included, and
// full again when the process restarts.
func (k *Key) RateBucket() *ratelimit.Bucket { return &k.entry.rate }

// HasScope reports whether the key carries scope.
func (k *Key) HasScope(scope string) bool {
	for _, s := range k.Scopes {
		if s == scope {
			return true
		}
	}
	return false
}

// ActiveAt reports whether the key may be used at now: not revoked (or still
// in a rotation's grace period) and not expired.
func (k *Key) ActiveAt(now time.Time) bool {
	n := now.UnixNano()
	return (k.revokedAt == 0 || n < k.revokedAt) && (k.expiresAt == 0 || n < k.expiresAt)
}

// Lookup returns the key whose secret this is, if it is active at now.
// Malformed secrets are refused by their checksum without hashing; the rest
// cost one SHA-256 and one lock-free index read. It does not allocate.
func (s *Store) Lookup(secret string, now time.Time) (*Key, bool) {
	if !ValidSecretFormat(secret) {
		return nil, false
	}
	h := hashSecret(secret)
	k := s.idx.get(&h)
	if k == nil || !k.ActiveAt(now) { // unknown, revoked, expired, or past its rotation grace
		return nil, false
	}
	return k, true
}

// CreateKey creates a key for an existing account and returns it with its
// secret. The secret is returned this once: the store keeps only its hash.
// The key is durable, and usable by Lookup, when CreateKey returns.
func (s *Store) CreateKey(nk NewKey, now time.Time) (KeyInfo, string, error) {
	created, err := nanos("now", now)
	if err != nil {
		return KeyInfo{}, "", err
	}
	expires, err := validateNewKey(&nk, created, now)
	if err != nil {
		return KeyInfo{}, "", err
	}

	s.lock()
	defer s.wmu.Unlock()
	if s.closed {
		return KeyInfo{}, "", ErrClosed
	}
	a := s.accounts[nk.Account]
	if a == nil {
		return KeyInfo{}, "", fmt.Errorf("%w: %s", ErrAccountNotFound, nk.Account)
	}
	id, err := s.freshKeyIDLocked()
	if err != nil {
		return KeyInfo{}, "", err
	}
	secret, hash, err := newSecret()
	if err != nil {
		return KeyInfo{}, "", err
	}
	rec := keyRecord{
		Hash: hash, Account: a.id, Name: nk.Name, Scopes: nk.Scopes,
		RateLimit: nk.RateLimit, SpendCap: nk.SpendCap, CreatedAt: created, ExpiresAt: expires,
		CapPeriod: nk.CapPeriod,
	}
	slot, err := s.keySlots.peek(1)
	if err != nil {
		return KeyInfo{}, "", fmt.Errorf("create key for %s: %w", a.id, err)
	}
	err = s.db.Update(func(tx *bolt.Tx) error {
		return putNewKey(tx, id, &rec, slot)
	})
	if err != nil {
		return KeyInfo{}, "", fmt.Errorf("create key for %s: %w", a.id, err)
	}
	e := s.publishNewKeyLocked(id, a, &rec, slot)
	s.log.Info("key created", zap.String("key_id", id), zap.String("account", a.id))
	return s.keyInfoLocked(e), secret, nil
}

// Key returns the key with this ID, revoked and expired ones included.
func (s *Store) Key(id string) (KeyInfo, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	e := s.keyByIDLocked(id)
	if e == nil {
		return KeyInfo{}, fmt.Errorf("%w: %s", ErrKeyNotFound, id)
	}
	return s.keyInfoLocked(e), nil
}

// ListKeys is Keys for the admin API, whose stores may fail to list; this
// one never does.
func (s *Store) ListKeys(account string) ([]KeyInfo, error) { return s.Keys(account), nil }

// Keys returns the keys of account, or every key for "", revoked and expired
// ones included, sorted by creation time then ID. An unknown account has no
// keys.
func (s *Store) Keys(account string) []KeyInfo {
	s.mu.RLock()
	entries := s.byID
	if account != "" {
		entries = nil
		if a := s.accounts[account]; a != nil {
			entries = a.keys
		}
	}
	out := make([]KeyInfo, 0, len(entries))
	for _, e := range entries {
		out = append(out, s.keyInfoLocked(e))
	}
	s.mu.RUnlock()
	slices.SortFunc(out, func(a, b KeyInfo) int {
		if c := a.CreatedAt.Compare(b.CreatedAt); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	return out
}

// Revoke revokes the key at now: Lookup refuses it from the next call on.
// During a rotation's grace period it ends the grace at once. Revoking a
// revoked key changes nothing.
func (s *Store) Revoke(id string, now time.Time) (KeyInfo, error) {
	at, err := nanos("now", now)
	if err != nil {
		return KeyInfo{}, err
	}
	s.lock()
	defer s.wmu.Unlock()
	if s.closed {
		return KeyInfo{}, ErrClosed
	}
	e := s.keyByIDLocked(id)
	if e == nil {
		return KeyInfo{}, fmt.Errorf("%w: %s", ErrKeyNotFound, id)
	}
	if r := e.cur.revokedAt; r != 0 && r <= at {
		return s.keyInfoLocked(e), nil
	}
	var hash [hashSize]byte
	err = s.db.Update(func(tx *bolt.Tx) error {
		rec, err := getKey(tx, id)
		if err != nil {
			return err
		}
		rec.RevokedAt = at
		hash = rec.Hash
		return putKey(tx, id, &rec)
	})
	if err != nil {
		return KeyInfo{}, fmt.Errorf("revoke %s: %w", id, err)
	}
	s.republishLocked(e, hash, at, e.rotatedTo)
	s.log.Info("key revoked", zap.String("key_id", id), zap.String("account", e.cur.Account()))
	return s.keyInfoLocked(e), nil
}

// Rotate replaces an active key with a new one of the same account, name,
// scopes, rate limit and spend cap (its spend starts at 0; an expiring key's
// successor gets the same lifetime from now). The old key keeps working for
// grace, then is revoked; grace 0 revokes it at once. Both changes are one
// transaction. A revoked or expired key, or one already rotated, cannot be
// rotated: ErrKeyInactive.
func (s *Store) Rotate(id string, grace time.Duration, now time.Time) (old KeyInfo, nw KeyInfo, secret string, err error) {
	at, err := nanos("now", now)
	if err != nil {
		return old, nw, "", err
	}
	if grace < 0 {
		return old, nw, "", fmt.Errorf("%w: negative grace period %s", ErrInvalid, grace)
	}
	if int64(grace) > maxNanos-at {
		return old, nw, "", fmt.Errorf("%w: grace period %s is too long", ErrInvalid, grace)
	}
	revokeAt := at + int64(grace)

	s.lock()
	defer s.wmu.Unlock()
	if s.closed {
		return old, nw, "", ErrClosed
	}
	e := s.keyByIDLocked(id)
	if e == nil {
		return old, nw, "", fmt.Errorf("%w: %s", ErrKeyNotFound, id)
	}
	k := e.cur
	switch {
	case !k.ActiveAt(now):
		return old, nw, "", fmt.Errorf("%w: %s is %s", ErrKeyInactive, id, s.keyInfoLocked(e).State(now))
	case k.revokedAt != 0:
		return old, nw, "", fmt.Errorf("%w: %s was already rotated to %s and is revoked from %s",
			ErrKeyInactive, id, e.rotatedTo, fromNanos(k.revokedAt).Format(time.RFC3339))
	}
	var expires int64
	if k.expiresAt != 0 {
		life := k.expiresAt - e.createdAt
		if life > maxNanos-at {
			return old, nw, "", fmt.Errorf("%w: the new key's expiry is out of range", ErrInvalid)
		}
		expires = at + life
	}
	newID, err := s.freshKeyIDLocked()
	if err != nil {
		return old, nw, "", err
	}
	secret, hash, err := newSecret()
	if err != nil {
		return old, nw, "", err
	}
	slot, err := s.keySlots.peek(1)
	if err != nil {
		return old, nw, "", fmt.Errorf("rotate %s: %w", id, err)
	}
	var oldHash [hashSize]byte
	var rec keyRecord
	err = s.db.Update(func(tx *bolt.Tx) error {
		oldRec, err := getKey(tx, id)
		if err != nil {
			return err
		}
		oldHash = oldRec.Hash
		rec = keyRecord{
			Hash: hash, Account: oldRec.Account, Name: oldRec.Name, Scopes: oldRec.Scopes,
			RateLimit: oldRec.RateLimit, SpendCap: oldRec.SpendCap, CreatedAt: at, ExpiresAt: expires,
			CapPeriod: oldRec.CapPeriod,
		}
		oldRec.RevokedAt, oldRec.RotatedTo = revokeAt, newID
		if err := putKey(tx, id, &oldRec); err != nil {
			return err
		}
		return putNewKey(tx, newID, &rec, slot)
	})
	if err != nil {
		return old, nw, "", fmt.Errorf("rotate %s: %w", id, err)
	}
	ne := s.publishNewKeyLocked(newID, k.acct, &rec, slot)
	s.republishLocked(e, oldHash, revokeAt, newID)
	s.log.Info("key rotated", zap.String("key_id", id), zap.String("new_key_id", newID),
		zap.String("account", k.Account()), zap.Duration("grace", grace))
	return s.keyInfoLocked(e), s.keyInfoLocked(ne), secret, nil
}

// publishNewKeyLocked makes a committed new key, with its ledger slot,
// visible to reads and to Lookup. The caller holds s.wmu.
func (s *Store) publishNewKeyLocked(id string, a *account, rec *keyRecord, slot uint32) *keyEntry {
	s.keySlots.commit(slot + 1)
	e := &keyEntry{name: rec.Name, createdAt: rec.CreatedAt, capPeriod: rec.CapPeriod, slot: slot}
	k := &Key{
		ID: id, Scopes: s.scopeSetLocked(rec.Scopes),
		RateLimit: rec.RateLimit, SpendCap: rec.SpendCap,
		expiresAt: rec.ExpiresAt, acct: a, entry: e,
	}
	e.cur = k
	s.mu.Lock()
	s.insertKeyLocked(e)
	a.keys = append(a.keys, e)
	s.idx.put(rec.Hash, k) // e.cur: the index's copy
	s.mu.Unlock()
	return e
}

// republishLocked publishes a copy of e's key revoked at revokedAt. The
// caller holds s.wmu.
func (s *Store) republishLocked(e *keyEntry, hash [hashSize]byte, revokedAt int64, rotatedTo string) {
	k := *e.cur
	k.revokedAt = revokedAt
	s.mu.Lock()
	e.rotatedTo = rotatedTo
	s.idx.put(hash, &k) // e.cur: the index's copy
	s.mu.Unlock()
}

// keyInfoLocked describes e. The caller holds s.mu or s.wmu.
func (s *Store) keyInfoLocked(e *keyEntry) KeyInfo {
	k := e.cur
	now := s.now()
	k.acct.mu.Lock()
	spent, reserved := e.spent, e.reserved
	if e.capPeriod != PeriodNone && e.capPeriod.index(now) > e.period {
		spent = 0 // a new period began; the next charge starts it
	}
	k.acct.mu.Unlock()
	return KeyInfo{
		ID:             k.ID,
		Account:        k.Account(),
		Name:           e.name,
		Scopes:         slices.Clone(k.Scopes),
		RateLimit:      k.RateLimit,
		SpendCap:       k.SpendCap,
		Spent:          spent,
		Reserved:       reserved,
		CapPeriod:      e.capPeriod,
		PeriodResetsAt: e.capPeriod.resetsAt(now),
		CreatedAt:      fromNanos(e.createdAt),
		ExpiresAt:      fromNanos(k.expiresAt),
		RevokedAt:      fromNanos(k.revokedAt),
		RotatedTo:      e.rotatedTo,
	}
}

// freshKeyIDLocked returns a key ID not in use. With 95 random bits a clash
// never happens in practice; checking costs a binary search.
func (s *Store) freshKeyIDLocked() (string, error) {
	for {
		id, err := newKeyID()
		if err != nil {
			return "", err
		}
		if s.keyByIDLocked(id) == nil {
			return id, nil
		}
	}
}

// scopeSetLocked returns the interned copy of scopes: keys with the same
// scopes share one slice. The caller holds s.wmu (or is loading).
func (s *Store) scopeSetLocked(scopes []string) []string {
	enc := appendScopes(nil, scopes)
	if set, ok := s.scopeSets[string(enc)]; ok {
		return set
	}
	set := make([]string, len(scopes))
	for i, sc := range scopes {
		set[i] = s.internLocked(sc)
	}
	s.scopeSets[string(enc)] = set
	return set
}

// internLocked returns one shared copy of str (tiers, scopes). The caller
// holds s.wmu (or is loading).
func (s *Store) internLocked(str string) string {
	if v, ok := s.interned[str]; ok {
		return v
	}
	s.interned[str] = str
	return str
}

func validateKey(nk *NewKey) error {
	if err := validateAccountID(nk.Account); err != nil {
		return err
	}
	if !utf8.ValidString(nk.Name) {
		return fmt.Errorf("%w: key name is not valid UTF-8", ErrInvalid)
	}
	if n := utf8.RuneCountInString(nk.Name); n > maxNameLen {
		return fmt.Errorf("%w: key name is %d characters, at most %d", ErrInvalid, n, maxNameLen)
	}
	if i := controlAt(nk.Name); i >= 0 {
		return fmt.Errorf("%w: key name %q has %s at byte %d: control characters are not allowed",
			ErrInvalid, nk.Name, charAt(nk.Name, i), i)
	}
	if len(nk.Scopes) == 0 {
		return fmt.Errorf("%w: a key needs at least one scope", ErrInvalid)
	}
	if len(nk.Scopes) > maxScopes {
		return fmt.Errorf("%w: %d scopes, at most %d", ErrInvalid, len(nk.Scopes), maxScopes)
	}
	for i, sc := range nk.Scopes {
		switch {
		case sc == "":
			return fmt.Errorf("%w: scope %d is empty", ErrInvalid, i+1)
		case len(sc) > maxScopeLen:
			return fmt.Errorf("%w: scope %.20q... is longer than %d bytes", ErrInvalid, sc, maxScopeLen)
		case controlAt(sc) >= 0:
			return fmt.Errorf("%w: scope %q has %s: control characters are not allowed", ErrInvalid, sc, charAt(sc, controlAt(sc)))
		case slices.Contains(nk.Scopes[:i], sc):
			return fmt.Errorf("%w: scope %q is listed twice", ErrInvalid, sc)
		}
	}
	r := nk.RateLimit
	switch {
	case r.N < 0:
		return fmt.Errorf("%w: negative rate limit", ErrInvalid)
	case r.N > 0 && r.Per <= 0:
		return fmt.Errorf("%w: rate limit of %d per %s", ErrInvalid, r.N, r.Per)
	case r.N == 0:
		nk.RateLimit = ratelimit.Rate{}
	}
	if nk.SpendCap < 0 || nk.SpendCap > money.Max {
		return fmt.Errorf("%w: spend cap %s out of range", ErrInvalid, nk.SpendCap)
	}
	if nk.CapPeriod > PeriodMonth {
		return fmt.Errorf("%w: cap period %d", ErrInvalid, nk.CapPeriod)
	}
	if nk.CapPeriod != PeriodNone && nk.SpendCap == 0 {
		return fmt.Errorf("%w: a cap period of %s needs a spend cap", ErrInvalid, nk.CapPeriod)
	}
	return nil
}

// putKey and getKey write and read a key record inside a transaction.
func putKey(tx *bolt.Tx, id string, rec *keyRecord) error {
	return tx.Bucket(bucketKeys).Put([]byte(id), rec.appendTo(nil))
}

// putNewKey writes a new key's record and its ledger slot. The slot was
// never used, so its spend in the ledger is 0 already.
func putNewKey(tx *bolt.Tx, id string, rec *keyRecord, slot uint32) error {
	if err := putKey(tx, id, rec); err != nil {
		return err
	}
	return tx.Bucket(bucketKeySlots).Put([]byte(id), slotRecord(slot))
}

func getKey(tx *bolt.Tx, id string) (keyRecord, error) {
	raw := tx.Bucket(bucketKeys).Get([]byte(id))
	if raw == nil {
		return keyRecord{}, fmt.Errorf("%w: %s (on disk)", ErrKeyNotFound, id)
	}
	v, err := decodeKey(raw)
	if err != nil {
		return keyRecord{}, fmt.Errorf("key %s: %w", id, err)
	}
	return keyRecord{
		Hash: v.hash, Account: string(v.account), Name: string(v.name), Scopes: v.scopeList(),
		RateLimit: v.rate, SpendCap: v.spendCap, CapPeriod: v.capPeriod,
		CreatedAt: v.createdAt, ExpiresAt: v.expiresAt, RevokedAt: v.revokedAt, RotatedTo: string(v.rotatedTo),
	}, nil
}
