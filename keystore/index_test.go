package keystore

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"unsafe"
	"weak"
)

// hashWith returns a hash in shard s whose next 54 bits are the top bits of
// mid, whose last byte is last, and whose other bytes are zero.
func hashWith(s int, mid uint64, last byte) [hashSize]byte {
	var h [hashSize]byte
	binary.BigEndian.PutUint64(h[0:], uint64(s)<<(64-shardBits)|mid>>shardBits)
	h[hashSize-1] = last
	return h
}

// checkIndex fails t unless x holds exactly want (hash → key ID): every
// shard sorted strictly by hash, every hash in its own shard, every
// directory right, and every key that has an entry its entry's cur.
func checkIndex(t *testing.T, x *hashIndex, want map[[hashSize]byte]string) {
	t.Helper()
	n := 0
	for s := range x.shards {
		sh := x.shards[s].Load()
		if sh == nil {
			continue
		}
		checkDir(t, sh)
		for i := range sh.keys {
			k := &sh.keys[i]
			if got := shardOf(&k.hash); got != s {
				t.Fatalf("shard %d holds %x, of shard %d", s, k.hash, got)
			}
			if i > 0 && cmpHash(&sh.keys[i-1].hash, &k.hash) >= 0 {
				t.Fatalf("shard %d: %x then %x: not strictly sorted", s, sh.keys[i-1].hash, k.hash)
			}
			if id, ok := want[k.hash]; !ok || id != k.ID {
				t.Fatalf("shard %d holds %x → key %q; want %q (present %v)", s, k.hash, k.ID, id, ok)
			}
			if k.entry != nil && k.entry.cur != k {
				t.Fatalf("key %q: its entry points at %p, not at the index's %p", k.ID, k.entry.cur, k)
			}
			n++
		}
	}
	if n != len(want) {
		t.Fatalf("index holds %d keys, want %d", n, len(want))
	}
	for h, id := range want {
		if got := x.get(&h); got == nil || got.ID != id || got.hash != h {
			t.Fatalf("get(%x) = %+v, want key %q", h, got, id)
		}
	}
}

// checkDir fails t unless sh's directory is the one its keys call for.
func checkDir(t *testing.T, sh *shard) {
	t.Helper()
	n := len(sh.keys)
	if len(sh.dir) != dirSize(n) || 1<<(64-int(sh.shift)) != len(sh.dir)-1 {
		t.Fatalf("%d keys: a directory of %d with shift %d, want %d entries", n, len(sh.dir), sh.shift, dirSize(n))
	}
	for b := range len(sh.dir) - 1 {
		want := sort.Search(n, func(i int) bool { return sh.bucket(&sh.keys[i].hash) >= uint64(b) })
		if int(sh.dir[b]) != want {
			t.Fatalf("%d keys: bucket %d starts at %d, want %d", n, b, sh.dir[b], want)
		}
	}
	if int(sh.dir[len(sh.dir)-1]) != n {
		t.Fatalf("%d keys: the directory ends at %d", n, sh.dir[len(sh.dir)-1])
	}
}

// A Key is two cache lines, and the first holds all that Lookup reads (the
// hash, the ID and the two times): verifying a match and checking the key's
// state is one read from memory (see hashIndex).
func TestKeyLayout(t *testing.T) {
	var k Key
	if size := unsafe.Sizeof(k); size != 128 {
		t.Errorf("a Key is %d bytes, want 128", size)
	}
	for name, end := range map[string]uintptr{
		"hash":      unsafe.Offsetof(k.hash) + unsafe.Sizeof(k.hash),
		"ID":        unsafe.Offsetof(k.ID) + unsafe.Sizeof(k.ID),
		"expiresAt": unsafe.Offsetof(k.expiresAt) + unsafe.Sizeof(k.expiresAt),
		"revokedAt": unsafe.Offsetof(k.revokedAt) + unsafe.Sizeof(k.revokedAt),
	} {
		if end > 64 {
			t.Errorf("Key.%s ends at byte %d, past the first cache line", name, end)
		}
	}
}

