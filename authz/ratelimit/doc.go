// Package ratelimit enforces each API key's request rate with a token bucket:
// a limit of N/m allows a burst of N and N per minute sustained. Buckets live
// in memory, sharded by key so that no Check waits on a global lock.
package ratelimit
