// Package rlease spends money and rate-limit tokens from leases taken from
// Redis, so that several keygate replicas share one balance per account,
// one cap per key and one rate limit per key while most Checks stay local.
//
// Money (Ledger): each replica holds, per key, a lease drawn at once from
// the account's balance (bal − leased − reserved) and the key's cap (cap −
// spent − leased − reserved; reserved is what redisstore's open
// reservations hold). Spend takes the price from it in memory; when it is short, one
// Lua call leases min(64 prices, available / (2 × live replicas)), at least
// what is missing, or refuses with the limit that cannot cover the price.
// Every second (and at Close) one report per replica, sequence-numbered so
// that a retry is applied once, charges what was spent (bal −= used,
// spent += used), releases it and the idle leases (leased −= ...), and
// tells the replica what Redis holds for it, so that a lease whose reply
// was lost is adopted rather than leaked. Across replicas the balance never
// goes below zero and no key spends past its cap.
//
// Contention: a lease is idle when unused for 30s, unless its account or
// key is contended, when 1s is enough. A lease call that grants less than
// it wanted, or refuses, marks what limited it contended for 2s (the
// contended ZSET: acct:{a}, key:{k}, rl:{key}, scored by expiry); each
// replica's heartbeat (once a second, the same call) returns the marks. So
// a key used every few seconds keeps its lease, far from exhaustion (no
// Redis call per Check), while a replica refused because another holds an
// idle lease of the same balance or cap sees it returned within about a
// second (a heartbeat and a report), and its retry passes.
//
// Cap periods: a key with a day or month cap has its spent in the key
// hash's period (days or months since 1970, UTC); a lease or report that
// finds an earlier period there starts spent over at 0 first. What a
// replica spent before a period ended and reports just after it (at most
// a report's second) counts in the new period, and leases held across the
// boundary count against the new period's cap: never more than the cap.
//
// Alerts: each report returns, per key charged, its spend and its
// account's balance just after the charge (and the account's alert
// level); the replica whose report Redis applied computes the crossings
// (keystore.Crossings) and hands them to LedgerOptions.Alerts. Redis
// applies a report once, so each crossing is raised once across replicas;
// a retry after a lost reply gets the applied report's values back (kept
// for an hour) and raises what the lost reply would have.
//
// Rate (Limiter): each key's token bucket is a GCRA in Redis (its
// theoretical arrival time, as in ratelimit.Limiter); a replica leases at
// most 5% of N tokens at a time. It keeps what is left while the key is
// uncontended (until the key has been unused for 30s); once any replica's
// lease of the key comes up short (marking it contended), every replica
// returns what it holds within about a second (it polls the marks once a
// second while it holds tokens, in the call that returns them). At most
// N + (replicas − 1) × lease requests pass where one bucket would pass N;
// when demand exceeds the limit, at least the limit passes.
//
// Redis keys (P is the key prefix): acct:{id} and key:{id} hold the money
// fields this package owns (bal updates, leased, spent, period) beside
// what redisstore writes (reserved and alert_below are read; key:{id}'s
// account field is read when reclaiming); lease:{replica},
// reports:{replica}, reported:{replica}, replicas, contended and rl:{key}
// are this package's.
//
// Redis down: a lease held is still spent (for 15s after Redis last heard
// from the replica: other replicas reclaim a silent replica's leases after
// 30s); beyond it, the OutagePolicy decides; rate limits fall back to a
// local bucket at N / live replicas.
package rlease