func randHash(r *rand.Rand) [hashSize]byte {
	var h [hashSize]byte
	for i := 0; i < hashSize; i += 8 {
		binary.LittleEndian.PutUint64(h[i:], r.Uint64())
	}
	return h
}

// Every bit of the hash counts: a hash one bit away from a stored one is
// not found, wherever the bit is.
func TestIndexComparesAllBits(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	x := new(hashIndex)
	want := map[[hashSize]byte]string{}
	var stored [][hashSize]byte
	for i := range 3000 {
		h := randHash(r)
		x.put(h, &Key{ID: strconv.Itoa(i)})
		want[h] = strconv.Itoa(i)
		stored = append(stored, h)
	}
	checkIndex(t, x, want)
	for _, h := range stored[:50] {
		for bit := range hashSize * 8 {
			g := h
			g[bit/8] ^= 0x80 >> (bit % 8)
			if _, ok := want[g]; ok {
				continue
			}
			if k := x.get(&g); k != nil {
				t.Fatalf("get(%x) = key %s, stored under %x (bit %d flipped)", g, k.ID, h, bit)
			}
		}
	}
}

func TestIndexEdges(t *testing.T) {
	const s = 777
	maxMid := ^uint64(0)
	tests := []struct {
		name   string
		puts   [][hashSize]byte
		absent [][hashSize]byte
	}{
		{
			name:   "empty",
			absent: [][hashSize]byte{{}, hashWith(s, 1<<63, 1), hashWith(shardCount-1, maxMid, 0xff)},
		},
		{
			name:   "one entry",
			puts:   [][hashSize]byte{hashWith(s, 1<<62, 5)},
			absent: [][hashSize]byte{hashWith(s, 1<<62, 4), hashWith(s, 1<<62, 6), hashWith(s, 0, 5), hashWith(s, maxMid, 5), hashWith(s+1, 1<<62, 5), hashWith(s-1, 1<<62, 5)},
		},
		{
			name:   "ends of the shard's hashes",
			puts:   [][hashSize]byte{hashWith(s, 0, 0), hashWith(s, 0, 1), hashWith(s, maxMid, 0xfe), hashWith(s, maxMid, 0xff)},
			absent: [][hashSize]byte{hashWith(s, 0, 2), hashWith(s, maxMid, 0xfd), hashWith(s, 1<<63, 0)},
		},
		{
			name:   "first and last shards",
			puts:   [][hashSize]byte{hashWith(0, 1<<40, 1), hashWith(shardCount-1, 1<<40, 1)},
			absent: [][hashSize]byte{hashWith(1, 1<<40, 1), hashWith(shardCount-2, 1<<40, 1)},
		},
		{
			name: "one bucket, differing in the last byte",
			puts: [][hashSize]byte{
				hashWith(s, 12345<<20, 9), hashWith(s, 12345<<20, 3), hashWith(s, 12345<<20, 200), hashWith(s, 12345<<20, 0),
			},
			absent: [][hashSize]byte{hashWith(s, 12345<<20, 4), hashWith(s, 12345<<20, 255), hashWith(s, 12346<<20, 3)},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, how := range []string{"put", "putAll", "build"} {
				x := new(hashIndex)
				want := map[[hashSize]byte]string{}
				var (
					es   []hashEntry
					ph   []pendingHash
					keys = make([]Key, len(tt.puts))
				)
				for i, h := range tt.puts {
					keys[i].ID = strconv.Itoa(i)
					want[h] = keys[i].ID
					es = append(es, hashEntry{hash: h, key: &keys[i]})
					ph = append(ph, pendingHash{hash: h, ord: uint32(i)})
					if how == "put" {
						x.put(h, &keys[i])
					}
				}
				switch how {
				case "putAll":
					x.putAll(es)
				case "build":
					x.build(ph, keys)
				}
				checkIndex(t, x, want)
				for _, h := range tt.absent {
					if k := x.get(&h); k != nil {
						t.Errorf("%s: get(%x) = key %s, want none", how, h, k.ID)
					}
				}
			}
		})
	}

	t.Run("put replaces, copy on write", func(t *testing.T) {
		x := new(hashIndex)
		a, b := hashWith(s, 1<<60, 1), hashWith(s, 1<<61, 1)
		x.put(a, &Key{ID: "k1"})
		x.put(b, &Key{ID: "k2"})
		before := x.shards[s].Load()
		held := x.get(&a) // as a Check holds it
		x.put(a, &Key{ID: "k3"})
		checkIndex(t, x, map[[hashSize]byte]string{a: "k3", b: "k2"})
		if before.keys[0].ID != "k1" || held.ID != "k1" {
			t.Errorf("the published shard changed: copy on write broken")
		}
	})

	t.Run("putAll replaces", func(t *testing.T) {
		x := new(hashIndex)
		a, b, c := hashWith(s, 1<<60, 1), hashWith(s, 1<<61, 1), hashWith(s+1, 1<<61, 1)
		x.put(a, &Key{ID: "k1"})
		x.putAll([]hashEntry{{hash: b, key: &Key{ID: "k1"}}, {hash: a, key: &Key{ID: "k2"}}, {hash: c, key: &Key{ID: "k1"}}})
		checkIndex(t, x, map[[hashSize]byte]string{a: "k2", b: "k1", c: "k1"})
	})

	t.Run("putAll given a hash twice keeps one", func(t *testing.T) {
		x := new(hashIndex)
		a, b := hashWith(s, 1<<60, 1), hashWith(s, 1<<61, 1)
		x.put(a, &Key{ID: "k1"})
		x.putAll([]hashEntry{{hash: b, key: &Key{ID: "k2"}}, {hash: a, key: &Key{ID: "k2"}}, {hash: b, key: &Key{ID: "k3"}}})
		got := x.get(&b)
		if got == nil || got.ID != "k2" && got.ID != "k3" {
			t.Fatalf("get = %+v, want k2 or k3", got)
		}
		checkIndex(t, x, map[[hashSize]byte]string{a: "k2", b: got.ID})
	})
}

