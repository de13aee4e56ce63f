package keystore

import (
	"encoding/binary"
	"math"
	"math/bits"
	"slices"
	"sort"
	"sync/atomic"
)

// The hot-path index maps the SHA-256 of a secret to its Key, and it holds
// the Keys themselves: each of its 1,024 shards (named by the hash's first
// 10 bits) is an array of Keys sorted by hash, immutable, and published
// behind an atomic.Pointer. Lookup loads one pointer and searches one
// shard: no lock, no allocation. An admin write copies the one shard it
// changes (128 bytes a key: about 125 KB at a million keys, which an
// fsync'd admin write does not notice), publishes the copy, so that a
// revoked key is refused from the next Lookup on, and points every moved
// key's entry at its new place.
//
// At a million keys the Keys are far larger than the caches, and a Lookup
// costs about what its dependent reads from main memory cost: about 200 ns
// each on this project's shared VM, where a pointer chase through huge
// pages (BenchmarkPointerChase) finds only a few MiB of cache that stays
// ours. So the layout keeps those reads to the Key's, and the directory
// entry's when it has left the cache:
//
//   - The Key carries its hash in its first 32 bytes, beside the ID and the
//     times Lookup checks: the read that verifies a match also returns the
//     key, where an index of (hash, pointer) entries made it two dependent
//     reads, the entry and then the Key.
//   - Each shard has a directory: the hash's bits after the shard's name a
//     bucket of two to four keys on average, and the directory (four bytes
//     for every two to four keys: read by every Lookup, it is cached more
//     often than the keys) says where each bucket starts; it replaced an
//     interpolated guess that was off by about ½√n keys, a walk over
//     several lines. A bucket is walked for
//     scanLimit keys at most, then bisected, so that no part of the hash
//     space costs more than a few dozen reads, however the hashes fall.
//   - Few shards, so that the shard pointers and headers stay in cache.
//
// A key is returned only if all 256 bits of its hash match. Sorted arrays
// rather than a hash table: no load-factor slack, which the memory budget
// (300 bytes a key) needs.
const (
	shardBits  = 10
	shardCount = 1 << shardBits
	scanLimit  = 64 // keys walked in a bucket before bisecting
)

// hashEntry is a key to publish under its hash (putAll).
type hashEntry struct {
	hash [hashSize]byte
	key  *Key
}

// shard is one shard's keys sorted by hash. Immutable once published; a
// write publishes a new one.
type shard struct {
	keys []Key
	// dir[b] is the first key of bucket b or a later one (see bucket);
	// dir[len(dir)-1] is len(keys).
	dir   []uint32
	shift uint8
}

// hashIndex is the index. Its zero value is empty and ready to use.
type hashIndex struct {
	shards [shardCount]atomic.Pointer[shard]
	slab   slab // guarded by the writers' locks (see publish)
}

// A slab is one array holding the keys of many shards, as build makes it:
// one allocation, so that it sits on huge pages. A write moves its shard out
// of the slab, but the slab stays alive while any shard is in it, so a long
// run of writes spread over the shards would keep a dead copy of nearly
// every key alive (a million keys: 128 MB more). Once a quarter of a large
// slab is dead, the shards still in it move together to a fresh slab
// (evacuate): at most a quarter of it is ever dead, and the write that
// triggers the move pays for the copy (about 100 MB at a million keys).
type slab struct {
	keys []Key
	in   [shardCount]bool // shard s's keys are a window of keys
	live int              // how many of keys are still a shard's
}

// evacuateMin is the smallest slab worth evacuating (8 MiB of keys): below
// it, a dead quarter costs less than the copy. A slab whose shards have all
// moved out is let go whatever its size.
const evacuateMin = 1 << 16

func shardOf(h *[hashSize]byte) int { return int(binary.BigEndian.Uint16(h[0:]) >> (16 - shardBits)) }

// bucket is h's bucket in sh: the hash's bits after the shard's, as many as
// the directory has buckets.
func (sh *shard) bucket(h *[hashSize]byte) uint64 {
	return binary.BigEndian.Uint64(h[0:]) << shardBits >> sh.shift // 0 when shift is 64: one bucket
}

// dirSize is the length of the directory of n keys: a power of two buckets
// (n/4 to n/2 of them, so two to four keys each), plus the end.
func dirSize(n int) int { return 1<<bits.Len(uint(n)>>1) + 1 }

// index builds sh's directory in dir, of dirSize(len(sh.keys)).
func (sh *shard) index(dir []uint32) {
	buckets := len(dir) - 1
	sh.dir, sh.shift = dir, uint8(64-bits.TrailingZeros(uint(buckets)))
	i := 0
	for b := range buckets {
		for i < len(sh.keys) && sh.bucket(&sh.keys[i].hash) < uint64(b) {
			i++
		}
		dir[b] = uint32(i)
	}
	dir[buckets] = uint32(len(sh.keys))
}

// get returns the key whose secret hashes to h, or nil.
func (x *hashIndex) get(h *[hashSize]byte) *Key {
	sh := x.shards[shardOf(h)].Load()
	if sh == nil {
		return nil
	}
	if i, ok := sh.find(h); ok {
		return &sh.keys[i]
	}
	return nil
}

