package keystore

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/keygate/keygate/authz/ratelimit"
	"github.com/keygate/keygate/keystore/money"
)

// Records are hand-rolled binary, not JSON: a store of a million keys is
// decoded whole on every Open, and this format decodes in tens of nanoseconds
// per key without allocating (the loader converts only what it keeps). Each
// record starts with a version byte so that a later keygate can change the
// layout and still read old records.
//
//	account:     v1 | tier | created_at [| alert_below]
//	key:         v1 | sha256[32] | account | name | n_scopes {scope} | rate_n | rate_per_ns
//	                | spend_cap | created_at | expires_at | revoked_at | rotated_to [| cap_period]
//	reservation: v1 | key_id | price | max_price | deadline
//
// Strings are a uvarint length then the bytes; numbers are varints (times in
// Unix nanoseconds, 0 for "unset"). Fields in brackets came with schema 2:
// they are written only when not zero, so a record that does not use them
// reads the same in both schemas. Balances and spend live in their own
// buckets as 8-byte big-endian values (a spend with a cap period adds the
// period's 4-byte number), so that the write-behind flush rewrites a few
// bytes per account or key and never a whole record.
const recordV1 = 1

// Limits that keep a record small; the admin layer validates earlier with
// friendlier messages, these are the store's last word.
const (
	maxNameLen   = 200 // characters
	maxScopes    = 64
	maxScopeLen  = 128
	maxIDLen     = 64
	maxRecordLen = 1 << 16
)

var errRecord = errors.New("malformed record")

// accountRecord is an account's durable description, without its balance.
type accountRecord struct {
	Tier       string
	CreatedAt  int64
	AlertBelow money.Micros
}

func (r *accountRecord) appendTo(dst []byte) []byte {
	dst = append(dst, recordV1)
	dst = appendString(dst, r.Tier)
	dst = binary.AppendVarint(dst, r.CreatedAt)
	if r.AlertBelow != 0 {
		dst = binary.AppendVarint(dst, int64(r.AlertBelow))
	}
	return dst
}

// accountView is a decoded account record whose byte fields alias the input.
type accountView struct {
	tier       []byte
	createdAt  int64
	alertBelow money.Micros
}

func decodeAccount(b []byte) (accountView, error) {
	d := decoder{b: b}
	var v accountView
	d.version()
	v.tier = d.bytes(maxIDLen)
	v.createdAt = d.varint()
	if d.more() {
		v.alertBelow = money.Micros(d.varint())
		if d.err == nil && (v.alertBelow <= 0 || v.alertBelow > money.Max) {
			d.fail("alert level %d out of range", v.alertBelow)
		}
	}
	return v, d.finish()
}

// keyRecord is a key's durable description, without its spend.
type keyRecord struct {
	Hash      [hashSize]byte
	Account   string
	Name      string
	Scopes    []string
	RateLimit ratelimit.Rate
	SpendCap  money.Micros
	CreatedAt int64
	ExpiresAt int64
	RevokedAt int64
	RotatedTo string
	CapPeriod Period
}

func (r *keyRecord) appendTo(dst []byte) []byte {
	dst = append(dst, recordV1)
	dst = append(dst, r.Hash[:]...)
	dst = appendString(dst, r.Account)
	dst = appendString(dst, r.Name)
	dst = appendScopes(dst, r.Scopes)
	dst = binary.AppendVarint(dst, r.RateLimit.N)
	dst = binary.AppendVarint(dst, int64(r.RateLimit.Per))
	dst = binary.AppendVarint(dst, int64(r.SpendCap))
	dst = binary.AppendVarint(dst, r.CreatedAt)
	dst = binary.AppendVarint(dst, r.ExpiresAt)
	dst = binary.AppendVarint(dst, r.RevokedAt)
	dst = appendString(dst, r.RotatedTo)
	if r.CapPeriod != PeriodNone {
		dst = binary.AppendUvarint(dst, uint64(r.CapPeriod))
	}
	return dst
}

// keyView is a decoded key record whose byte fields alias the input: valid
// only as long as the input (inside a bbolt transaction, until it ends).
type keyView struct {
	hash      [hashSize]byte
	account   []byte
	name      []byte
	scopes    []byte // the encoded scope list: a canonical key for interning
	nScopes   int
	rate      ratelimit.Rate
	spendCap  money.Micros
	createdAt int64
	expiresAt int64
	revokedAt int64
	rotatedTo []byte
	capPeriod Period
}

func decodeKey(b []byte) (keyView, error) {
	d := decoder{b: b}
	var v keyView
	d.version()
	copy(v.hash[:], d.take(hashSize))
	v.account = d.bytes(maxIDLen)
	v.name = d.bytes(4 * maxNameLen) // characters are up to 4 bytes
	start := d.off
	v.nScopes = int(d.uvarint())
	if d.err == nil && v.nScopes > maxScopes {
		d.fail("%d scopes", v.nScopes)
	}
	for i := 0; i < v.nScopes && d.err == nil; i++ {
		d.bytes(maxScopeLen)
	}
	if d.err == nil {
		v.scopes = b[start:d.off]
	}
	v.rate.N = d.varint()
	v.rate.Per = time.Duration(d.varint())
	v.spendCap = money.Micros(d.varint())
	v.createdAt = d.varint()
	v.expiresAt = d.varint()
	v.revokedAt = d.varint()
	v.rotatedTo = d.bytes(maxIDLen)
	if d.more() {
		switch p := d.uvarint(); p {
		case uint64(PeriodDay), uint64(PeriodMonth):
			v.capPeriod = Period(p)
		default:
			d.fail("cap period %d", p)
		}
	}
	if d.err == nil {
		switch {
		case v.rate.N < 0 || v.rate.Per < 0:
			d.fail("negative rate limit")
		case v.spendCap < 0 || v.spendCap > money.Max:
			d.fail("spend cap %d out of range", v.spendCap)
		}
	}
	return v, d.finish()
}

