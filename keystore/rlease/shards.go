package rlease

import (
	"hash/maphash"
	"sync"
)

// numShards splits per-key state so that concurrent Checks on different
// keys rarely share a lock. A power of two, so a hash picks a shard with a
// mask.
const numShards = 64

// shards is a map from key ID to per-key state, split into shards each with
// its own lock. Readers take a shard's read lock only long enough to find
// the state; the state has its own mutex.
type shards[V any] struct {
	seed maphash.Seed
	s    [numShards]shard[V]
}

// shard is one lock and the map it guards, padded to 128 bytes (a
// sync.RWMutex and a map header are 32) so that two shards' locks never
// share a cache line pair.
type shard[V any] struct {
	mu sync.RWMutex
	m  map[string]*V // guarded by mu
	_  [96]byte
}

func newShards[V any]() *shards[V] {
	t := &shards[V]{seed: maphash.MakeSeed()}
	for i := range t.s {
		t.s[i].m = make(map[string]*V)
	}
	return t
}

func (t *shards[V]) shard(key string) *shard[V] {
	return &t.s[maphash.String(t.seed, key)&(numShards-1)]
}

// get returns the state of key, or nil.
func (t *shards[V]) get(key string) *V {
	sh := t.shard(key)
	sh.mu.RLock()
	v := sh.m[key]
	sh.mu.RUnlock()
	return v
}

// add stores v for key unless key has a state already, and returns the
// state that is stored.
func (t *shards[V]) add(key string, v *V) *V {
	sh := t.shard(key)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if old := sh.m[key]; old != nil {
		return old
	}
	sh.m[key] = v
	return v
}

// all returns every state, copied out shard by shard so that no shard lock
// is held while the caller locks the states themselves.
func (t *shards[V]) all() []*V {
	var out []*V
	for i := range t.s {
		sh := &t.s[i]
		sh.mu.RLock()
		for _, v := range sh.m {
			out = append(out, v)
		}
		sh.mu.RUnlock()
	}
	return out
}

// removeIf deletes key's state if it is still v and drop(v) holds; drop
// runs under the shard's write lock, so no one can find v meanwhile.
func (t *shards[V]) removeIf(key string, v *V, drop func(*V) bool) bool {
	sh := t.shard(key)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if sh.m[key] != v || !drop(v) {
		return false
	}
	delete(sh.m, key)
	return true
}
