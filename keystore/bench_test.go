package keystore

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/keygate/keygate/authz/ratelimit"
	"github.com/keygate/keygate/keystore/money"
)

var benchNow = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

// A fixture is a store file written straight into bbolt: through the admin
// path, each key is an fsync'd transaction and a million would take hours.
// Fixtures are built once per test binary and removed by TestMain.
type fixture struct {
	path    string
	secrets []string
	keyIDs  []string
}

var fixtures = struct {
	sync.Mutex
	dir string
	m   map[string]*fixture
}{m: map[string]*fixture{}}

func TestMain(m *testing.M) {
	code := m.Run()
	if fixtures.dir != "" {
		os.RemoveAll(fixtures.dir)
	}
	os.Exit(code)
}

// getFixture returns a store file with nAccounts accounts and nKeys keys
// spread over them round-robin; a tenth of the keys have spend.
func getFixture(tb testing.TB, nAccounts, nKeys int) *fixture {
	tb.Helper()
	fixtures.Lock()
	defer fixtures.Unlock()
	name := fmt.Sprintf("a%d-k%d", nAccounts, nKeys)
	if f := fixtures.m[name]; f != nil {
		return f
	}
	if fixtures.dir == "" {
		dir, err := os.MkdirTemp("", "keystore-bench-")
		if err != nil {
			tb.Fatal(err)
		}
		fixtures.dir = dir
	}
	f := &fixture{path: filepath.Join(fixtures.dir, name+".db")}
	s, err := Open(f.path, Options{})
	if err != nil {
		tb.Fatal(err)
	}
	s.Close()
	db, err := bolt.Open(f.path, 0o600, &bolt.Options{NoSync: true, NoFreelistSync: false})
	if err != nil {
		tb.Fatal(err)
	}
	defer db.Close()
	err = db.Update(func(tx *bolt.Tx) error {
		w := newBlockWriter(tx)
		for i := range nAccounts {
			id := accountName(i)
			rec := accountRecord{Tier: "tier1", CreatedAt: benchNow.UnixNano()}
			if err := tx.Bucket(bucketAccounts).Put([]byte(id), rec.appendTo(nil)); err != nil {
				return err
			}
			if err := tx.Bucket(bucketAccountSlots).Put([]byte(id), slotRecord(uint32(i))); err != nil {
				return err
			}
			if err := w.set(blockAccounts, uint32(i), money.Max, 0); err != nil {
				return err
			}
		}
		return w.flush()
	})
	if err != nil {
		tb.Fatal(err)
	}
	scopeSets := [][]string{{"chat:write"}, {"chat:write", "chat:read"}, {"embeddings:write"}, {"chat:write", "chat:read", "embeddings:write", "images:write"}}
	type kv struct {
		id  string
		rec []byte
	}
	all := make([]kv, 0, nKeys)
	f.secrets = make([]string, nKeys)
	for i := range nKeys {
		id, err := newKeyID()
		if err != nil {
			tb.Fatal(err)
		}
		secret, hash, err := newSecret()
		if err != nil {
			tb.Fatal(err)
		}
		f.secrets[i] = secret
		rec := keyRecord{
			Hash: hash, Account: accountName(i % nAccounts), Name: "svc-" + strconv.Itoa(i),
			Scopes: scopeSets[i%len(scopeSets)], CreatedAt: benchNow.UnixNano(),
		}
		if i%3 == 0 {
			rec.RateLimit = ratelimit.Rate{N: 500, Per: time.Minute}
			rec.SpendCap = 100 * money.PerUSD
		}
		all = append(all, kv{id, rec.appendTo(nil)})
	}
	slices.SortFunc(all, func(a, b kv) int { return strings.Compare(a.id, b.id) })
	f.keyIDs = make([]string, len(all))
	for i := range all {
		f.keyIDs[i] = all[i].id
	}
	// Millions of small live strings would make every GC in the benchmarks
	// slower than in a real process: pack them into one allocation each.
	f.secrets, f.keyIDs = pack(f.secrets), pack(f.keyIDs)
	const batch = 100_000
	for start := 0; start < len(all); start += batch {
		err := db.Update(func(tx *bolt.Tx) error {
			keys, slots := tx.Bucket(bucketKeys), tx.Bucket(bucketKeySlots)
			keys.FillPercent, slots.FillPercent = 1, 1 // sequential inserts
			w := newBlockWriter(tx)
			for i, e := range all[start:min(start+batch, len(all))] {
				slot := uint32(start + i)
				if err := keys.Put([]byte(e.id), e.rec); err != nil {
					return err
				}
				if err := slots.Put([]byte(e.id), slotRecord(slot)); err != nil {
					return err
				}
				if slot%10 == 0 {
					if err := w.set(blockKeys, slot, money.Micros(i), 0); err != nil {
						return err
					}
				}
			}
			return w.flush()
		})
		if err != nil {
			tb.Fatal(err)
		}
	}
	if err := db.Sync(); err != nil {
		tb.Fatal(err)
	}
	fixtures.m[name] = f
	return f
}

