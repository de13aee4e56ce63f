package keystore

import (
	"bytes"
	"encoding/binary"
	"math/bits"
	"slices"
	"sort"
	"sync/atomic"
)

// The hot-path index maps the SHA-256 of a secret to its *Key. It is split
// into 1,024 shards by the first 10 bits of the hash; each shard is sorted by
// hash, immutable, and published behind an atomic.Pointer. Lookup loads one
// pointer and searches one shard: no lock, no allocation. An admin write
// copies the one shard it changes and publishes the copy, so a revoked key is
// refused from the next Lookup on; the copy is 39 bytes for each key of the
// shard (about 40 KB at a million keys), which an fsync'd admin write does
// not notice.
//
// At a million keys the index and the Keys are far larger than the caches,
// and a Lookup costs about what its dependent reads from memory cost (a few
// hundred nanoseconds each on a shared VM, the TLB miss included). The
// layout keeps them to two, the slot and then the Key, where a binary search
// over 65,536 shards of 40-byte entries made five or six:
//
//   - Few shards, so that the shard pointers and headers (56 KiB) stay in
//     cache. Those of 65,536 shards took 2 MiB and cost a miss of their own
//     on most Lookups.
//   - A hash is cut in three (split): 10 bits name the shard, the next 62
//     (pre) sit beside the key's pointer in a 16-byte slot, and the last 23
//     bytes (tail) are kept apart. The search reads only slots, four to a
//     cache line. The tail is read once, at the match, and the read of the
//     Key does not wait for it, so their misses overlap.
//   - Hashes are uniform, so the slot of pre is about n × pre / 2⁶⁴: the
//     search starts there and walks to the right slot, adjacent in memory
//     (the distance is about ½√n at most, typically: 16 slots at a million
//     keys). After scanLimit steps it bisects, so that no part of the hash
//     space costs more than a few dozen reads.
//
// A key is returned only if all 256 bits of its hash match: shard, pre and
// tail. Sorted arrays rather than maps: 39 bytes a key with no load-factor
// slack, which the memory budget (300 bytes a key) needs.
const (
	shardBits  = 10
	shardCount = 1 << shardBits
	tailSize   = hashSize - 9 // the hash's bytes 9 to 31
	scanLimit  = 64           // slots walked from the interpolated guess before bisecting
)

// hashEntry is a key to publish under its hash (putAll).
type hashEntry struct {
	hash [hashSize]byte
	key  *Key
}

// slot is a shard's entry without its tail.
type slot struct {
	pre uint64 // the hash's bits 10 to 71, left-aligned (see split)
	key *Key
}

// shard is one shard's keys sorted by hash: slots[i] and tails[i] are the
// same key. Immutable once published; a write publishes a new one.
type shard struct {
	slots []slot
	tails [][tailSize]byte
}

// hashIndex is the index. Its zero value is empty and ready to use.
type hashIndex struct {
	shards [shardCount]atomic.Pointer[shard]
}

// split cuts h into its shard, its pre and its tail. Within a shard, (pre,
// tail) sort as the whole hash does.
func split(h *[hashSize]byte) (sh int, pre uint64, tail *[tailSize]byte) {
	sh = int(binary.BigEndian.Uint16(h[0:]) >> (16 - shardBits))
	pre = binary.BigEndian.Uint64(h[1:]) << (shardBits - 8)
	return sh, pre, (*[tailSize]byte)(h[9:])
}

// get returns the key whose secret hashes to h, or nil.
func (x *hashIndex) get(h *[hashSize]byte) *Key {
	s, pre, tail := split(h)
	sh := x.shards[s].Load()
	if sh == nil {
		return nil
	}
	for i := seek(sh.slots, pre); i < len(sh.slots) && sh.slots[i].pre == pre; i++ {
		if sh.tails[i] == *tail {
			return sh.slots[i].key
		}
	}
	return nil
}

// find returns where the hash of pre and tail is, or would go, in sh, and
// whether it is there.
func (sh *shard) find(pre uint64, tail *[tailSize]byte) (int, bool) {
	i := seek(sh.slots, pre)
	for ; i < len(sh.slots) && sh.slots[i].pre == pre; i++ {
		if c := cmpTail(&sh.tails[i], tail); c >= 0 {
			return i, c == 0
		}
	}
	return i, false
}

// seek returns the first i with ss[i].pre >= pre, or len(ss). It starts at
// the slot pre would have if the shard's hashes were evenly spaced, walks
// at most scanLimit slots from there, and bisects what is left.
func seek(ss []slot, pre uint64) int {
	n := len(ss)
	if n == 0 {
		return 0
	}
	g, _ := bits.Mul64(pre, uint64(n)) // ⌊n × pre / 2⁶⁴⌋ < n
	lo, hi := 0, n
	if i := int(g); ss[i].pre < pre {
		// The answer is right of i: ss[lo-1].pre < pre throughout.
		for lo = i + 1; lo < min(n, i+1+scanLimit); lo++ {
			if ss[lo].pre >= pre {
				return lo
			}
		}
	} else {
		// The answer is i or left of it: ss[hi].pre >= pre throughout.
		for hi = i; hi > max(0, i-scanLimit); hi-- {
			if ss[hi-1].pre < pre {
				return hi
			}
		}
	}
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if ss[m].pre < pre {
			lo = m + 1
		} else {
			hi = m
		}
	}
	return lo
}

