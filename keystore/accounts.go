package keystore

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	bolt "go.etcd.io/bbolt"
	"go.uber.org/zap"

	"github.com/keygate/keygate/keystore/money"
)

// CreateAccount creates an account with an opening balance. It is durable
// when CreateAccount returns. An empty tier leaves the choice to the caller's
// default tier.
func (s *Store) CreateAccount(id, tier string, balance money.Micros, now time.Time, opts ...AccountOption) (Account, error) {
	if err := validateNewAccount(id, tier, balance); err != nil {
		return Account{}, err
	}
	o, err := accountOpts(opts)
	if err != nil {
		return Account{}, err
	}
	created, err := nanos("now", now)
	if err != nil {
		return Account{}, err
	}

	s.lock()
	defer s.wmu.Unlock()
	if s.closed {
		return Account{}, ErrClosed
	}
	if s.accounts[id] != nil {
		return Account{}, fmt.Errorf("%w: %s", ErrAccountExists, id)
	}
	rec := accountRecord{Tier: tier, CreatedAt: created, AlertBelow: o.alertBelow}
	slot, err := s.accountSlots.peek(1)
	if err != nil {
		return Account{}, fmt.Errorf("create account %s: %w", id, err)
	}
	err = s.db.Update(func(tx *bolt.Tx) error {
		if tx.Bucket(bucketAccounts).Get([]byte(id)) != nil {
			return fmt.Errorf("%w: %s (on disk)", ErrAccountExists, id)
		}
		if err := tx.Bucket(bucketAccounts).Put([]byte(id), rec.appendTo(nil)); err != nil {
			return err
		}
		if err := tx.Bucket(bucketAccountSlots).Put([]byte(id), slotRecord(slot)); err != nil {
			return err
		}
		w := newBlockWriter(tx)
		if err := w.set(blockAccounts, slot, balance, 0); err != nil {
			return err
		}
		return w.flush()
	})
	if err != nil {
		return Account{}, fmt.Errorf("create account %s: %w", id, err)
	}
	s.accountSlots.commit(slot + 1)
	a := &account{id: id, tier: s.internLocked(tier), createdAt: created, balance: balance, alertBelow: o.alertBelow, slot: slot}
	s.mu.Lock()
	s.accounts[id] = a
	s.mu.Unlock()
	s.log.Info("account created", zap.String("account", id), zap.String("tier", tier),
		zap.Int64("balance_micros", int64(balance)))
	return a.info(), nil
}

// Account returns an account with its live balance: every debit so far,
// flushed or not.
func (s *Store) Account(id string) (Account, error) {
	s.mu.RLock()
	a := s.accounts[id]
	s.mu.RUnlock()
	if a == nil {
		return Account{}, fmt.Errorf("%w: %s", ErrAccountNotFound, id)
	}
	return a.info(), nil
}

// Accounts returns every account, sorted by ID.
func (s *Store) Accounts() []Account {
	s.mu.RLock()
	all := make([]*account, 0, len(s.accounts))
	for _, a := range s.accounts {
		all = append(all, a)
	}
	s.mu.RUnlock()
	slices.SortFunc(all, func(a, b *account) int { return strings.Compare(a.id, b.id) })
	out := make([]Account, len(all))
	for i, a := range all {
		out[i] = a.info()
	}
	return out
}

// accountOpts applies and checks opts.
func accountOpts(opts []AccountOption) (accountOptions, error) {
	var o accountOptions
	for _, f := range opts {
		f(&o)
	}
	if o.alertBelow < 0 || o.alertBelow > money.Max {
		return o, fmt.Errorf("%w: alert level %s out of range (0 removes the alert)", ErrInvalid, o.alertBelow)
	}
	return o, nil
}

// ListAccounts is Accounts for the admin API, whose stores may fail to
// list; this one never does.
func (s *Store) ListAccounts() ([]Account, error) { return s.Accounts(), nil }