// Every hash in one shard with the same first 8 bytes: one bucket holds
// them all, and the search walks scanLimit keys, then bisects.
func TestIndexOneBucket(t *testing.T) {
	x := new(hashIndex)
	want := map[[hashSize]byte]string{}
	r := rand.New(rand.NewPCG(5, 6))
	for i := range 300 {
		h := hashWith(42, 0xdead_beef<<32, 0)
		binary.BigEndian.PutUint64(h[hashSize-8:], r.Uint64()>>1)
		x.put(h, &Key{ID: strconv.Itoa(i)})
		want[h] = strconv.Itoa(i)
	}
	checkIndex(t, x, want)
	h := hashWith(42, 0xdead_beef<<32, 0)
	h[hashSize-8] = 0x80 // above every stored hash
	if x.get(&h) != nil {
		t.Error("found a hash never stored")
	}
}

// find agrees with a plain binary search, on evenly spread shards (where a
// bucket holds a few keys) and on lopsided ones (where one holds hundreds,
// and the walk gives up and bisects).
func TestFind(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 8))
	spreads := []struct {
		name string
		mid  func() uint64
	}{
		{"uniform", r.Uint64},
		{"low", func() uint64 { return r.Uint64N(1 << 30) }},
		{"high", func() uint64 { return ^r.Uint64N(1 << 30) }},
		{"middle", func() uint64 { return 1<<63 + r.Uint64N(1<<20) }},
		{"few values", func() uint64 { return r.Uint64N(4) << 62 }},
	}
	for _, sp := range spreads {
		for _, n := range []int{0, 1, 2, 3, 7, 8, 9, scanLimit - 1, scanLimit, scanLimit + 1, 500, 5000} {
			seen := map[[hashSize]byte]bool{}
			var ks []Key
			for len(ks) < n {
				h := hashWith(3, sp.mid(), byte(r.IntN(256)))
				binary.BigEndian.PutUint16(h[8:], uint16(r.IntN(64))) // room for 5,000 under few values
				if !seen[h] {
					seen[h] = true
					ks = append(ks, Key{hash: h})
				}
			}
			slices.SortFunc(ks, func(a, b Key) int { return cmpHash(&a.hash, &b.hash) })
			sh := &shard{keys: ks}
			sh.index(make([]uint32, dirSize(n)))
			checkDir(t, sh)
			targets := [][hashSize]byte{hashWith(3, 0, 0), hashWith(3, ^uint64(0), 0xff), hashWith(3, 1<<63, 0)}
			for range 200 {
				targets = append(targets, hashWith(3, sp.mid(), byte(r.IntN(256))), hashWith(3, r.Uint64(), 0))
			}
			for _, k := range ks {
				up, down := k.hash, k.hash
				up[hashSize-1]++
				down[hashSize-1]--
				targets = append(targets, k.hash, up, down)
			}
			for _, h := range targets {
				want := sort.Search(n, func(i int) bool { return cmpHash(&ks[i].hash, &h) >= 0 })
				wantOK := want < n && ks[want].hash == h
				if got, ok := sh.find(&h); got != want || ok != wantOK {
					t.Fatalf("%s, n=%d: find(%x) = %d, %v; want %d, %v", sp.name, n, h, got, ok, want, wantOK)
				}
			}
		}
	}
}

