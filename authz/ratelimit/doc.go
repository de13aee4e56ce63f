// Package ratelimit enforces each API key's request rate with a token bucket:
// a limit of N/m allows a burst of N and N per minute sustained. A Bucket is
// one key's, kept by the caller beside the key (keystore keeps one in each
// key's entry), and taken from with a compare-and-swap: no map and no lock.
// A Limiter keeps buckets by key name, sharded so that no Check waits on a
// global lock, for callers that hold no per-key state of their own.
package ratelimit