// scopeList decodes the encoded scope list of v into fresh strings.
func (v *keyView) scopeList() []string {
	d := decoder{b: v.scopes}
	n := int(d.uvarint())
	out := make([]string, 0, n)
	for i := 0; i < n && d.err == nil; i++ {
		out = append(out, string(d.bytes(maxScopeLen)))
	}
	return out
}

// getBalance reads a balance, which may be below zero: a settled charge
// above its reservation can take it there (see Settle).
func getBalance(b []byte) (money.Micros, error) {
	if len(b) != 8 {
		return 0, fmt.Errorf("%w: amount of %d bytes, want 8", errRecord, len(b))
	}
	m := money.Micros(binary.BigEndian.Uint64(b))
	if m < -money.Max || m > money.Max {
		return 0, fmt.Errorf("%w: balance %d out of range", errRecord, int64(m))
	}
	return m, nil
}

// getSpend reads a spend as schema 2 wrote it, and as a ledger slot holds
// it: 8 bytes, or 12 with the number of its cap period.
func getSpend(b []byte) (money.Micros, int32, error) {
	var period int32
	if len(b) == 12 {
		period = int32(binary.BigEndian.Uint32(b[8:]))
		if period <= 0 {
			return 0, 0, fmt.Errorf("%w: cap period %d", errRecord, period)
		}
		b = b[:8]
	}
	m, err := getMicros(b)
	return m, period, err
}

// reservationRecord is an open reservation, written by the flush so that
// it survives a restart with its deadline.
type reservationRecord struct {
	KeyID    string
	Price    money.Micros
	MaxPrice money.Micros
	Deadline int64
}

func (r *reservationRecord) appendTo(dst []byte) []byte {
	dst = append(dst, recordV1)
	dst = appendString(dst, r.KeyID)
	dst = binary.AppendVarint(dst, int64(r.Price))
	dst = binary.AppendVarint(dst, int64(r.MaxPrice))
	return binary.AppendVarint(dst, r.Deadline)
}

func decodeReservation(b []byte) (reservationRecord, error) {
	d := decoder{b: b}
	var r reservationRecord
	d.version()
	r.KeyID = string(d.bytes(maxIDLen))
	r.Price = money.Micros(d.varint())
	r.MaxPrice = money.Micros(d.varint())
	r.Deadline = d.varint()
	if d.err == nil && (r.Price <= 0 || r.MaxPrice < r.Price || r.MaxPrice > money.Max) {
		d.fail("reservation of %d (at most %d) out of range", r.Price, r.MaxPrice)
	}
	return r, d.finish()
}

func getMicros(b []byte) (money.Micros, error) {
	if len(b) != 8 {
		return 0, fmt.Errorf("%w: amount of %d bytes, want 8", errRecord, len(b))
	}
	m := money.Micros(binary.BigEndian.Uint64(b))
	if m < 0 || m > money.Max {
		return 0, fmt.Errorf("%w: amount %d out of range", errRecord, int64(m))
	}
	return m, nil
}

// appendScopes encodes a scope list; the encoding doubles as the key that
// interns scope sets.
func appendScopes(dst []byte, scopes []string) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(scopes)))
	for _, sc := range scopes {
		dst = appendString(dst, sc)
	}
	return dst
}

func appendString(dst []byte, s string) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(s)))
	return append(dst, s...)
}

// decoder reads a record; the first error sticks, and every later read
// returns zero values, so decoding code reads straight through.
type decoder struct {
	b   []byte
	off int
	err error
}

func (d *decoder) fail(format string, args ...any) {
	if d.err == nil {
		d.err = fmt.Errorf("%w: "+format, append([]any{errRecord}, args...)...)
	}
}

func (d *decoder) version() {
	if len(d.b) == 0 {
		d.fail("empty")
		return
	}
	if d.b[0] != recordV1 {
		d.fail("record version %d (this keygate reads %d)", d.b[0], recordV1)
		return
	}
	d.off = 1
}

func (d *decoder) take(n int) []byte {
	if d.err != nil {
		return nil
	}
	if n < 0 || len(d.b)-d.off < n {
		d.fail("truncated at byte %d", d.off)
		return nil
	}
	p := d.b[d.off : d.off+n : d.off+n]
	d.off += n
	return p
}

func (d *decoder) uvarint() uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.b[d.off:])
	if n <= 0 {
		d.fail("bad number at byte %d", d.off)
		return 0
	}
	d.off += n
	return v
}

func (d *decoder) varint() int64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Varint(d.b[d.off:])
	if n <= 0 {
		d.fail("bad number at byte %d", d.off)
		return 0
	}
	d.off += n
	return v
}

func (d *decoder) bytes(max int) []byte {
	n := d.uvarint()
	if d.err == nil && n > uint64(max) {
		d.fail("string of %d bytes at byte %d", n, d.off)
	}
	return d.take(int(n))
}

// more reports whether an optional trailing field follows.
func (d *decoder) more() bool { return d.err == nil && d.off < len(d.b) }

func (d *decoder) finish() error {
	if d.err == nil && d.off != len(d.b) {
		d.fail("%d trailing bytes", len(d.b)-d.off)
	}
	return d.err
}