// pack returns ss with every string cut from one shared string.
func pack(ss []string) []string {
	var sb strings.Builder
	for _, s := range ss {
		sb.WriteString(s)
	}
	all, out, off := sb.String(), make([]string, len(ss)), 0
	for i, s := range ss {
		out[i] = all[off : off+len(s)]
		off += len(s)
	}
	return out
}

func accountName(i int) string { return fmt.Sprintf("acct-%07d", i) }

func openFixture(tb testing.TB, f *fixture) *Store {
	tb.Helper()
	s, err := Open(f.path, Options{})
	if err != nil {
		tb.Fatal(err)
	}
	return s
}

func BenchmarkLookup(b *testing.B) {
	// The third case looks up 10,000 of a million keys (every hundredth), as
	// a store of many keys serves the fraction of them in use. Where the
	// caches are large enough for the lines those keys touch (the slot, the
	// tail and the Key: about 3 MB), it costs what the first does; on a VM
	// whose neighbours share its L3 it costs what the second does, since
	// each Lookup then waits on main memory (see BenchmarkIndexGet's map).
	for _, c := range []struct{ keys, active int }{{10_000, 10_000}, {1_000_000, 1_000_000}, {1_000_000, 10_000}} {
		f := getFixture(b, max(c.keys/100, 1), c.keys)
		s := openFixture(b, f)
		secrets := f.secrets
		name := "keys=" + count(c.keys)
		if c.active < c.keys {
			secrets = make([]string, 0, c.active)
			for i := 0; i < len(f.secrets); i += c.keys / c.active {
				secrets = append(secrets, f.secrets[i])
			}
			secrets = pack(secrets) // as close together as the 10k store's
			name += "/active=" + count(c.active)
		}
		b.Run(name, func(b *testing.B) {
			var next atomic.Int64
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				i := int(next.Add(7919)) % len(secrets) // each goroutine walks the keys from elsewhere
				for pb.Next() {
					i++
					if i >= len(secrets) {
						i = 0
					}
					if _, ok := s.Lookup(secrets[i], benchNow); !ok {
						b.Error("Lookup failed")
						return
					}
				}
			})
		})
		// One Lookup at a time, each waiting on the key the one before
		// returned, as a request's does on everything before it: this is
		// the latency a Check sees, cache misses included, where the
		// parallel figure above lets the processor overlap one Lookup's
		// misses with the next one's hashing. CPU time is reported too:
		// on a shared machine it moves less than wall time.
		b.Run(name+"/serial", func(b *testing.B) {
			b.ReportAllocs()
			i, c0 := 0, cpuTime()
			for b.Loop() {
				k, ok := s.Lookup(secrets[i], benchNow)
				if !ok {
					b.Fatal("Lookup failed")
				}
				i += 1 + len(k.ID)>>10 // 1, but only once k is known
				if i >= len(secrets) {
					i = 0
				}
			}
			b.ReportMetric(float64(cpuTime()-c0)/float64(b.N), "cpu-ns/op")
		})
		s.Close()
	}
	s := openFixture(b, getFixture(b, 100, 10_000))
	defer s.Close()
	bad := "kg_0123456789abcdefghijABCDEFGHIJ01000000" // valid shape, wrong checksum
	b.Run("malformed", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, ok := s.Lookup(bad, benchNow); ok {
					b.Error("accepted")
				}
			}
		})
	})
}

