package main

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/keygate/keygate/authz/ratelimit"
	"github.com/keygate/keygate/keystore"
	"github.com/keygate/keygate/keystore/money"
)

// seedSpec says what a store is seeded with.
type seedSpec struct {
	Accounts    int
	KeysPer     int // keys per account, rate limit high enough never to trip
	Limited     int // extra keys with a rate limit of 1/d, spread over the accounts
	Balance     money.Micros
	AccountName string // fmt pattern of account ids, with one %d
}

// seeded is what the generator needs from a seeded store.
type seeded struct {
	Keys, Limited []string // secrets
	Took          time.Duration
}

// benchScopes are the scopes of every seeded key: those of the benchmark's
// routes (config.yaml below).
var benchScopes = []string{"chat:write", "chat:read", "embeddings:write"}

// benchConfig is keygate's config for the run: the design's routes, with
// prices, and limits that never trip for the keys that are not meant to.
const benchConfig = `tiers:
  free: {rate_limit: 1000000/s}
default_tier: free
routes:
  - {method: POST, path: /v1/chat/completions, scope: chat:write, price_usd: "0.000001"}
  - {method: GET,  path_prefix: /v1/chat/completions/, scope: chat:read}
  - {method: POST, path: /v1/embeddings, scope: embeddings:write, price_usd: "0.000001"}
  - {method: POST, path: /v1/images/generations, scope: images:write, price_usd: "0.000040"}
`

// seed creates path and fills it through the store's Go API in one batch
// (Store.Import), as an operator's migration tooling would.
func seed(ctx context.Context, path string, sp seedSpec) (seeded, error) {
	start := time.Now()
	st, err := keystore.Open(path, keystore.Options{})
	if err != nil {
		return seeded{}, err
	}
	out, err := fill(ctx, st, sp, start)
	if cerr := st.Close(); err == nil && cerr != nil {
		err = cerr
	}
	out.Took = time.Since(start)
	return out, err
}

func fill(ctx context.Context, st *keystore.Store, sp seedSpec, now time.Time) (seeded, error) {
	var out seeded
	if err := ctx.Err(); err != nil {
		return out, err
	}
	ids := make([]string, sp.Accounts)
	accounts := make([]keystore.ImportAccount, sp.Accounts)
	for i := range ids {
		ids[i] = fmt.Sprintf(sp.AccountName, i)
		accounts[i] = keystore.ImportAccount{ID: ids[i], Tier: "free", Balance: sp.Balance}
	}
	fast := ratelimit.Rate{N: 1_000_000, Per: time.Second}
	// Keys are listed key-major, so that round-robin over the list visits
	// every account before an account's next key.
	keys := make([]keystore.NewKey, 0, sp.KeysPer*sp.Accounts+sp.Limited)
	for range sp.KeysPer {
		for _, id := range ids {
			keys = append(keys, keystore.NewKey{Account: id, Name: "bench", Scopes: benchScopes, RateLimit: fast})
		}
	}
	for i := range sp.Limited {
		keys = append(keys, keystore.NewKey{Account: ids[i%len(ids)], Name: "bench-limited", Scopes: benchScopes,
			RateLimit: ratelimit.Rate{N: 1, Per: 24 * time.Hour}})
	}
	imported, err := st.Import(accounts, keys, now)
	if err != nil {
		return out, err
	}
	n := sp.KeysPer * sp.Accounts
	for i, k := range imported {
		if i < n {
			out.Keys = append(out.Keys, k.Secret)
		} else {
			out.Limited = append(out.Limited, k.Secret)
		}
	}
	return out, nil
}

func writeLines(path string, lines []string) error {
	return os.WriteFile(path, []byte(strings.Join(lines, "\n")+"\n"), 0o600)
}

func readLines(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if l := strings.TrimSpace(sc.Text()); l != "" {
			out = append(out, l)
		}
	}
	return out, sc.Err()
}
