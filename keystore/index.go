package keystore

import (
	"encoding/binary"
	"slices"
	"sort"
	"sync/atomic"
)

// The hot-path index maps the SHA-256 of a secret to its *Key. It is split
// into 65,536 shards by the first two bytes of the hash (uniform, since it is
// a hash); each shard is an immutable slice sorted by hash behind an
// atomic.Pointer. Lookup loads one pointer and binary-searches about 15
// entries at a million keys: no lock, no allocation. An admin write copies
// the one shard it changes and publishes the copy, so a revoked key is
// refused from the next Lookup on and the write costs the same at a million
// keys as at ten. Sorted slices rather than maps: 40 bytes per key with no
// load-factor slack, which the memory budget (300 bytes per key) needs.
const shardCount = 1 << 16

type hashEntry struct {
	hash [hashSize]byte
	key  *Key
}

type shard struct{ entries []hashEntry } // immutable once published

type hashIndex struct {
	shards [shardCount]atomic.Pointer[shard]
}

func shardOf(h *[hashSize]byte) int { return int(h[0])<<8 | int(h[1]) }

// get returns the key whose secret hashes to h, or nil.
func (x *hashIndex) get(h *[hashSize]byte) *Key {
	sh := x.shards[shardOf(h)].Load()
	if sh == nil {
		return nil
	}
	i, ok := search(sh.entries, h)
	if !ok {
		return nil
	}
	return sh.entries[i].key
}

// put publishes k under h, replacing the key there if any. Writers are
// serialised by the caller (Store.wmu).
func (x *hashIndex) put(h [hashSize]byte, k *Key) {
	p := &x.shards[shardOf(&h)]
	var old []hashEntry
	if sh := p.Load(); sh != nil {
		old = sh.entries
	}
	i, found := search(old, &h)
	var es []hashEntry
	if found {
		es = slices.Clone(old)
		es[i].key = k
	} else {
		es = make([]hashEntry, len(old)+1)
		copy(es, old[:i])
		es[i] = hashEntry{hash: h, key: k}
		copy(es[i+1:], old[i:])
	}
	p.Store(&shard{entries: es})
}

// putAll publishes many keys at once (Import): each shard they touch is
// copied once. es is sorted in place. Writers are serialised by the caller.
func (x *hashIndex) putAll(es []hashEntry) {
	slices.SortFunc(es, func(a, b hashEntry) int { return cmpHash(&a.hash, &b.hash) })
	for lo := 0; lo < len(es); {
		sh := shardOf(&es[lo].hash)
		hi := lo + 1
		for hi < len(es) && shardOf(&es[hi].hash) == sh {
			hi++
		}
		p := &x.shards[sh]
		var old []hashEntry
		if cur := p.Load(); cur != nil {
			old = cur.entries
		}
		// Merge two sorted lists; a hash in both takes the new key, as put.
		merged := make([]hashEntry, 0, len(old)+hi-lo)
		i := 0
		for _, e := range es[lo:hi] {
			for i < len(old) && cmpHash(&old[i].hash, &e.hash) < 0 {
				merged = append(merged, old[i])
				i++
			}
			if i < len(old) && old[i].hash == e.hash {
				i++
			}
			if n := len(merged); n > 0 && merged[n-1].hash == e.hash {
				merged[n-1] = e
				continue
			}
			merged = append(merged, e)
		}
		merged = append(merged, old[i:]...)
		p.Store(&shard{entries: merged})
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
// Entries are grouped by shard with two 256-way radix passes, each writing
// 256 sequential streams that stay in cache (a direct 65,536-way scatter
// misses the cache on nearly every write), then sorted within each shard,
// then written out in order.
func (x *hashIndex) build(ph []pendingHash, keys []Key) {
	tmp := make([]pendingHash, len(ph))
	radixPass(tmp, ph, 1)
	radixPass(ph, tmp, 0)
	all := make([]hashEntry, len(ph))
	shards := make([]shard, shardCount)
	for lo := 0; lo < len(ph); {
		sh := shardOf(&ph[lo].hash)
		hi := lo + 1
		for hi < len(ph) && shardOf(&ph[hi].hash) == sh {
			hi++
		}
		part := ph[lo:hi]
		slices.SortFunc(part, func(a, b pendingHash) int { return cmpHash(&a.hash, &b.hash) })
		for i := range part {
			all[lo+i] = hashEntry{hash: part[i].hash, key: &keys[part[i].ord]}
		}
		shards[sh].entries = all[lo:hi:hi]
		x.shards[sh].Store(&shards[sh])
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

func search(es []hashEntry, h *[hashSize]byte) (int, bool) {
	lo, hi := 0, len(es)
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if cmpHash(&es[m].hash, h) < 0 {
			lo = m + 1
		} else {
			hi = m
		}
	}
	return lo, lo < len(es) && es[lo].hash == *h
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