// put publishes k under h, replacing the key there if any. Writers are
// serialised by the caller (Store.wmu).
func (x *hashIndex) put(h [hashSize]byte, k *Key) {
	s, pre, tail := split(&h)
	p := &x.shards[s]
	old := p.Load()
	if old == nil {
		old = &shard{}
	}
	i, found := old.find(pre, tail)
	if found {
		// The tails are unchanged: share them.
		ss := slices.Clone(old.slots)
		ss[i].key = k
		p.Store(&shard{slots: ss, tails: old.tails})
		return
	}
	n := len(old.slots) + 1
	ss, ts := make([]slot, n), make([][tailSize]byte, n)
	copy(ss, old.slots[:i])
	copy(ts, old.tails[:i])
	ss[i], ts[i] = slot{pre: pre, key: k}, *tail
	copy(ss[i+1:], old.slots[i:])
	copy(ts[i+1:], old.tails[i:])
	p.Store(&shard{slots: ss, tails: ts})
}

// putAll publishes many keys at once (Import, mirroring): each shard they
// touch is copied once. es is sorted in place. Its callers never pass a hash
// twice (each entry is a distinct key); if one did, the index would hold one
// of its keys, either. Writers are serialised by the caller.
func (x *hashIndex) putAll(es []hashEntry) {
	slices.SortFunc(es, func(a, b hashEntry) int { return cmpHash(&a.hash, &b.hash) })
	for lo := 0; lo < len(es); {
		s, _, _ := split(&es[lo].hash)
		hi := lo + 1
		for hi < len(es) && shardOfHash(&es[hi].hash) == s {
			hi++
		}
		p := &x.shards[s]
		old := p.Load()
		if old == nil {
			old = &shard{}
		}
		// Merge two sorted lists; a hash in both takes the new key, as put.
		n := len(old.slots) + hi - lo
		ss, ts := make([]slot, 0, n), make([][tailSize]byte, 0, n)
		i := 0
		for j := lo; j < hi; j++ {
			_, pre, tail := split(&es[j].hash)
			for i < len(old.slots) && cmpSlot(old.slots[i].pre, &old.tails[i], pre, tail) < 0 {
				ss, ts = append(ss, old.slots[i]), append(ts, old.tails[i])
				i++
			}
			if i < len(old.slots) && old.slots[i].pre == pre && old.tails[i] == *tail {
				i++
			}
			if m := len(ss); m > 0 && ss[m-1].pre == pre && ts[m-1] == *tail {
				ss[m-1].key = es[j].key // the same hash twice in es: keep one
				continue
			}
			ss, ts = append(ss, slot{pre: pre, key: es[j].key}), append(ts, *tail)
		}
		ss, ts = append(ss, old.slots[i:]...), append(ts, old.tails[i:]...)
		p.Store(&shard{slots: ss, tails: ts})
		lo = hi
	}
}

// pendingHash is an index entry during Open: the key is its place in the
// slab of Keys, so the array holds no pointers and sorting it costs the
// garbage collector nothing.
type pendingHash struct {
	hash [hashSize]byte
	ord  uint32
}

// build publishes the index of keys at once (Open); ph[i].ord indexes keys.
// Entries are sorted by their first two bytes with two 256-way radix
// passes, each writing 256 sequential streams that stay in cache (a direct
// 65,536-way scatter misses the cache on nearly every write), then each run
// of equal first two bytes (about 15 entries at a million keys) is sorted,
// and the sorted whole is cut into shards. Every shard is a window of the
// same two arrays.
func (x *hashIndex) build(ph []pendingHash, keys []Key) {
	tmp := make([]pendingHash, len(ph))
	radixPass(tmp, ph, 1)
	radixPass(ph, tmp, 0)
	for lo := 0; lo < len(ph); {
		hi := lo + 1
		for hi < len(ph) && ph[hi].hash[0] == ph[lo].hash[0] && ph[hi].hash[1] == ph[lo].hash[1] {
			hi++
		}
		slices.SortFunc(ph[lo:hi], func(a, b pendingHash) int { return cmpHash(&a.hash, &b.hash) })
		lo = hi
	}
	ss, ts := make([]slot, len(ph)), make([][tailSize]byte, len(ph))
	hugePages(ss)
	hugePages(ts)
	for i := range ph {
		_, pre, tail := split(&ph[i].hash)
		ss[i], ts[i] = slot{pre: pre, key: &keys[ph[i].ord]}, *tail
	}
	shards := make([]shard, shardCount)
	for lo := 0; lo < len(ph); {
		s := shardOfHash(&ph[lo].hash)
		hi := lo + 1
		for hi < len(ph) && shardOfHash(&ph[hi].hash) == s {
			hi++
		}
		shards[s] = shard{slots: ss[lo:hi:hi], tails: ts[lo:hi:hi]}
		x.shards[s].Store(&shards[s])
		lo = hi
	}
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

func shardOfHash(h *[hashSize]byte) int {
	s, _, _ := split(h)
	return s
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

// cmpSlot compares two hashes of the same shard by their pre and tail.
func cmpSlot(apre uint64, atail *[tailSize]byte, bpre uint64, btail *[tailSize]byte) int {
	if apre != bpre {
		if apre < bpre {
			return -1
		}
		return 1
	}
	return cmpTail(atail, btail)
}

func cmpTail(a, b *[tailSize]byte) int { return bytes.Compare(a[:], b[:]) }

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
