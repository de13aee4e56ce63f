package redisstore

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// Run keeps the local mirror in step with Redis until ctx is done, then
// returns nil. Run it once per Store (a second Run at the same time fails).
//
//   - It starts with a full sync: the version, the stream's last entry
//     and the sets of account and key IDs in one MULTI, then every record,
//     pipelined, mirrored in one transaction; then it follows the change
//     stream from the entry captured by the MULTI, so nothing written
//     meanwhile is missed.
//   - It follows the stream with XREAD BLOCK 1s and mirrors the records
//     that each batch of entries names: a change reaches every replica in
//     a few milliseconds.
//   - Entries carry consecutive versions. An entry that skips one means
//     the stream was trimmed past this replica (or lost an entry): a full
//     sync follows.
//   - Every 2s it reads P version and the marker. Every change up to that
//     version is in the stream by then (one script INCRs and XADDs), so
//     if reading the stream does not bring the mirror up to it, a change
//     was lost (or Redis went back in time): a full sync follows. A lost
//     change is thus repaired within about 3s.
//   - When Redis fails, it waits, and does a full sync once Redis answers.
//
// Beside the mirror, it expires reservations every second
// (ExpireReservations), those of every replica: all replicas sweep, and
// each due reservation is committed once.
//
// Calling Run again after it returned continues from where it stopped.
func (s *Store) Run(ctx context.Context) error {
	if !s.running.CompareAndSwap(false, true) {
		return errors.New("redisstore: Run is already running")
	}
	defer s.running.Store(false)
	ectx, stopExpiry := context.WithCancel(ctx)
	var expiry sync.WaitGroup
	expiry.Go(func() { s.expireLoop(ectx) })
	defer expiry.Wait()
	defer stopExpiry()
	if !s.pos.synced && s.pos.resync == "" {
		s.pos.resync = syncStart
	}
	nextCheck := time.Now().Add(repairEvery)
	failing := false
	for ctx.Err() == nil {
		err := s.round(ctx, &nextCheck)
		if ctx.Err() != nil {
			return nil
		}
		if err == nil {
			if failing {
				s.log.Info("redis mirror resumed")
				failing = false
			}
			continue
		}
		if s.pos.resync == "" {
			s.pos.resync = syncError
		}
		if !failing {
			s.log.Warn("redis mirror cannot follow Redis; keys authenticate from the local mirror meanwhile, and a full sync follows",
				zap.Error(err))
			failing = true
		} else {
			s.log.Debug("redis mirror still failing", zap.Error(err))
		}
		sleep(ctx, retryEvery)
	}
	return nil
}

// errBreakerOpen makes Run wait while rconn's breaker is open.
var errBreakerOpen = errors.New("redis is unavailable (breaker open)")

// round does one step of Run: what is due of the marker check, a sync, the
// repair check, then one blocking read of the stream.
func (s *Store) round(ctx context.Context, nextCheck *time.Time) error {
	if !s.conn.Available() {
		return errBreakerOpen
	}
	if !s.markerChecked() {
		if err := s.checkMarker(ctx); err != nil {
			return err
		}
	}
	if s.pos.resync != "" {
		if err := s.sync(ctx, s.pos.resync); err != nil {
			return err
		}
	}
	if now := time.Now(); !now.Before(*nextCheck) {
		*nextCheck = now.Add(repairEvery)
		if err := s.repair(ctx); err != nil || s.pos.resync != "" {
			return err
		}
	}
	_, err := s.consume(ctx, blockFor)
	return err
}

// sync mirrors every account and key of Redis and sets the stream
// position to the one they were read at.
func (s *Store) sync(ctx context.Context, reason string) error {
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, 10*s.timeout)
	defer cancel()
	r := s.conn.Client().WithTimeout(10 * s.timeout)
	var (
		version      *redis.StringCmd
		last         *redis.XMessageSliceCmd
		accts, keyss *redis.StringSliceCmd
	)
	_, err := r.TxPipelined(ctx, func(p redis.Pipeliner) error {
		version = p.Get(ctx, s.versionKey())
		last = p.XRevRangeN(ctx, s.changesKey(), "+", "-", 1)
		accts = p.SMembers(ctx, s.accountsKey())
		keyss = p.SMembers(ctx, s.keysKey())
		return nil
	})
	if err != nil && !errors.Is(err, redis.Nil) {
		return fmt.Errorf("full sync: %w", err)
	}
	v, err := version.Int64()
	if errors.Is(err, redis.Nil) { // no admin write yet
		err = nil
	}
	if err = errors.Join(err, last.Err(), accts.Err(), keyss.Err()); err != nil {
		return fmt.Errorf("full sync: %w", err)
	}
	lastID := "0-0"
	if msgs := last.Val(); len(msgs) > 0 {
		lastID = msgs[0].ID
	}
	s.apply.Lock()
	err = s.pullLocked(ctx, r, accts.Val(), keyss.Val())
	s.apply.Unlock()
	if err != nil {
		return fmt.Errorf("full sync: %w", err)
	}
	s.pos = position{synced: true, lastID: lastID, applied: v}
	s.m.syncs.WithLabelValues(reason).Inc()
	s.log.Info("redis mirror synced", zap.String("reason", reason), zap.Int("accounts", len(accts.Val())),
		zap.Int("keys", len(keyss.Val())), zap.Int64("version", v), zap.Duration("took", time.Since(start)))
	return nil
}