// builtIndex is an index as Open leaves it: n keys with random hashes, each
// with an entry whose cur is its key.
type builtIndex struct {
	x       *hashIndex
	hashes  [][hashSize]byte // key i's
	entries []keyEntry       // key i's
	want    map[[hashSize]byte]string
	slab    weak.Pointer[Key] // the array build was given, which the index keeps
}

// buildWithEntries builds a builtIndex. With firstBytes > 0, the hashes'
// first byte takes that many values, crowding a few shards.
func buildWithEntries(r *rand.Rand, n, firstBytes int) builtIndex {
	b := builtIndex{x: new(hashIndex), hashes: make([][hashSize]byte, n), entries: make([]keyEntry, n),
		want: map[[hashSize]byte]string{}}
	keys := make([]Key, n)
	ph := make([]pendingHash, n)
	for i := range keys {
		keys[i] = Key{ID: strconv.Itoa(i), entry: &b.entries[i]}
		b.entries[i].cur = &keys[i]
		b.hashes[i] = randHash(r)
		if firstBytes > 0 {
			b.hashes[i][0] = byte(i % firstBytes)
		}
		ph[i] = pendingHash{hash: b.hashes[i], ord: uint32(i)}
		b.want[b.hashes[i]] = keys[i].ID
	}
	b.x.build(ph, keys)
	b.slab = weak.Make(&keys[0])
	return b
}

// A write moves the keys of its shard: every key's entry follows it, and a
// key held from before still reads as it did.
func TestIndexRepointsEntries(t *testing.T) {
	b := buildWithEntries(rand.New(rand.NewPCG(12, 13)), 2000, 2) // crowd a few shards
	x, hashes, entries, want := b.x, b.hashes, b.entries, b.want
	checkIndex(t, x, want)
	for i := range entries {
		if got := x.get(&hashes[i]); entries[i].cur != got || got.entry != &entries[i] {
			t.Fatalf("after build, entry %d points at %p, the index holds %p", i, entries[i].cur, got)
		}
	}
	held := x.get(&hashes[0])
	e := &keyEntry{}
	h := hashes[0]
	h[hashSize-1] ^= 1
	x.put(h, &Key{ID: "new", entry: e})
	want[h] = "new"
	x.putAll([]hashEntry{{hash: hashes[1], key: &Key{ID: "1", entry: &entries[1], revokedAt: 7}}})
	checkIndex(t, x, want)
	if e.cur == nil || e.cur != x.get(&h) {
		t.Fatalf("the new key's entry points at %p, the index holds %p", e.cur, x.get(&h))
	}
	if k := entries[1].cur; k.revokedAt != 7 || k != x.get(&hashes[1]) {
		t.Fatalf("the replaced key's entry points at %+v", k)
	}
	if held.ID != "0" || held.hash != hashes[0] {
		t.Fatalf("a key held across writes reads %q %x", held.ID, held.hash)
	}
}

