package keystore

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"slices"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
)

// joinHash is split's inverse: the hash a slot of shard s stands for.
func joinHash(s int, pre uint64, tail *[tailSize]byte) [hashSize]byte {
	var h [hashSize]byte
	binary.BigEndian.PutUint64(h[0:], uint64(s)<<(64-shardBits)|pre>>shardBits)
	h[8] = byte(pre >> (shardBits - 8))
	copy(h[9:], tail[:])
	return h
}

// checkIndex fails t unless x holds exactly want, every shard sorted
// strictly by hash, and every hash in its own shard.
func checkIndex(t *testing.T, x *hashIndex, want map[[hashSize]byte]*Key) {
	t.Helper()
	n := 0
	for s := range x.shards {
		sh := x.shards[s].Load()
		if sh == nil {
			continue
		}
		if len(sh.slots) != len(sh.tails) {
			t.Fatalf("shard %d: %d slots, %d tails", s, len(sh.slots), len(sh.tails))
		}
		var prev [hashSize]byte
		for i := range sh.slots {
			h := joinHash(s, sh.slots[i].pre, &sh.tails[i])
			if got, _, _ := split(&h); got != s {
				t.Fatalf("shard %d holds %x, of shard %d", s, h, got)
			}
			if sh.slots[i].pre&(1<<(shardBits-8)-1) != 0 {
				t.Fatalf("shard %d slot %d: pre %#x has its unused low bits set", s, i, sh.slots[i].pre)
			}
			if i > 0 && cmpHash(&prev, &h) >= 0 {
				t.Fatalf("shard %d: %x then %x: not strictly sorted", s, prev, h)
			}
			prev = h
			if k, ok := want[h]; !ok || k != sh.slots[i].key {
				t.Fatalf("shard %d holds %x → %p; want %p (present %v)", s, h, sh.slots[i].key, k, ok)
			}
			n++
		}
	}
	if n != len(want) {
		t.Fatalf("index holds %d keys, want %d", n, len(want))
	}
	for h, k := range want {
		if got := x.get(&h); got != k {
			t.Fatalf("get(%x) = %p, want %p", h, got, k)
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

// hashWith returns a hash in shard s with the given pre and a tail whose
// last byte is last.
func hashWith(s int, pre uint64, last byte) [hashSize]byte {
	var tail [tailSize]byte
	tail[tailSize-1] = last
	return joinHash(s, pre&^(1<<(shardBits-8)-1), &tail)
}

func TestSplitJoin(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for range 1000 {
		h := randHash(r)
		s, pre, tail := split(&h)
		if s < 0 || s >= shardCount {
			t.Fatalf("split(%x): shard %d", h, s)
		}
		if got := joinHash(s, pre, tail); got != h {
			t.Fatalf("joinHash(split(%x)) = %x", h, got)
		}
	}
	// Within a shard, (pre, tail) order is the hash's order.
	for range 1000 {
		a, b := randHash(r), randHash(r)
		b[0], b[1] = a[0], a[1]
		_, apre, atail := split(&a)
		_, bpre, btail := split(&b)
		if got, want := cmpSlot(apre, atail, bpre, btail), cmpHash(&a, &b); got != want {
			t.Fatalf("cmpSlot(%x, %x) = %d, cmpHash = %d", a, b, got, want)
		}
	}
}

// Every bit of the hash counts: a hash one bit away from a stored one is
// not found, wherever the bit is.
func TestIndexComparesAllBits(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	x := new(hashIndex)
	want := map[[hashSize]byte]*Key{}
	var stored [][hashSize]byte
	for i := range 3000 {
		h := randHash(r)
		k := &Key{ID: strconv.Itoa(i)}
		x.put(h, k)
		want[h] = k
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
	k1, k2, k3 := &Key{ID: "k1"}, &Key{ID: "k2"}, &Key{ID: "k3"}
	const s = 777
	maxPre := ^uint64(0)
	tests := []struct {
		name   string
		puts   [][hashSize]byte
		absent [][hashSize]byte
	}{
		{
			name:   "empty",
			absent: [][hashSize]byte{{}, hashWith(s, 1<<63, 1), hashWith(shardCount-1, maxPre, 0xff)},
		},
		{
			name:   "one entry",
			puts:   [][hashSize]byte{hashWith(s, 1<<62, 5)},
			absent: [][hashSize]byte{hashWith(s, 1<<62, 4), hashWith(s, 1<<62, 6), hashWith(s, 0, 5), hashWith(s, maxPre, 5), hashWith(s+1, 1<<62, 5), hashWith(s-1, 1<<62, 5)},
		},
		{
			name:   "ends of the pre range",
			puts:   [][hashSize]byte{hashWith(s, 0, 0), hashWith(s, 0, 1), hashWith(s, maxPre, 0xfe), hashWith(s, maxPre, 0xff)},
			absent: [][hashSize]byte{hashWith(s, 0, 2), hashWith(s, maxPre, 0xfd), hashWith(s, 1<<63, 0)},
		},
		{
			name:   "ends of the shard range",
			puts:   [][hashSize]byte{hashWith(0, 1<<40, 1), hashWith(shardCount-1, 1<<40, 1)},
			absent: [][hashSize]byte{hashWith(1, 1<<40, 1), hashWith(shardCount-2, 1<<40, 1)},
		},
		{
			name: "same pre, tails differ",
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
				want := map[[hashSize]byte]*Key{}
				var (
					es   []hashEntry
					ph   []pendingHash
					keys = make([]Key, len(tt.puts))
				)
				for i, h := range tt.puts {
					keys[i].ID = strconv.Itoa(i)
					want[h] = &keys[i]
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

	t.Run("put replaces", func(t *testing.T) {
		x := new(hashIndex)
		a, b := hashWith(s, 1<<60, 1), hashWith(s, 1<<61, 1)
		x.put(a, k1)
		x.put(b, k2)
		before := x.shards[s].Load()
		x.put(a, k3)
		checkIndex(t, x, map[[hashSize]byte]*Key{a: k3, b: k2})
		if before.slots[0].key != k1 {
			t.Errorf("the published shard changed: copy-on-write broken")
		}
	})

	t.Run("putAll replaces", func(t *testing.T) {
		x := new(hashIndex)
		a, b, c := hashWith(s, 1<<60, 1), hashWith(s, 1<<61, 1), hashWith(s+1, 1<<61, 1)
		x.put(a, k1)
		x.putAll([]hashEntry{{hash: b, key: k1}, {hash: a, key: k2}, {hash: c, key: k1}})
		checkIndex(t, x, map[[hashSize]byte]*Key{a: k2, b: k1, c: k1})
	})

	t.Run("putAll given a hash twice keeps one", func(t *testing.T) {
		x := new(hashIndex)
		a, b := hashWith(s, 1<<60, 1), hashWith(s, 1<<61, 1)
		x.put(a, k1)
		x.putAll([]hashEntry{{hash: b, key: k2}, {hash: a, key: k2}, {hash: b, key: k3}})
		got := x.get(&b)
		if got != k2 && got != k3 {
			t.Fatalf("get = %p, want k2 %p or k3 %p", got, k2, k3)
		}
		checkIndex(t, x, map[[hashSize]byte]*Key{a: k2, b: got})
	})
}

// Every hash in one shard with one pre: the interpolated guess is useless
// and the search is a walk over tails.
func TestIndexAllSamePre(t *testing.T) {
	x := new(hashIndex)
	want := map[[hashSize]byte]*Key{}
	r := rand.New(rand.NewPCG(5, 6))
	for i := range 300 {
		var tail [tailSize]byte
		binary.BigEndian.PutUint64(tail[tailSize-8:], r.Uint64())
		h := joinHash(42, 0xdead_beef<<32, &tail)
		k := &Key{ID: strconv.Itoa(i)}
		x.put(h, k)
		want[h] = k
	}
	checkIndex(t, x, want)
	var tail [tailSize]byte
	tail[0] = 1 // above every stored tail
	if h := joinHash(42, 0xdead_beef<<32, &tail); x.get(&h) != nil {
		t.Error("found a hash never stored")
	}
}

// seek agrees with a plain binary search, on evenly spread shards (where
// the guess is close) and on lopsided ones (where the walk gives up and
// bisects, to either side).
func TestSeek(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 8))
	spreads := []struct {
		name string
		pre  func() uint64
	}{
		{"uniform", r.Uint64},
		{"low", func() uint64 { return r.Uint64N(1 << 20) }},
		{"high", func() uint64 { return ^r.Uint64N(1 << 20) }},
		{"middle", func() uint64 { return 1<<63 + r.Uint64N(1000) }},
		{"few values", func() uint64 { return r.Uint64N(4) << 62 }},
	}
	for _, sp := range spreads {
		for _, n := range []int{0, 1, 2, 3, scanLimit - 1, scanLimit, scanLimit + 1, 500, 5000} {
			ss := make([]slot, n)
			for i := range ss {
				ss[i].pre = sp.pre()
			}
			slices.SortFunc(ss, func(a, b slot) int {
				if a.pre < b.pre {
					return -1
				} else if a.pre > b.pre {
					return 1
				}
				return 0
			})
			targets := []uint64{0, 1, ^uint64(0), ^uint64(0) - 1, 1 << 63}
			for range 200 {
				targets = append(targets, sp.pre(), r.Uint64())
			}
			for _, s := range ss {
				targets = append(targets, s.pre, s.pre-1, s.pre+1)
			}
			for _, pre := range targets {
				want := sort.Search(n, func(i int) bool { return ss[i].pre >= pre })
				if got := seek(ss, pre); got != want {
					t.Fatalf("%s, n=%d: seek(%#x) = %d, want %d", sp.name, n, pre, got, want)
				}
			}
		}
	}
}

// The index against a map, through any mix of put, putAll and build, on
// hashes crowded into a few shards and pres so that every path is taken.
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
	// A pool of distinct hashes with shared shards, shared pres and shared
	// tails.
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
	want := map[[hashSize]byte]*Key{}
	for op := range ops {
		switch r.IntN(10) {
		case 0: // Open: a new index of the map's keys
			keys := make([]Key, 0, len(want))
			var ph []pendingHash
			for h := range want {
				ph = append(ph, pendingHash{hash: h, ord: uint32(len(keys))})
				keys = append(keys, Key{ID: "built" + strconv.Itoa(op)})
			}
			x = new(hashIndex)
			x.build(ph, keys)
			for _, p := range ph {
				want[p.hash] = &keys[p.ord]
			}
		case 1, 2: // Import or mirroring: distinct hashes, as its callers pass
			var es []hashEntry
			for i, p := range r.Perm(len(pool))[:r.IntN(10)] {
				es = append(es, hashEntry{hash: pool[p], key: &Key{ID: strconv.Itoa(op*100 + i)}})
				want[pool[p]] = es[i].key
			}
			x.putAll(es)
		default:
			h, k := pool[r.IntN(len(pool))], &Key{ID: strconv.Itoa(op)}
			x.put(h, k)
			want[h] = k
		}
		if op%10 == 0 || op == ops-1 {
			checkIndex(t, x, want)
			for _, h := range pool {
				if got := x.get(&h); got != want[h] {
					t.Fatalf("op %d: get(%x) = %p, want %p", op, h, got, want[h])
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
	}
	x := new(hashIndex)
	var published atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for published.Load() < n {
				m := int(published.Load())
				for i := g; i < m; i += 97 {
					if got := x.get(&hashes[i]); got != &keys[i] {
						errs <- fmt.Errorf("key %d of %d published: got %p", i, m, got)
						return
					}
				}
			}
		}()
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
// what the cache misses of a large index cost. Keys live in one slab in an
// order unrelated to their hashes, as after Open.
func BenchmarkIndexGet(b *testing.B) {
	for _, n := range []int{10_000, 1_000_000} {
		r := rand.New(rand.NewPCG(1, uint64(n)))
		keys := make([]Key, n)
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
		x := new(hashIndex)
		x.build(ph, keys)
		b.Run(fmt.Sprintf("keys=%s", count(n)), func(b *testing.B) {
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				k := x.get(&qs[i])
				if k == nil {
					b.Fatal("not found")
				}
				i += 1 + int(k.revokedAt) // 0, but a dependency on the key
				if i == n {
					i = 0
				}
			}
		})
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
