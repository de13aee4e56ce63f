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

// seed creates path and fills it through the store's Go API, as an operator's
// tooling would: one transaction per account and per key.
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
	ids := make([]string, sp.Accounts)
	for i := range ids {
		if err := ctx.Err(); err != nil { // a large store takes a while: stay interruptible
			return out, err
		}
		ids[i] = fmt.Sprintf(sp.AccountName, i)
		if _, err := st.CreateAccount(ids[i], "free", sp.Balance, now); err != nil {
			return out, err
		}
	}
	key := func(account string, r ratelimit.Rate) (string, error) {
		_, secret, err := st.CreateKey(keystore.NewKey{Account: account, Name: "bench", Scopes: benchScopes, RateLimit: r}, now)
		return secret, err
	}
	fast := ratelimit.Rate{N: 1_000_000, Per: time.Second}
	// Keys are created account-major, then listed key-major, so that round-
	// robin over the list visits every account before an account's next key.
	perAccount := make([][]string, sp.Accounts)
	for i, id := range ids {
		if err := ctx.Err(); err != nil {
			return out, err
		}
		for range sp.KeysPer {
			s, err := key(id, fast)
			if err != nil {
				return out, err
			}
			perAccount[i] = append(perAccount[i], s)
		}
	}
	for k := range sp.KeysPer {
		for i := range ids {
			out.Keys = append(out.Keys, perAccount[i][k])
		}
	}
	for i := range sp.Limited {
		s, err := key(ids[i%len(ids)], ratelimit.Rate{N: 1, Per: 24 * time.Hour})
		if err != nil {
			return out, err
		}
		out.Limited = append(out.Limited, s)
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