func BenchmarkDebit(b *testing.B) {
	f := getFixture(b, 10_000, 10_000)
	s := openFixture(b, f)
	defer s.Close()
	keys := make([]*Key, len(f.secrets))
	for i, secret := range f.secrets {
		keys[i], _ = s.Lookup(secret, benchNow)
	}
	b.Run("many-accounts", func(b *testing.B) {
		var next atomic.Int64
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			i := int(next.Add(1)) * 1000
			for pb.Next() {
				i++
				if i >= len(keys) {
					i = 0
				}
				if err := s.Debit(keys[i], 1); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
	b.Run("one-hot-account", func(b *testing.B) {
		var k *Key
		for _, c := range keys { // an uncapped key: Max balance covers any b.N
			if c.SpendCap == 0 {
				k = c
				break
			}
		}
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if err := s.Debit(k, 1); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
	// For comparison: an uncontended Debit.
	b.Run("serial", func(b *testing.B) {
		k := keys[1]
		b.ReportAllocs()
		for b.Loop() {
			s.Debit(k, 1)
		}
	})
}

// BenchmarkOpen measures Open of a million keys: reading every record and
// building both indexes. Each Open starts on a collected heap, as at a
// process start.
func BenchmarkOpen(b *testing.B) {
	f := getFixture(b, 10_000, 1_000_000)
	b.Run("keys=1M", func(b *testing.B) {
		b.ReportAllocs()
		var cpu time.Duration
		for b.Loop() {
			b.StopTimer()
			runtime.GC()
			c0 := cpuTime()
			b.StartTimer()
			s := openFixture(b, f)
			b.StopTimer()
			cpu += cpuTime() - c0
			s.Close()
			b.StartTimer()
		}
		// CPU time (both cores, GC included) says more than wall time on a
		// shared machine.
		b.ReportMetric(cpu.Seconds()/float64(b.N), "cpu-s/op")
	})
}

// BenchmarkMemory reports what a million keys cost in memory: heap bytes
// per key, and anonymous resident memory per key (the bbolt file's mapping
// is file-backed, reclaimable page cache, reported apart as mmap-B/key).
func BenchmarkMemory(b *testing.B) {
	f := getFixture(b, 10_000, 1_000_000)
	n := float64(len(f.secrets))
	b.Run("keys=1M", func(b *testing.B) {
		for b.Loop() {
			heap0, anon0, file0 := memNow()
			s := openFixture(b, f)
			heap1, anon1, file1 := memNow()
			b.ReportMetric(float64(heap1-heap0)/n, "heap-B/key")
			b.ReportMetric(float64(anon1-anon0)/n, "rss-B/key")
			b.ReportMetric(float64(file1-file0)/n, "mmap-B/key")
			// A long-running store's admin writes land in every shard,
			// each copying its shard out of Open's slab: 3,000 of them
			// (as many rotations, without their fsyncs) reach nearly
			// every shard, and the slab's evacuation bounds what that
			// leaves behind.
			r := rand.New(rand.NewPCG(1, 2))
			for range 3000 {
				secret := f.secrets[r.IntN(len(f.secrets))]
				k, _ := s.Lookup(secret, benchNow)
				s.lock()
				// Revoked at the end of a rotation's grace: still found.
				s.republishLocked(k.entry, hashSecret(secret), benchNow.Add(time.Hour).UnixNano(), "")
				s.wmu.Unlock()
			}
			_, anon2, _ := memNow()
			b.ReportMetric(float64(anon2-anon0)/n, "rss-after-writes-B/key")
			runtime.KeepAlive(s)
			s.Close()
		}
	})
}

func memNow() (heap, anon, file int64) {
	runtime.GC()
	debug.FreeOSMemory()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	anon, file = rss()
	return int64(m.HeapAlloc), anon, file
}

// cpuTime returns the process's user and system CPU time so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// rss returns the process's anonymous and file-backed resident memory.
func rss() (anon, file int64) {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0, 0
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		k, v, _ := strings.Cut(sc.Text(), ":")
		kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		switch k {
		case "RssAnon":
			anon = kb << 10
		case "RssFile":
			file = kb << 10
		}
	}
	return anon, file
}

// BenchmarkFlush writes 100,000 dirty balances and spends in one flush, at
// full speed (as Flush and Close do). cpu-ms is the process's CPU time,
// garbage collection included.
func BenchmarkFlush(b *testing.B) {
	f := getFixture(b, 100_000, 100_000)
	s := openFixture(b, f)
	defer s.Close()
	keys := make([]*Key, len(f.secrets))
	for i, secret := range f.secrets {
		keys[i], _ = s.Lookup(secret, benchNow)
	}
	b.Run("dirty=100k", func(b *testing.B) {
		b.ReportAllocs()
		var cpu time.Duration
		for b.Loop() {
			b.StopTimer()
			for _, k := range keys {
				s.Debit(k, 1)
			}
			c0 := cpuTime()
			b.StartTimer()
			if err := s.Flush(); err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			cpu += cpuTime() - c0
			b.StartTimer()
		}
		b.ReportMetric(float64(cpu.Milliseconds())/float64(b.N), "cpu-ms/op")
	})
}

// BenchmarkRevoke is an admin write against a million keys: copy-on-write
// touches one shard. The fsync dominates.
func BenchmarkRevoke(b *testing.B) {
	f := getFixture(b, 10_000, 1_000_000)
	s := openFixture(b, f)
	defer s.Close()
	i := 0
	b.ReportAllocs()
	for b.Loop() {
		if _, err := s.Revoke(f.keyIDs[i], benchNow); err != nil {
			b.Fatal(err)
		}
		i++
	}
}

func count(n int) string {
	switch {
	case n >= 1_000_000 && n%1_000_000 == 0:
		return strconv.Itoa(n/1_000_000) + "M"
	case n >= 1000 && n%1000 == 0:
		return strconv.Itoa(n/1000) + "k"
	}
	return strconv.Itoa(n)
}

// BenchmarkFlushImpact measures what a ledger flush of 100,000 dirty
// accounts (and their 100,000 keys) does to the Checks that share its CPU,
// under the load benchmark's conditions: one core (GOMAXPROCS=1), Checks
// arriving over TCP (loopback, so that they wait on the network poller like
// gRPC's), each a Lookup and a Debit, from a closed loop of clients. Each
// iteration dirties every account, then measures the Checks' latency while
// the flush runs: at full speed (Flush, as Close does), and paced as Run
// paces it at a flush interval of 1s and of 10s. "none" is the baseline:
// the same Checks for 500ms, with no flush.
func BenchmarkFlushImpact(b *testing.B) {
	f := getFixture(b, 100_000, 100_000)
	s := openFixture(b, f)
	defer s.Close()
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	keys := make([]*Key, len(f.secrets))
	for i, secret := range f.secrets {
		keys[i], _ = s.Lookup(secret, benchNow)
	}
	srv := newCheckServer(b, s, f.secrets)
	defer srv.close()
	const clients = 8
	for _, mode := range []string{"none", "full", "paced-1s", "paced-10s", "paced-14s"} {
		b.Run("flush="+mode, func(b *testing.B) {
			var lat []time.Duration
			var took, cpu time.Duration
			var gcs, allocMB float64
			for b.Loop() {
				for _, k := range keys {
					if err := s.Debit(k, 1); err != nil {
						b.Fatal(err)
					}
				}
				stop := srv.load(clients)
				time.Sleep(20 * time.Millisecond) // the clients are running
				var ms runtime.MemStats
				runtime.ReadMemStats(&ms)
				gc0, alloc0 := ms.NumGC, ms.TotalAlloc
				start, c0 := time.Now(), cpuTime()
				var err error
				switch mode {
				case "none":
					time.Sleep(500 * time.Millisecond)
				case "full":
					err = s.Flush()
				case "paced-1s", "paced-10s", "paced-14s":
					iv := map[string]time.Duration{"paced-1s": time.Second, "paced-10s": 10 * time.Second, "paced-14s": 14 * time.Second}[mode]
					err = s.flush(&pacer{deadline: start.Add(iv / 2), hurry: func() bool { return false }})
				}
				took, cpu = took+time.Since(start), cpu+cpuTime()-c0
				runtime.ReadMemStats(&ms)
				gcs += float64(ms.NumGC - gc0)
				allocMB += float64(ms.TotalAlloc-alloc0) / (1 << 20)
				lat = append(lat, stop(start, time.Now())...)
				if err != nil {
					b.Fatal(err)
				}
			}
			if mode == "none" {
				if err := s.Flush(); err != nil {
					b.Fatal(err)
				}
			}
			slices.Sort(lat)
			q := func(p float64) float64 {
				if len(lat) == 0 {
					return 0
				}
				return float64(lat[min(int(p*float64(len(lat))), len(lat)-1)].Microseconds())
			}
			b.ReportMetric(q(0.5), "p50-µs")
			b.ReportMetric(q(0.99), "p99-µs")
			b.ReportMetric(q(0.999), "p99.9-µs")
			b.ReportMetric(q(1), "max-µs")
			b.ReportMetric(float64(len(lat))/took.Seconds(), "checks/s")
			b.ReportMetric(float64(took.Milliseconds())/float64(b.N), "window-ms")
			b.ReportMetric(float64(cpu.Milliseconds())/float64(b.N), "cpu-ms")
			b.ReportMetric(gcs/float64(b.N), "gcs")
			b.ReportMetric(allocMB/float64(b.N), "alloc-MB")
		})
	}
}

// checkServer answers "Checks" over loopback TCP: a request is the 4-byte
// index of a secret; the answer is one byte, after a Lookup and a Debit.
type checkServer struct {
	tb      testing.TB
	ln      net.Listener
	s       *Store
	secrets []string
}

func newCheckServer(tb testing.TB, s *Store, secrets []string) *checkServer {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	c := &checkServer{tb: tb, ln: ln, s: s, secrets: secrets}
	go c.serve()
	return c
}

func (c *checkServer) close() { c.ln.Close() }

func (c *checkServer) serve() {
	for {
		conn, err := c.ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer conn.Close()
			var req [4]byte
			for {
				if _, err := io.ReadFull(conn, req[:]); err != nil {
					return
				}
				reply := [1]byte{1}
				k, ok := c.s.Lookup(c.secrets[binary.BigEndian.Uint32(req[:])], benchNow)
				if !ok || c.s.Debit(k, 1) != nil {
					reply[0] = 0
				}
				if _, err := conn.Write(reply[:]); err != nil {
					return
				}
			}
		}()
	}
}

// load starts n clients in a closed loop; stop ends them and returns the
// latencies of the Checks sent between from and to.
func (c *checkServer) load(n int) (stop func(from, to time.Time) []time.Duration) {
	type sample struct {
		at  time.Time
		lat time.Duration
	}
	var (
		done    atomic.Bool
		wg      sync.WaitGroup
		results = make([][]sample, n)
	)
	for i := range n {
		conn, err := net.Dial("tcp", c.ln.Addr().String())
		if err != nil {
			c.tb.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer conn.Close()
			out := make([]sample, 0, 1<<16)
			var req [4]byte
			var reply [1]byte
			for j := uint32(i) * 7919; !done.Load(); j++ {
				binary.BigEndian.PutUint32(req[:], j%uint32(len(c.secrets)))
				t := time.Now()
				if _, err := conn.Write(req[:]); err != nil {
					c.tb.Error(err)
					return
				}
				if _, err := io.ReadFull(conn, reply[:]); err != nil {
					c.tb.Error(err)
					return
				}
				if reply[0] != 1 {
					c.tb.Error("Check refused")
					return
				}
				out = append(out, sample{t, time.Since(t)})
			}
			results[i] = out
		}()
	}
	return func(from, to time.Time) []time.Duration {
		done.Store(true)
		wg.Wait()
		var lat []time.Duration
		for _, r := range results {
			for _, sm := range r {
				if !sm.at.Before(from) && sm.at.Before(to) {
					lat = append(lat, sm.lat)
				}
			}
		}
		return lat
	}
}

// BenchmarkImport seeds an empty store with Import, as the load benchmark
// does: one transaction for every account and key.
func BenchmarkImport(b *testing.B) {
	scopes := []string{"chat:write", "chat:read", "embeddings:write"}
	for _, c := range []struct{ accounts, keys int }{{1_000, 10_000}, {100_000, 0}, {100_000, 100_000}} {
		accounts := make([]ImportAccount, c.accounts)
		for i := range accounts {
			accounts[i] = ImportAccount{ID: fmt.Sprintf("acct-%07d", i), Tier: "free", Balance: money.PerUSD}
		}
		keys := make([]NewKey, c.keys)
		for i := range keys {
			keys[i] = NewKey{Account: accounts[i%len(accounts)].ID, Name: "bench", Scopes: scopes,
				RateLimit: ratelimit.Rate{N: 1_000_000, Per: time.Second}}
		}
		b.Run(fmt.Sprintf("accounts=%s,keys=%s", count(c.accounts), count(c.keys)), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				b.StopTimer()
				s, err := Open(filepath.Join(b.TempDir(), "keygate.db"), Options{})
				if err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				if _, err := s.Import(accounts, keys, benchNow); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				s.Close()
				b.StartTimer()
			}
		})
	}
}