// find returns where h is, or would go, in sh, and whether it is there. It
// walks h's bucket from its start for at most scanLimit keys and bisects
// what is left of it.
func (sh *shard) find(h *[hashSize]byte) (int, bool) {
	if len(sh.keys) == 0 {
		return 0, false
	}
	b := sh.bucket(h)
	lo, end := int(sh.dir[b]), int(sh.dir[b+1])
	ks := sh.keys[:end]
	for stop := min(end, lo+scanLimit); lo < stop; lo++ {
		if c := cmpHash(&ks[lo].hash, h); c >= 0 {
			return lo, c == 0
		}
	}
	hi := end
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if cmpHash(&ks[m].hash, h) < 0 {
			lo = m + 1
		} else {
			hi = m
		}
	}
	return lo, lo < end && ks[lo].hash == *h
}

// publish makes ks (sorted by hash, all of shard s) the shard, and points
// each key's entry at its new place. The caller holds Store.mu for
// writing, which guards keyEntry.cur, and Store.wmu.
func (x *hashIndex) publish(s int, ks []Key) {
	sh := &shard{keys: ks}
	sh.index(make([]uint32, dirSize(len(ks))))
	repoint(ks)
	if x.slab.in[s] {
		x.slab.in[s] = false
		x.slab.live -= len(x.shards[s].Load().keys)
	}
	x.shards[s].Store(sh)
}

// compact evacuates the slab if a quarter of it is dead. A write calls it
// once, after all its shards are published, so that a write of many shards
// (an import) does not evacuate, and then copy out, the same shards again
// and again. The caller holds what publish needs.
func (x *hashIndex) compact() {
	switch n := len(x.slab.keys); {
	case n > 0 && x.slab.live == 0:
		x.slab = slab{} // every shard moved out: nothing to copy
	case n >= evacuateMin && 4*x.slab.live <= 3*n:
		x.evacuate()
	}
}

// evacuate moves the shards still in the slab to a fresh one, so that the
// old slab can be freed once no Check holds a key in it. The caller holds
// what publish needs.
func (x *hashIndex) evacuate() {
	next := slab{keys: make([]Key, x.slab.live), live: x.slab.live}
	hugePages(next.keys) // before it is written: see hugePages
	at := 0
	for s := range x.slab.in {
		if !x.slab.in[s] {
			continue
		}
		old := x.shards[s].Load()
		ks := next.keys[at : at+len(old.keys) : at+len(old.keys)]
		at += copy(ks, old.keys)
		repoint(ks)
		x.shards[s].Store(&shard{keys: ks, dir: old.dir, shift: old.shift}) // the same keys: the same directory
		next.in[s] = true
	}
	x.slab = next
}

// repoint points the entry of each key in ks at it.
func repoint(ks []Key) {
	for i := range ks {
		if e := ks[i].entry; e != nil {
			e.cur = &ks[i]
		}
	}
}

// put publishes a copy of k under h, replacing the key there if any. The
// caller holds Store.mu for writing and Store.wmu (see publish): k's entry,
// and those of the keys that move with it, point at the copies when put
// returns.
func (x *hashIndex) put(h [hashSize]byte, k *Key) {
	s := shardOf(&h)
	old := x.shards[s].Load()
	if old == nil {
		old = &shard{}
	}
	i, found := old.find(&h)
	rest := old.keys[i:]
	if found {
		rest = rest[1:]
	}
	ks := make([]Key, i+1+len(rest))
	copy(ks, old.keys[:i])
	ks[i] = *k
	ks[i].hash = h
	copy(ks[i+1:], rest)
	x.publish(s, ks)
	x.compact()
}

// putAll publishes copies of many keys at once (Import, mirroring): each
// shard they touch is copied once. es is sorted in place. Its callers never
// pass a hash twice (each entry is a distinct key); if one did, the index
// would hold one of its keys, either. The caller holds what put needs.
func (x *hashIndex) putAll(es []hashEntry) {
	slices.SortFunc(es, func(a, b hashEntry) int { return cmpHash(&a.hash, &b.hash) })
	for lo := 0; lo < len(es); {
		s := shardOf(&es[lo].hash)
		hi := lo + 1
		for hi < len(es) && shardOf(&es[hi].hash) == s {
			hi++
		}
		var old []Key
		if sh := x.shards[s].Load(); sh != nil {
			old = sh.keys
		}
		// Merge two sorted lists; a hash in both takes the new key, as put.
		ks := make([]Key, 0, len(old)+hi-lo)
		i := 0
		for j := lo; j < hi; j++ {
			h := &es[j].hash
			for i < len(old) && cmpHash(&old[i].hash, h) < 0 {
				ks = append(ks, old[i])
				i++
			}
			if i < len(old) && old[i].hash == *h {
				i++
			}
			if m := len(ks); m > 0 && ks[m-1].hash == *h {
				ks = ks[:m-1] // the same hash twice in es: keep one
			}
			ks = append(ks, *es[j].key)
			ks[len(ks)-1].hash = *h
		}
		ks = append(ks, old[i:]...)
		x.publish(s, ks)
		lo = hi
	}
	x.compact()
}