// Credit adds amount to an account's balance, durably when it returns.
// Debits running meanwhile are not lost: the new balance is computed under
// the account's mutex, and the disk write happens outside it (a debit made
// during the write leaves the account dirty, so the next flush writes the
// exact value).
//
// The balance written includes the account's unflushed debits, so the same
// transaction writes the unflushed spend of its keys, copied under the same
// lock: the file must never hold a balance charged for debits that the
// keys' spend does not count, or after a crash the keys could spend past
// their caps. For the same reason it writes the account's reservations
// opened and settled, and its alerts. They all stay marked, and the next
// flush writes them again (the same values, or later ones).
func (s *Store) Credit(id string, amount money.Micros, opts ...AccountOption) (Account, error) {
	if amount <= 0 || amount > money.Max {
		return Account{}, fmt.Errorf("%w: credit of %s (it must be positive)", ErrInvalid, amount)
	}
	o, err := accountOpts(opts)
	if err != nil {
		return Account{}, err
	}
	s.lock()
	defer s.wmu.Unlock()
	if s.closed {
		return Account{}, ErrClosed
	}
	a := s.accounts[id]
	if a == nil {
		return Account{}, fmt.Errorf("%w: %s", ErrAccountNotFound, id)
	}
	var (
		spends []batchEntry
		res    []resChange
		alerts []Alert
	)
	a.mu.Lock()
	before := a.balance
	for e := a.dirtyKeys; e != nil && e != s.endOfList; e = e.nextDirty {
		spends = append(spends, batchEntry{slot: e.slot, val: e.spent, period: e.period})
	}
	for r := a.dirtyRes; r != nil && r != s.endOfRes; r = r.nextDirty {
		res = append(res, resChange{r: r, open: r.open})
	}
	alerts = slices.Clone(a.alerts)
	a.mu.Unlock()
	// Debits only lower the balance and credits are serialised by s.wmu,
	// so checking the snapshot is enough to rule out overflow.
	if before > money.Max-amount {
		return Account{}, fmt.Errorf("%w: crediting %s to %s would take its balance past %s", ErrInvalid, amount, id, money.Max)
	}
	err = s.db.Update(func(tx *bolt.Tx) error {
		w := newBlockWriter(tx)
		for _, f := range spends {
			if err := w.set(blockKeys, f.slot, f.val, f.period); err != nil {
				return err
			}
		}
		if err := w.set(blockAccounts, a.slot, before+amount, 0); err != nil {
			return err
		}
		if err := w.flush(); err != nil {
			return err
		}
		if o.setAlertBelow {
			rec := accountRecord{Tier: a.tier, CreatedAt: a.createdAt, AlertBelow: o.alertBelow}
			if err := tx.Bucket(bucketAccounts).Put([]byte(id), rec.appendTo(nil)); err != nil {
				return err
			}
		}
		return s.writeChangesLocked(tx, res, alerts)
	})
	if err != nil {
		return Account{}, fmt.Errorf("credit %s: %w", id, err)
	}
	a.mu.Lock()
	a.balance += amount
	if o.setAlertBelow {
		a.alertBelow = o.alertBelow
	}
	a.mu.Unlock()
	s.log.Info("account credited", zap.String("account", id), zap.Int64("amount_micros", int64(amount)))
	return a.info(), nil
}

func (a *account) info() Account {
	a.mu.Lock()
	bal, res, below := a.balance, a.reserved, a.alertBelow
	a.mu.Unlock()
	return Account{ID: a.id, Tier: a.tier, Balance: bal, Reserved: res, AlertBelow: below, CreatedAt: fromNanos(a.createdAt)}
}

// validateNewAccount checks what CreateAccount (or Import) is given.
func validateNewAccount(id, tier string, balance money.Micros) error {
	if err := validateAccountID(id); err != nil {
		return err
	}
	if err := validateTier(tier); err != nil {
		return err
	}
	if balance < 0 || balance > money.Max {
		return fmt.Errorf("%w: opening balance %s out of range", ErrInvalid, balance)
	}
	return nil
}

// validateAccountID checks an account ID: 1 to 64 of A-Z a-z 0-9 . _ : -
// (safe in a header value, a log line and a file name).
func validateAccountID(id string) error {
	if err := validateName(id); err != nil {
		return fmt.Errorf("%w: account id %s", ErrInvalid, err)
	}
	return nil
}

// validateTier checks a tier name: empty, or an ID-like name.
func validateTier(tier string) error {
	if tier == "" {
		return nil
	}
	if err := validateName(tier); err != nil {
		return fmt.Errorf("%w: tier %s", ErrInvalid, err)
	}
	return nil
}

func validateName(s string) error {
	if s == "" {
		return fmt.Errorf("is empty")
	}
	if len(s) > maxIDLen {
		return fmt.Errorf("is %d characters long, at most %d", len(s), maxIDLen)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == ':' || c == '-') {
			return fmt.Errorf("%q has %s at byte %d: use letters, digits, '.', '_', ':' and '-'", s, charAt(s, i), i)
		}
	}
	return nil
}

// charAt quotes the character that starts at byte i of s, as Go would
// write it: 'ü', '\n', '\u200b'; or the byte, '\xff', where s is not UTF-8.
func charAt(s string, i int) string {
	r, size := utf8.DecodeRuneInString(s[i:])
	if r == utf8.RuneError && size <= 1 {
		return fmt.Sprintf("'\\x%02x'", s[i])
	}
	return strconv.QuoteRune(r)
}

// controlAt returns the byte offset of the first character of s that
// would break a line or a table column where s is printed: a control
// character (tab and newline included) or a line or paragraph separator;
// -1 if there is none.
func controlAt(s string) int {
	for i, r := range s {
		if unicode.IsControl(r) || r == '\u2028' || r == '\u2029' {
			return i
		}
	}
	return -1
}