// Writes spread over the shards move them out of Open's slab one by one;
// once a quarter of it is dead, the rest move to a fresh slab together, and
// the old one can be freed: no published shard, and no key's entry, points
// into it.
func TestIndexEvacuatesSlab(t *testing.T) {
	r := rand.New(rand.NewPCG(14, 15))
	n := evacuateMin + evacuateMin/8
	b := buildWithEntries(r, n, 0)
	x, hashes, entries, want, slab0 := b.x, b.hashes, b.entries, b.want, b.slab
	if x.slab.live != n {
		t.Fatalf("after build: %d keys live in the slab, want %d", x.slab.live, n)
	}
	first := &x.slab.keys[0]
	inFirst := func(k *Key) bool {
		p := uintptr(unsafe.Pointer(k))
		lo := uintptr(unsafe.Pointer(first))
		return p >= lo && p < lo+uintptr(n)*unsafe.Sizeof(Key{})
	}
	writes := 0
	for ; &x.slab.keys[0] == first; writes++ {
		if writes > 2*shardCount {
			t.Fatalf("%d writes, and the slab is %d of %d keys live: never evacuated", writes, x.slab.live, n)
		}
		if 4*x.slab.live <= 3*n {
			t.Fatalf("the slab is %d of %d keys live and not evacuated", x.slab.live, n)
		}
		i := r.IntN(n) // replace a key, as a revocation does
		x.put(hashes[i], &Key{ID: want[hashes[i]], entry: &entries[i], revokedAt: int64(writes + 1)})
	}
	if writes < shardCount/8 {
		t.Errorf("evacuated after %d writes: too early", writes)
	}
	checkIndex(t, x, want) // every key found, and every entry at its key
	live := 0
	for s := range x.shards {
		sh := x.shards[s].Load()
		for i := range sh.keys {
			if inFirst(&sh.keys[i]) {
				t.Fatalf("shard %d still holds key %s in the old slab", s, sh.keys[i].ID)
			}
		}
		if x.slab.in[s] {
			live += len(sh.keys)
		}
	}
	if live != x.slab.live || live != len(x.slab.keys) {
		t.Errorf("the fresh slab: %d keys in its shards, %d counted live, %d long", live, x.slab.live, len(x.slab.keys))
	}
	runtime.GC()
	runtime.GC()
	if slab0.Value() != nil {
		t.Error("the old slab is still alive after its shards moved out")
	}

	// One putAll (an import) that reaches every shard of the fresh slab
	// leaves nothing in it, and it goes too.
	slab1 := weak.Make(&x.slab.keys[0])
	var es []hashEntry
	for s := range x.shards {
		if x.slab.in[s] {
			k := &x.shards[s].Load().keys[0]
			es = append(es, hashEntry{hash: k.hash, key: &Key{ID: k.ID, entry: k.entry, revokedAt: 1}})
		}
	}
	x.putAll(es)
	if x.slab.live != 0 || len(x.slab.keys) != 0 {
		t.Errorf("after a write to every shard, the slab is %d keys, %d live", len(x.slab.keys), x.slab.live)
	}
	checkIndex(t, x, want)
	runtime.GC()
	runtime.GC()
	if slab1.Value() != nil {
		t.Error("the fresh slab is still alive after every shard moved out")
	}
}