// pendingHash is an index entry during Open: the key is its place in the
// slab of Keys, so the array holds no pointers and sorting it costs the
// garbage collector nothing.
type pendingHash struct {
	hash [hashSize]byte
	ord  uint32
}

// moved marks a pendingHash whose key build has put in its place.
const moved = math.MaxUint32

// build publishes the index of keys at once (Open): ph[i] is the hash of
// keys[ph[i].ord], ph names every key of keys once, and there are fewer
// than 2³² keys. It sorts keys into
// hash order in place, so that every shard is a window of that one slab
// (read by every Lookup: the caller advises it onto huge pages), and
// points every key's entry at its new place. No other goroutine may see the
// index, the keys or their entries yet.
//
// ph is sorted by its first two bytes with two 256-way radix passes, each
// writing 256 sequential streams that stay in cache (a direct 65,536-way
// scatter misses the cache on nearly every write), then each run of equal
// first two bytes (about 15 entries at a million keys) is sorted. The keys
// then move along the cycles of that permutation, each once.
func (x *hashIndex) build(ph []pendingHash, keys []Key) {
	tmp := make([]pendingHash, len(ph))
	radixPass(tmp, ph, 1)
	radixPass(ph, tmp, 0)
	tmp = nil
	for lo := 0; lo < len(ph); {
		hi := lo + 1
		for hi < len(ph) && ph[hi].hash[0] == ph[lo].hash[0] && ph[hi].hash[1] == ph[lo].hash[1] {
			hi++
		}
		slices.SortFunc(ph[lo:hi], func(a, b pendingHash) int { return cmpHash(&a.hash, &b.hash) })
		lo = hi
	}
	for start := range ph {
		if ph[start].ord == moved {
			continue
		}
		held := keys[start]
		j := start
		for {
			from := int(ph[j].ord)
			ph[j].ord = moved
			if from == start {
				keys[j] = held
				break
			}
			keys[j] = keys[from]
			j = from
		}
	}
	for i := range ph {
		keys[i].hash = ph[i].hash
	}
	repoint(keys)

	var ends [shardCount]int // ends[s]: one past shard s's last key
	for i := range keys {
		ends[shardOf(&keys[i].hash)] = i + 1
	}
	lo, dirs := 0, 0
	for s := range ends {
		ends[s] = max(ends[s], lo) // an empty shard ends where the one before did
		if ends[s] > lo {
			dirs += dirSize(ends[s] - lo)
		}
		lo = ends[s]
	}
	shards, dir := make([]shard, shardCount), make([]uint32, dirs)
	x.slab, lo = slab{}, 0
	for s, hi := range ends {
		if hi > lo {
			sh := &shards[s]
			sh.keys = keys[lo:hi:hi]
			n := dirSize(hi - lo)
			sh.index(dir[:n:n])
			dir = dir[n:]
			x.shards[s].Store(sh)
			x.slab.in[s] = true
		}
		lo = hi
	}
	x.slab.keys, x.slab.live = keys, len(keys)
}

// radixPass copies src into dst stably sorted by the hash byte at b.
func radixPass(dst, src []pendingHash, b int) {
	var next [257]int
	for i := range src {
		next[int(src[i].hash[b])+1]++
	}
	for i := 1; i <= 256; i++ {
		next[i] += next[i-1]
	}
	for i := range src {
		c := src[i].hash[b]
		dst[next[c]] = src[i]
		next[c]++
	}
}

func cmpHash(a, b *[hashSize]byte) int {
	for i := 0; i < hashSize; i += 8 {
		x, y := binary.BigEndian.Uint64(a[i:]), binary.BigEndian.Uint64(b[i:])
		if x != y {
			if x < y {
				return -1
			}
			return 1
		}
	}
	return 0
}

// The admin index: every key's entry sorted by key ID, guarded by Store.mu.
// A sorted slice (8 bytes a key) rather than a map (about 40): Open builds it
// for free, since bbolt iterates the keys bucket in ID order, and an insert
// moves a few megabytes at a million keys, which an fsync'd admin write does
// not notice.

// keyByIDLocked returns the entry of key id, or nil. The caller holds s.mu
// (or s.wmu).
func (s *Store) keyByIDLocked(id string) *keyEntry {
	i, ok := s.searchID(id)
	if !ok {
		return nil
	}
	return s.byID[i]
}

func (s *Store) searchID(id string) (int, bool) {
	i := sort.Search(len(s.byID), func(i int) bool { return s.byID[i].cur.ID >= id })
	return i, i < len(s.byID) && s.byID[i].cur.ID == id
}

// insertKeyLocked adds e to the admin index. The caller holds s.mu for
// writing and s.wmu.
func (s *Store) insertKeyLocked(e *keyEntry) {
	i, _ := s.searchID(e.cur.ID)
	s.byID = slices.Insert(s.byID, i, e)
}