// consume reads the stream after the last applied entry (waiting up to
// block for one; block < 0: not at all) and mirrors what the entries
// name. It returns how many entries it applied; an entry that skips a
// version asks for a full sync instead.
func (s *Store) consume(ctx context.Context, block time.Duration) (int, error) {
	r := s.conn.Client()
	if block < 0 {
		r = r.WithTimeout(s.timeout)
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, s.timeout)
		defer cancel()
	}
	streams, err := r.XRead(ctx, &redis.XReadArgs{
		Streams: []string{s.changesKey(), s.pos.lastID}, Count: chunk, Block: block,
	}).Result()
	if errors.Is(err, redis.Nil) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("read the change stream: %w", err)
	}
	var msgs []redis.XMessage
	for _, st := range streams {
		msgs = append(msgs, st.Messages...)
	}
	if len(msgs) == 0 {
		return 0, nil
	}
	applied := s.pos.applied
	var acctIDs, keyIDs []string
	seen := make(map[string]bool, len(msgs))
	for _, m := range msgs {
		c, err := parseChange(m.Values)
		if err != nil {
			s.log.Error("unreadable entry in the change stream; syncing in full", zap.String("entry", m.ID), zap.Error(err))
			s.pos.resync = syncError
			return 0, nil
		}
		if c.version != applied+1 {
			s.log.Info("the change stream skipped versions (trimmed past this replica?); syncing in full",
				zap.Int64("applied", applied), zap.Int64("next", c.version))
			s.pos.resync = syncGap
			return 0, nil
		}
		applied = c.version
		if seen[c.kind+c.id] {
			continue
		}
		seen[c.kind+c.id] = true
		if c.kind == kindAccount {
			acctIDs = append(acctIDs, c.id)
		} else {
			keyIDs = append(keyIDs, c.id)
		}
	}
	pctx, cancel := context.WithTimeout(ctx, 10*s.timeout)
	defer cancel()
	if err := s.pull(pctx, s.conn.Client().WithTimeout(10*s.timeout), acctIDs, keyIDs); err != nil {
		return 0, fmt.Errorf("apply changes: %w", err)
	}
	s.pos.applied, s.pos.lastID = applied, msgs[len(msgs)-1].ID
	s.m.changes.Add(float64(len(msgs)))
	return len(msgs), nil
}

// repair checks the marker, and that the stream brings the mirror up to P
// version; if not, it asks for a full sync.
func (s *Store) repair(ctx context.Context) error {
	if err := s.checkMarker(ctx); err != nil {
		return err
	}
	cctx, cancel := context.WithTimeout(ctx, s.timeout)
	v, err := s.conn.Client().WithTimeout(s.timeout).Get(cctx, s.versionKey()).Int64()
	cancel()
	if err != nil && !errors.Is(err, redis.Nil) {
		return fmt.Errorf("read the version: %w", err)
	}
	if v < s.pos.applied {
		s.log.Warn("redis's version went back (a failover, or a restore?); syncing in full",
			zap.Int64("applied", s.pos.applied), zap.Int64("redis_version", v))
		s.pos.resync = syncVersion
		return nil
	}
	for s.pos.applied < v && s.pos.resync == "" {
		n, err := s.consume(ctx, -1)
		if err != nil {
			return err
		}
		if n == 0 {
			break
		}
	}
	if s.pos.applied < v && s.pos.resync == "" {
		s.log.Warn("a change is missing from the change stream; syncing in full",
			zap.Int64("applied", s.pos.applied), zap.Int64("redis_version", v))
		s.pos.resync = syncVersion
	}
	return nil
}

// Kinds of change.
const (
	kindAccount = "acct"
	kindKey     = "key"
)

// change is one entry of the change stream.
type change struct {
	kind, id string
	version  int64
}

// parseChange reads an entry's fields: kind, id and v.
func parseChange(vals map[string]any) (change, error) {
	kind, _ := vals["kind"].(string)
	id, _ := vals["id"].(string)
	v, _ := vals["v"].(string)
	n, err := strconv.ParseInt(v, 10, 64)
	switch {
	case kind != kindAccount && kind != kindKey:
		return change{}, fmt.Errorf("kind %q", kind)
	case id == "":
		return change{}, errors.New("no id")
	case err != nil || n <= 0:
		return change{}, fmt.Errorf("version %q", v)
	}
	return change{kind: kind, id: id, version: n}, nil
}

// sleep waits d or until ctx is done.
func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}
