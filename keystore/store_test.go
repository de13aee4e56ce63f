package keystore_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/keygate/keygate/authz/ratelimit"
	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/money"
)

func TestOpenCreates(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "keygate.db")
	s := mustOpen(t, path)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want 0600: the file holds money and key hashes", fi.Mode().Perm())
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("Open left files behind: %v", entries)
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close = %v, want nil", err)
	}
	mustOpen(t, path).Close() // and it opens again
}

// TestReopen closes and reopens a store with every kind of state in it.
func TestReopen(t *testing.T) {
	path := tempPath(t)
	s := mustOpen(t, path)
	mustAccount(t, s, "acme", 10*money.PerUSD)
	mustAccount(t, s, "beta", 0)
	if _, err := s.Credit("beta", 3); err != nil {
		t.Fatal(err)
	}
	a, sa := mustKey(t, s, keystore.NewKey{
		Account: "acme", Name: "prod", Scopes: []string{"chat:write", "embeddings:write"},
		RateLimit: ratelimit.Rate{N: 500, Per: time.Minute}, SpendCap: money.PerUSD, ExpiresAt: t0.Add(time.Hour),
	})
	b, _ := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"chat:write"}})
	c, sc := mustKey(t, s, keystore.NewKey{Account: "beta", Name: "ünïcode", Scopes: []string{"images:write"}})
	if err := s.Debit(mustLookup(t, s, sa), 2000); err != nil {
		t.Fatal(err)
	}
	if err := s.Debit(mustLookup(t, s, sc), 3); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Revoke(b.ID, t0.Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	_, rotated, rotatedSecret, err := s.Rotate(a.ID, time.Hour, t0.Add(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	accounts, keys := s.Accounts(), s.Keys("")
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	r := mustOpen(t, path)
	defer r.Close()
	if diff := cmp.Diff(accounts, r.Accounts()); diff != "" {
		t.Errorf("accounts after reopen (-before +after):\n%s", diff)
	}
	if diff := cmp.Diff(keys, r.Keys("")); diff != "" {
		t.Errorf("keys after reopen (-before +after):\n%s", diff)
	}
	if len(keys) != 4 || accounts[1].Balance != 0 {
		t.Errorf("unexpected state: %d keys, beta balance %d", len(keys), accounts[1].Balance)
	}
	// The hot path came back too, with its ledger.
	ka := mustLookup(t, r, sa) // in its rotation grace
	if err := r.Debit(ka, money.PerUSD-2000); err != nil {
		t.Errorf("debit up to the cap after reopen: %v", err)
	}
	if err := r.Debit(ka, 1); !errors.Is(err, keystore.ErrSpendCap) {
		t.Errorf("debit past the cap after reopen: %v", err)
	}
	if _, ok := r.Lookup(sa, t0.Add(time.Hour+time.Minute)); ok {
		t.Error("rotated key accepted after its grace, after reopen")
	}
	if k, ok := r.Lookup(rotatedSecret, t0.Add(time.Minute)); !ok || k.ID != rotated.ID || k.Tier() != "free" {
		t.Errorf("rotated-to key after reopen: %v, %v", k, ok)
	}
	if _, ok := r.Lookup(sc, t0); !ok {
		t.Error("key lost across reopen")
	}
	_ = c
}

func TestOpenLocked(t *testing.T) {
	path := tempPath(t)
	s := mustOpen(t, path)
	defer s.Close()
	_, err := keystore.Open(path, keystore.Options{LockTimeout: 50 * time.Millisecond})
	if !errors.Is(err, keystore.ErrLocked) {
		t.Fatalf("second Open = %v, want ErrLocked", err)
	}
	want := path + ": the store is in use by another process (is keygate serve running? use --server)"
	if err.Error() != want {
		t.Errorf("message %q, want %q", err, want)
	}
	// The failed Open released nothing it should not have: s still works.
	mustAccount(t, s, "acme", 1)
}

// putLedgerSlot writes raw into the start of account's ledger slot, as
// schema 3 lays it out: a block of 256 slots of 12 bytes under 'a' and the
// block's number.
func putLedgerSlot(tx *bolt.Tx, account string, raw []byte) error {
	slot := binary.BigEndian.Uint32(tx.Bucket([]byte("account_slots")).Get([]byte(account)))
	key := binary.BigEndian.AppendUint32([]byte{'a'}, slot/256)
	block := bytes.Clone(tx.Bucket([]byte("ledger")).Get(key))
	copy(block[slot%256*12:], raw)
	return tx.Bucket([]byte("ledger")).Put(key, block)
}

func TestOpenRefuses(t *testing.T) {
	// A keygate store with a few pages of keys, built once, copied per case.
	validPath := tempPath(t)
	s := mustOpen(t, validPath)
	mustAccount(t, s, "acme", 100)
	for range 40 {
		mustKey(t, s, keystore.NewKey{Account: "acme", Name: strings.Repeat("n", 200), Scopes: []string{"a"}})
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	validBytes, err := os.ReadFile(validPath)
	if err != nil {
		t.Fatal(err)
	}
	valid := func(t *testing.T) string {
		path := tempPath(t)
		if err := os.WriteFile(path, validBytes, 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	withBolt := func(t *testing.T, path string, f func(tx *bolt.Tx) error) string {
		db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
		if err != nil {
			t.Fatal(err)
		}
		if err := db.Update(f); err != nil {
			t.Fatal(err)
		}
		if err := db.Close(); err != nil {
			t.Fatal(err)
		}
		return path
	}
	write := func(t *testing.T, b []byte) string {
		path := tempPath(t)
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	random := func(n int) []byte {
		r := rand.New(rand.NewPCG(1, 2))
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(r.Uint32())
		}
		return b
	}
	tests := []struct {
		name string
		file func(t *testing.T) string
		want error
	}{
		{"random bytes", func(t *testing.T) string { return write(t, random(64<<10)) }, keystore.ErrNotKeygate},
		{"zero-length file", func(t *testing.T) string { return write(t, nil) }, keystore.ErrNotKeygate},
		{"a text file", func(t *testing.T) string { return write(t, []byte("tiers:\n  free: {rate_limit: 20/m}\n")) }, keystore.ErrNotKeygate},
		{"another program's bbolt file", func(t *testing.T) string {
			return withBolt(t, tempPath(t), func(tx *bolt.Tx) error {
				b, err := tx.CreateBucket([]byte("widgets"))
				if err != nil {
					return err
				}
				return b.Put([]byte("a"), []byte("b"))
			})
		}, keystore.ErrNotKeygate},
		{"an empty bbolt file", func(t *testing.T) string {
			return withBolt(t, tempPath(t), func(*bolt.Tx) error { return nil })
		}, keystore.ErrNotKeygate},
		{"wrong magic", func(t *testing.T) string {
			return withBolt(t, valid(t), func(tx *bolt.Tx) error { return tx.Bucket([]byte("meta")).Put([]byte("magic"), []byte("nope")) })
		}, keystore.ErrNotKeygate},
		{"newer schema", func(t *testing.T) string {
			return withBolt(t, valid(t), func(tx *bolt.Tx) error {
				return tx.Bucket([]byte("meta")).Put([]byte("schema_version"), binary.BigEndian.AppendUint64(nil, 4))
			})
		}, keystore.ErrSchema},
		{"missing bucket", func(t *testing.T) string {
			return withBolt(t, valid(t), func(tx *bolt.Tx) error { return tx.DeleteBucket([]byte("key_slots")) })
		}, keystore.ErrNotKeygate},
		{"garbage key record", func(t *testing.T) string {
			return withBolt(t, valid(t), func(tx *bolt.Tx) error { return tx.Bucket([]byte("keys")).Put([]byte("key_x"), []byte{1, 2, 3}) })
		}, keystore.ErrNotKeygate},
		{"key of a missing account", func(t *testing.T) string {
			return withBolt(t, valid(t), func(tx *bolt.Tx) error {
				tx.Bucket([]byte("accounts")).Delete([]byte("acme"))
				return tx.Bucket([]byte("account_slots")).Delete([]byte("acme"))
			})
		}, keystore.ErrNotKeygate},
		{"negative balance", func(t *testing.T) string {
			return withBolt(t, valid(t), func(tx *bolt.Tx) error {
				return putLedgerSlot(tx, "acme", binary.BigEndian.AppendUint64(nil, 1<<63))
			})
		}, keystore.ErrNotKeygate},
		{"two accounts in one ledger slot", func(t *testing.T) string {
			return withBolt(t, valid(t), func(tx *bolt.Tx) error {
				accounts, slots := tx.Bucket([]byte("accounts")), tx.Bucket([]byte("account_slots"))
				if err := accounts.Put([]byte("zeta"), bytes.Clone(accounts.Get([]byte("acme")))); err != nil {
					return err
				}
				return slots.Put([]byte("zeta"), bytes.Clone(slots.Get([]byte("acme"))))
			})
		}, keystore.ErrNotKeygate},
		{"schema 2, a balance of 3 bytes", func(t *testing.T) string {
			return withBolt(t, valid(t), func(tx *bolt.Tx) error {
				if err := downgrade(tx, 2); err != nil {
					return err
				}
				return tx.Bucket([]byte("balances")).Put([]byte("acme"), []byte{1, 2, 3})
			})
		}, keystore.ErrNotKeygate},
		{"schema 2, an account without a balance", func(t *testing.T) string {
			return withBolt(t, valid(t), func(tx *bolt.Tx) error {
				if err := downgrade(tx, 2); err != nil {
					return err
				}
				return tx.Bucket([]byte("balances")).Delete([]byte("acme"))
			})
		}, keystore.ErrNotKeygate},
		{"ledger block of the wrong size", func(t *testing.T) string {
			return withBolt(t, valid(t), func(tx *bolt.Tx) error {
				c := tx.Bucket([]byte("ledger")).Cursor()
				k, v := c.First()
				return tx.Bucket([]byte("ledger")).Put(bytes.Clone(k), v[:len(v)-1])
			})
		}, keystore.ErrNotKeygate},
		{"truncated", func(t *testing.T) string {
			b, err := os.ReadFile(valid(t))
			if err != nil {
				t.Fatal(err)
			}
			// Cut inside the pages in use: bbolt grows the file ahead of
			// them, so half the file may still hold them all.
			db, err := bolt.Open(validPath, 0o600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
			if err != nil {
				t.Fatal(err)
			}
			var used int64
			db.View(func(tx *bolt.Tx) error { used = tx.Size(); return nil }) //nolint:errcheck // returns nil
			db.Close()
			return write(t, b[:used/2])
		}, keystore.ErrNotKeygate},
		{"damaged pages under good meta pages", func(t *testing.T) string {
			b := bytes.Clone(validBytes)
			copy(b[2*os.Getpagesize():], random(len(b)))
			return write(t, b)
		}, keystore.ErrNotKeygate},
		{"damaged data pages under a good freelist", func(t *testing.T) string {
			// What bbolt.Open reads is intact; the buckets are garbage.
			b := bytes.Clone(validBytes)
			ps := os.Getpagesize()
			keep := freelistPages(t, validPath)
			noise := random(ps)
			for id := 2; (id+1)*ps <= len(b); id++ {
				if !keep[id] {
					copy(b[id*ps:], noise)
				}
			}
			return write(t, b)
		}, keystore.ErrNotKeygate},
		{"wild offsets under a good page header", func(t *testing.T) string {
			// The keys bucket's root page keeps its header, so bbolt follows
			// its garbage offsets, out of the mapping: a fault that the
			// runtime must turn into a panic.
			b := bytes.Clone(validBytes)
			ps := os.Getpagesize()
			root := bucketRoot(t, validPath, "keys")
			noise := random(ps)
			for i := range noise {
				noise[i] |= 0x80 // large offsets
			}
			copy(b[root*ps+16:(root+1)*ps], noise)
			return write(t, b)
		}, keystore.ErrNotKeygate},
		{"both meta pages damaged", func(t *testing.T) string {
			b, err := os.ReadFile(valid(t))
			if err != nil {
				t.Fatal(err)
			}
			ps := os.Getpagesize()
			b[40]++
			b[ps+40]++
			return write(t, b)
		}, keystore.ErrNotKeygate},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := tt.file(t)
			s, refused := keystore.Open(path, keystore.Options{})
			t.Log(refused)
			if !errors.Is(refused, tt.want) || s != nil {
				t.Fatalf("Open = %v, %v; want %v", s, refused, tt.want)
			}
			if !strings.Contains(refused.Error(), path) {
				t.Errorf("message %q does not name the file", refused)
			}
			// The refused file is not left locked.
			db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 50 * time.Millisecond, ReadOnly: true})
			if errors.Is(err, bolterrors.ErrTimeout) {
				t.Errorf("the file is still locked after a refused Open (%v)", refused)
			}
			if err == nil {
				db.Close()
			}
		})
	}
}

// freelistPages returns the pages of the freelist of the bbolt file at path.
func freelistPages(t *testing.T, path string) map[int]bool {
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, PreLoadFreelist: true, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	keep := map[int]bool{}
	err = db.View(func(tx *bolt.Tx) error {
		for id := 2; id < int(tx.Size())/os.Getpagesize(); id++ {
			p, err := tx.Page(id)
			if err != nil {
				return err
			}
			if p != nil && p.Type == "freelist" {
				for i := 0; i <= p.OverflowCount; i++ {
					keep[id+i] = true
				}
			}
		}
		return nil
	})
	if err != nil || len(keep) == 0 {
		t.Fatalf("no freelist found: %v", err)
	}
	return keep
}

// bucketRoot returns the root page of a top-level bucket of the file at path.
func bucketRoot(t *testing.T, path, name string) int {
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var root int
	db.View(func(tx *bolt.Tx) error {
		root = int(tx.Bucket([]byte(name)).Root())
		return nil
	})
	if root < 2 {
		t.Fatalf("bucket %s is inline (root %d): not enough data", name, root)
	}
	return root
}

func TestOpenDirectory(t *testing.T) {
	if _, err := keystore.Open(t.TempDir(), keystore.Options{}); err == nil {
		t.Error("Open of a directory succeeded")
	}
}

func TestClosed(t *testing.T) {
	s := mustOpen(t, tempPath(t))
	mustAccount(t, s, "acme", 10)
	info, secret := mustKey(t, s, keystore.NewKey{Account: "acme", Scopes: []string{"a"}})
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateAccount("beta", "", 0, t0); !errors.Is(err, keystore.ErrClosed) {
		t.Errorf("CreateAccount after Close = %v", err)
	}
	if _, err := s.Credit("acme", 1); !errors.Is(err, keystore.ErrClosed) {
		t.Errorf("Credit after Close = %v", err)
	}
	if _, _, err := s.CreateKey(keystore.NewKey{Account: "acme", Scopes: []string{"a"}}, t0); !errors.Is(err, keystore.ErrClosed) {
		t.Errorf("CreateKey after Close = %v", err)
	}
	if _, err := s.Revoke(info.ID, t0); !errors.Is(err, keystore.ErrClosed) {
		t.Errorf("Revoke after Close = %v", err)
	}
	if _, _, _, err := s.Rotate(info.ID, 0, t0); !errors.Is(err, keystore.ErrClosed) {
		t.Errorf("Rotate after Close = %v", err)
	}
	if err := s.Flush(); !errors.Is(err, keystore.ErrClosed) {
		t.Errorf("Flush after Close = %v", err)
	}
	// Reads still answer from memory.
	if a, err := s.Account("acme"); err != nil || a.Balance != 10 {
		t.Errorf("Account after Close = %v, %v", a, err)
	}
	if _, ok := s.Lookup(secret, t0); !ok {
		t.Error("Lookup after Close failed")
	}
}

// TestSecretNeverStored scans the raw file for the secrets, and the logs.
func TestSecretNeverStored(t *testing.T) {
	path := tempPath(t)
	core, logs := observer.New(zapcore.DebugLevel)
	s, err := keystore.Open(path, keystore.Options{Log: zap.New(core)})
	if err != nil {
		t.Fatal(err)
	}
	mustAccount(t, s, "acme", 100)
	info, secret := mustKey(t, s, keystore.NewKey{Account: "acme", Name: "prod", Scopes: []string{"a"}})
	if err := s.Debit(mustLookup(t, s, secret), 1); err != nil {
		t.Fatal(err)
	}
	_, _, rotated, err := s.Rotate(info.ID, time.Hour, t0)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, sec := range []string{secret, rotated} {
		random := sec[3:35]
		if bytes.Contains(raw, []byte(random)) {
			t.Errorf("the file holds the secret %s...", sec[:6])
		}
		// The test looks in the right place: the hash is there.
		if h := sha256.Sum256([]byte(sec)); !bytes.Contains(raw, h[:]) {
			t.Errorf("the file does not hold the hash of %s...", sec[:6])
		}
	}
	if logs.Len() == 0 {
		t.Fatal("nothing was logged: the log check below would prove nothing")
	}
	for _, e := range logs.All() {
		line := e.Message + " " + strings.Join(fieldStrings(e.ContextMap()), " ")
		for _, sec := range []string{secret, rotated} {
			if strings.Contains(line, sec[3:35]) {
				t.Errorf("log entry holds a secret: %s", e.Message)
			}
		}
	}
}

func fieldStrings(m map[string]any) []string {
	var out []string
	for k, v := range m {
		out = append(out, k+"="+fmt.Sprint(v))
	}
	return out
}
