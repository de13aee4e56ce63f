package keystore

import (
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"time"

	bolt "go.etcd.io/bbolt"
	"go.uber.org/zap"

	"github.com/keygate/keygate/keystore/money"
)

// Alert types, as the webhook's "type" field spells them.
const (
	AlertKeySpend          = "key_spend"
	AlertAccountBalanceLow = "account_balance_low"
)

// DefaultAlertThresholds are the fractions of a key's spend cap at which a
// key_spend alert fires when the configuration names none.
var DefaultAlertThresholds = []float64{0.5, 0.8, 1.0}

// An Alert is one threshold crossed: a key's spend reaching a fraction of
// its cap, or an account's balance falling below its alert level. The
// ledger detects crossings as it charges, writes them to the store's outbox
// with the charge that caused them (so a crash loses both or neither), and
// hands them to Options.OnAlert after the write.
type Alert struct {
	ID      string // unique; lets a receiver de-duplicate
	Type    string // AlertKeySpend or AlertAccountBalanceLow
	KeyID   string // key_spend only
	Account string
	At      time.Time

	// key_spend
	Threshold float64 // the fraction of the cap reached
	Spent     money.Micros
	Cap       money.Micros

	// account_balance_low
	Balance    money.Micros
	AlertBelow money.Micros // the account's alert level
}

// alertJSON is the webhook's body, and the outbox's record: the fields of
// the other type are left out, and a zero that applies is kept.
type alertJSON struct {
	ID              string        `json:"id"`
	Type            string        `json:"type"`
	KeyID           string        `json:"key_id,omitempty"`
	Account         string        `json:"account"`
	Threshold       *float64      `json:"threshold,omitempty"`
	Spent           *money.Micros `json:"spent_micros,omitempty"`
	Cap             *money.Micros `json:"cap_micros,omitempty"`
	Balance         *money.Micros `json:"balance_micros,omitempty"`
	ThresholdMicros *money.Micros `json:"threshold_micros,omitempty"`
	At              time.Time     `json:"at"`
}

// MarshalJSON writes the webhook's body.
func (a Alert) MarshalJSON() ([]byte, error) {
	j := alertJSON{ID: a.ID, Type: a.Type, KeyID: a.KeyID, Account: a.Account, At: a.At.UTC()}
	if a.Type == AlertKeySpend {
		j.Threshold, j.Spent, j.Cap = &a.Threshold, &a.Spent, &a.Cap
	} else {
		j.Balance, j.ThresholdMicros = &a.Balance, &a.AlertBelow
	}
	return json.Marshal(j)
}

// UnmarshalJSON reads what MarshalJSON wrote.
func (a *Alert) UnmarshalJSON(b []byte) error {
	var j alertJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return err
	}
	*a = Alert{ID: j.ID, Type: j.Type, KeyID: j.KeyID, Account: j.Account, At: j.At}
	for _, f := range []struct {
		dst *money.Micros
		src *money.Micros
	}{{&a.Spent, j.Spent}, {&a.Cap, j.Cap}, {&a.Balance, j.Balance}, {&a.AlertBelow, j.ThresholdMicros}} {
		if f.src != nil {
			*f.dst = *f.src
		}
	}
	if j.Threshold != nil {
		a.Threshold = *j.Threshold
	}
	return nil
}

// AccountOption changes an account as it is created or credited.
type AccountOption func(*accountOptions)

type accountOptions struct {
	alertBelow    money.Micros
	setAlertBelow bool
}

// WithAlertBelow sets the balance under which the account's low-balance
// alert fires; 0 removes the alert.
func WithAlertBelow(m money.Micros) AccountOption {
	return func(o *accountOptions) { o.alertBelow, o.setAlertBelow = m, true }
}

// crossedLocked records the alerts that a charge crossed, given the
// balance and spend before it: one per key threshold that the spend
// reached from below (a charge may cross several), and one when the
// balance fell under the account's alert level. Spend only grows within
// a period and a balance must be lifted back above the level by a credit
// before it can fall under it again, so each crossing is seen once. The
// caller holds the account's mutex.
func (s *Store) crossedLocked(k *Key, balBefore, spentBefore money.Micros) {
	a, e := k.acct, k.entry
	c := Crossing{KeyID: k.ID, Account: a.id, Cap: k.SpendCap, SpentBefore: spentBefore, SpentAfter: e.spent,
		AlertBelow: a.alertBelow, BalanceBefore: balBefore, BalanceAfter: a.balance}
	if !c.crossesAny(s.thresholds) {
		return
	}
	for _, al := range Crossings(c, s.thresholds, s.now()) {
		al.ID = s.alertID(al.At)
		a.alerts = append(a.alerts, al)
	}
}

// A Crossing is one charge as alert detection sees it: a key's spend and
// its account's balance before and after it.
type Crossing struct {
	KeyID, Account              string
	Cap                         money.Micros // 0: no key alerts
	SpentBefore, SpentAfter     money.Micros
	AlertBelow                  money.Micros // 0: no balance alert
	BalanceBefore, BalanceAfter money.Micros
}