// The index against a map, through any mix of put, putAll and build, on
// hashes crowded into a few shards and buckets so that every path is taken.
func TestIndexMatchesMap(t *testing.T) {
	for seed := range uint64(20) {
		indexAgainstMap(t, rand.New(rand.NewPCG(seed, 99)), 400)
	}
}

func FuzzIndexMatchesMap(f *testing.F) {
	for _, seed := range []uint64{0, 1, 2, 1 << 40} {
		f.Add(seed, uint16(50))
	}
	f.Fuzz(func(t *testing.T, seed uint64, ops uint16) {
		indexAgainstMap(t, rand.New(rand.NewPCG(seed, seed>>32)), int(ops%2000))
	})
}

func indexAgainstMap(t *testing.T, r *rand.Rand, ops int) {
	t.Helper()
	// A pool of distinct hashes with shared shards, shared buckets and
	// shared last bytes.
	var pool [][hashSize]byte
	seen := map[[hashSize]byte]bool{}
	for len(pool) < 64 {
		var h [hashSize]byte
		switch r.IntN(4) {
		case 0:
			h = randHash(r)
		case 1:
			h = hashWith(r.IntN(3), uint64(r.IntN(3))<<62, byte(r.IntN(4)))
		case 2:
			h = hashWith(r.IntN(3), r.Uint64(), byte(r.IntN(4)))
		default:
			if len(pool) == 0 {
				continue
			}
			h = pool[r.IntN(len(pool))]
			h[r.IntN(hashSize)] ^= byte(1 << r.IntN(8))
		}
		if !seen[h] {
			seen[h] = true
			pool = append(pool, h)
		}
	}
	x := new(hashIndex)
	want := map[[hashSize]byte]string{}
	for op := range ops {
		switch r.IntN(10) {
		case 0: // Open: a new index of the map's keys
			keys := make([]Key, 0, len(want))
			var ph []pendingHash
			for h := range want {
				ph = append(ph, pendingHash{hash: h, ord: uint32(len(keys))})
				keys = append(keys, Key{ID: fmt.Sprintf("built%d-%d", op, len(keys))})
			}
			for _, p := range ph {
				want[p.hash] = keys[p.ord].ID
			}
			x = new(hashIndex)
			x.build(ph, keys)
		case 1, 2: // Import or mirroring: distinct hashes, as its callers pass
			var es []hashEntry
			for i, p := range r.Perm(len(pool))[:r.IntN(10)] {
				es = append(es, hashEntry{hash: pool[p], key: &Key{ID: strconv.Itoa(op*100 + i)}})
				want[pool[p]] = es[i].key.ID
			}
			x.putAll(es)
		default:
			h, id := pool[r.IntN(len(pool))], strconv.Itoa(op)
			x.put(h, &Key{ID: id})
			want[h] = id
		}
		if op%10 == 0 || op == ops-1 {
			checkIndex(t, x, want)
			for _, h := range pool {
				got := x.get(&h)
				if id, ok := want[h]; ok != (got != nil) || ok && got.ID != id {
					t.Fatalf("op %d: get(%x) = %+v, want %q (present %v)", op, h, got, id, ok)
				}
			}
		}
	}
	checkIndex(t, x, want)
}

