package rconn

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"

	"github.com/redis/go-redis/v9"
)

// CheckPersistence returns warnings, for the log at start, about Redis
// settings that can lose balances: AOF off (a restart loses what the last
// snapshot did not hold) and a maxmemory-policy other than noeviction
// (Redis may evict accounts and keys under memory pressure). It reads them
// with CONFIG GET, bounded by one second and not through the breaker; when
// CONFIG cannot be run (a managed Redis disables it, or Redis is down) it
// returns one warning saying that the settings could not be checked.
func (c *Conn) CheckPersistence(ctx context.Context) []string {
	ctx, cancel := context.WithTimeout(ctx, persistenceTimeout)
	defer cancel()
	r := c.client.WithTimeout(persistenceTimeout)
	var aof, policy *redis.MapStringStringCmd
	_, err := r.Pipelined(ctx, func(p redis.Pipeliner) error {
		aof = p.ConfigGet(ctx, "appendonly")
		policy = p.ConfigGet(ctx, "maxmemory-policy")
		return nil
	})
	if err != nil {
		return []string{fmt.Sprintf("could not check that Redis keeps balances (CONFIG GET: %v): "+
			"make sure Redis has appendonly yes and maxmemory-policy noeviction", err)}
	}
	var warnings []string
	switch v, ok := aof.Val()["appendonly"]; {
	case !ok:
		warnings = append(warnings, "could not read Redis's appendonly setting: make sure it is yes, or a Redis restart loses balances")
	case v != "yes":
		warnings = append(warnings, fmt.Sprintf("Redis has appendonly %s: a Redis restart loses balances; set appendonly yes", v))
	}
	switch v, ok := policy.Val()["maxmemory-policy"]; {
	case !ok:
		warnings = append(warnings, "could not read Redis's maxmemory-policy: make sure it is noeviction, or Redis may evict balances")
	case v != "noeviction":
		warnings = append(warnings, fmt.Sprintf("maxmemory-policy is %s: Redis may evict balances; set noeviction", v))
	}
	return warnings
}

// The data-loss marker: keygate writes a random epoch when it first
// initialises a Redis. A replica remembers the epoch it saw; a Redis that
// later has no marker, or another epoch, has lost its data (restarted
// without persistence, failed over to an empty replica, flushed).
const markerKey = "marker"

// initMarkerScript sets the marker unless it exists and returns the epoch
// Redis holds and whether this call created it, in one atomic step.
const initMarkerScript = `
local v = redis.call('GET', KEYS[1])
if v then return {v, 0} end
redis.call('SET', KEYS[1], ARGV[1])
return {ARGV[1], 1}
`

// Marker returns the epoch of the data-loss marker, or "" when Redis has
// none (a new Redis, or one that lost its data). It goes through Call (op
// "marker"): ErrUnavailable while the breaker is open.
func (c *Conn) Marker(ctx context.Context) (epoch string, err error) {
	err = c.Call(ctx, "marker", func(ctx context.Context, r *redis.Client) error {
		var err error
		epoch, err = r.Get(ctx, c.Key(markerKey)).Result()
		return err
	})
	if errors.Is(err, redis.Nil) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("read redis marker: %w", err)
	}
	return epoch, nil
}

// InitMarker writes the data-loss marker with a new random epoch unless
// Redis has one, and returns the epoch Redis holds and whether this call
// created it. Whether a created marker is a first start or a data loss is
// for the caller to decide, from the epoch it remembers. It goes through
// Call (op "marker").
func (c *Conn) InitMarker(ctx context.Context) (epoch string, created bool, err error) {
	fresh := rand.Text()
	var res []any
	err = c.Call(ctx, "marker", func(ctx context.Context, r *redis.Client) error {
		var err error
		res, err = c.initMarker.Run(ctx, r, []string{c.Key(markerKey)}, fresh).Slice()
		return err
	})
	if err != nil {
		return "", false, fmt.Errorf("initialise redis marker: %w", err)
	}
	if len(res) != 2 {
		return "", false, fmt.Errorf("initialise redis marker: unexpected reply %v", res)
	}
	epoch, ok1 := res[0].(string)
	n, ok2 := res[1].(int64)
	if !ok1 || !ok2 {
		return "", false, fmt.Errorf("initialise redis marker: unexpected reply %v", res)
	}
	return epoch, n == 1, nil
}