// crossesAny reports cheaply whether Crossings would return anything.
func (c Crossing) crossesAny(thresholds []float64) bool {
	if c.AlertBelow > 0 && c.BalanceBefore >= c.AlertBelow && c.BalanceAfter < c.AlertBelow {
		return true
	}
	if c.Cap <= 0 {
		return false
	}
	for _, t := range thresholds {
		if th := thresholdMicros(c.Cap, t); c.SpentBefore < th && c.SpentAfter >= th {
			return true
		}
	}
	return false
}

// Crossings returns the alerts that the charge c crossed at now: one per
// key threshold (a fraction of the cap) that the spend reached from below
// (≥), and one when the balance fell under the account's alert level. A
// store that applies each charge once, atomically, sees each crossing once:
// the bbolt ledger, and in Redis mode the replica whose script applied the
// charge. The alerts have no ID yet: RaiseAlerts gives them one.
func Crossings(c Crossing, thresholds []float64, now time.Time) []Alert {
	at := now.UTC()
	var out []Alert
	if c.Cap > 0 {
		for _, t := range thresholds {
			if th := thresholdMicros(c.Cap, t); c.SpentBefore < th && c.SpentAfter >= th {
				out = append(out, Alert{Type: AlertKeySpend, KeyID: c.KeyID, Account: c.Account, At: at,
					Threshold: t, Spent: c.SpentAfter, Cap: c.Cap})
			}
		}
	}
	if c.AlertBelow > 0 && c.BalanceBefore >= c.AlertBelow && c.BalanceAfter < c.AlertBelow {
		out = append(out, Alert{Type: AlertAccountBalanceLow, Account: c.Account, At: at,
			Balance: c.BalanceAfter, AlertBelow: c.AlertBelow})
	}
	return out
}

// RaiseAlerts records alerts detected outside this store's ledger (in Redis
// mode, by the replica that applied the charge): each gets an ID, is written
// to the outbox (with Options.Outbox) durably, and is handed to
// Options.OnAlert.
func (s *Store) RaiseAlerts(alerts []Alert) error {
	if len(alerts) == 0 {
		return nil
	}
	alerts = slices.Clone(alerts)
	for i := range alerts {
		if alerts[i].ID == "" {
			alerts[i].ID = s.alertID(alerts[i].At)
		}
	}
	if s.outbox {
		s.lock()
		if s.closed {
			s.wmu.Unlock()
			return ErrClosed
		}
		err := s.db.Update(func(tx *bolt.Tx) error { return s.writeChangesLocked(tx, nil, alerts) })
		s.wmu.Unlock()
		if err != nil {
			return fmt.Errorf("write %d alerts to the outbox: %w", len(alerts), err)
		}
	}
	if s.onAlert != nil {
		s.onAlert(alerts)
	}
	return nil
}

// thresholdMicros is the spend at which fraction t of cap is reached: the
// least whole number of micros at or above cap×t. A product within two
// units in the last place of a whole number is that number: 0.07 is stored
// a little above 7/100, and 100×0.07 comes out as 7.000000000000001, whose
// ceiling would put the threshold one micro past the spend that reaches it.
func thresholdMicros(cap money.Micros, t float64) money.Micros {
	p := float64(cap) * t
	if r := math.Round(p); math.Abs(p-r) <= 2*(math.Nextafter(r, math.Inf(1))-r) {
		return money.Micros(r)
	}
	return money.Micros(math.Ceil(p))
}

// alertID makes a unique, time-ordered ID, so that the outbox (keyed by
// it) gives the oldest alerts first. The random part keeps IDs unique
// across restarts, where the sequence starts over, whatever the clock does.
func (s *Store) alertID(at time.Time) string {
	return fmt.Sprintf("alert_%016x%08x%08x", at.UnixNano(), s.alertSeq.Add(1), rand.Uint32())
}

// PendingAlerts returns the alerts of the outbox: written, not yet
// acknowledged by AckAlerts. Oldest first.
func (s *Store) PendingAlerts() ([]Alert, error) {
	var out []Alert
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketOutbox).ForEach(func(k, v []byte) error {
			var a Alert
			if err := json.Unmarshal(v, &a); err != nil {
				s.log.Error("unreadable alert in the outbox; skipped", zap.ByteString("id", k), zap.Error(err))
				return nil
			}
			out = append(out, a)
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("read the alert outbox: %w", err)
	}
	return out, nil
}

// AckAlerts removes delivered alerts from the outbox, durably. Unknown IDs
// are ignored.
func (s *Store) AckAlerts(ids []string) error {
	if len(ids) == 0 {
		return nil
	}
	s.lock()
	defer s.wmu.Unlock()
	if s.closed {
		return ErrClosed
	}
	err := s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketOutbox)
		for _, id := range ids {
			if err := b.Delete([]byte(id)); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("acknowledge %d alerts: %w", len(ids), err)
	}
	return nil
}