// Readers run alongside a writer; under -race this checks that a Lookup
// never sees a shard being written, and every reader finds every key
// published before it looked.
func TestIndexConcurrent(t *testing.T) {
	r := rand.New(rand.NewPCG(10, 11))
	const n = 3000
	hashes := make([][hashSize]byte, n)
	keys := make([]Key, n)
	for i := range hashes {
		hashes[i] = randHash(r)
		hashes[i][0] = byte(i % 3) // crowd a few shards
		keys[i].ID = strconv.Itoa(i)
	}
	x := new(hashIndex)
	var published atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for g := range 4 {
		wg.Go(func() {
			for published.Load() < n {
				m := int(published.Load())
				for i := g; i < m; i += 97 {
					if got := x.get(&hashes[i]); got == nil || got.ID != keys[i].ID {
						errs <- fmt.Errorf("key %d of %d published: got %+v", i, m, got)
						return
					}
				}
			}
		})
	}
	for i := range hashes {
		if i%500 == 499 {
			es := make([]hashEntry, 0, 100)
			for j := i; j > i-100; j-- { // republish a run with putAll, same keys
				es = append(es, hashEntry{hash: hashes[j], key: &keys[j]})
			}
			x.putAll(es)
		}
		x.put(hashes[i], &keys[i])
		published.Store(int64(i + 1))
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// BenchmarkIndexGet measures the index alone, without hashing a secret.
// Each lookup's position depends on the key the previous one returned, as
// a request's does on the one before it: it measures latency, which is
// what the cache misses of a large index cost.
func BenchmarkIndexGet(b *testing.B) {
	for _, n := range []int{10_000, 1_000_000} {
		r := rand.New(rand.NewPCG(1, uint64(n)))
		keys := make([]Key, n)
		hugePages(keys) // as Open does
		ph := make([]pendingHash, n)
		for i := range ph {
			ph[i] = pendingHash{hash: randHash(r), ord: uint32(i)}
			keys[i].ID = "k" // write every page: unwritten ones all map to one zero page
		}
		// Lookups read hashes in sequence, and keys at random.
		qs := make([][hashSize]byte, n)
		for i, p := range r.Perm(n) {
			qs[i] = ph[p].hash
		}
		misses := make([][hashSize]byte, n)
		for i := range misses {
			misses[i] = randHash(r)
		}
		// The same walk through Go's own map, for scale: any structure
		// whose keys outgrow the caches pays main memory's latency, and
		// this shows how much of the step from 10k to 1M keys is that.
		m := make(map[[hashSize]byte]*Key, n)
		for i := range ph {
			m[ph[i].hash] = &keys[ph[i].ord]
		}
		b.Run(fmt.Sprintf("keys=%s/map", count(n)), func(b *testing.B) {
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				k := m[qs[i]]
				if k == nil {
					b.Fatal("not found")
				}
				i += 1 + int(k.revokedAt) // 0, but a dependency on the key
				if i == n {
					i = 0
				}
			}
		})
		x := new(hashIndex)
		x.build(ph, keys) // moves the keys: the map's pointers go stale
		clear(m)
		b.Run(fmt.Sprintf("keys=%s", count(n)), func(b *testing.B) {
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				k := x.get(&qs[i])
				if k == nil {
					b.Fatal("not found")
				}
				i += 1 + int(k.revokedAt)
				if i == n {
					i = 0
				}
			}
		})
		b.Run(fmt.Sprintf("keys=%s/unknown", count(n)), func(b *testing.B) {
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				if x.get(&misses[i]) != nil {
					b.Fatal("found")
				}
				if i++; i == n {
					i = 0
				}
			}
		})
	}
}

// BenchmarkPointerChase measures what one read from memory costs on this
// machine at each working-set size: each read's address is the value the
// read before it returned, one per 64-byte line, in a random cycle through
// a buffer on huge pages (as the index is). It is the yardstick for
// BenchmarkIndexGet and BenchmarkLookup: the step from 10k to 1M keys is
// about the step here from a few MiB to hundreds.
func BenchmarkPointerChase(b *testing.B) {
	const line = 64 / 8 // uint64s a cache line
	for _, mib := range []int{1, 4, 8, 16, 64, 256} {
		n := mib << 20 / 64
		next := make([]uint64, n*line)
		hugePages(next)
		order := rand.New(rand.NewPCG(1, uint64(mib))).Perm(n)
		for i, at := range order {
			next[at*line] = uint64(order[(i+1)%n] * line)
		}
		b.Run(fmt.Sprintf("MiB=%d", mib), func(b *testing.B) {
			var p uint64
			for b.Loop() {
				p = next[p]
			}
			if p%line != 0 {
				b.Fatal("the chase left the lines' starts")
			}
		})
	}
}
