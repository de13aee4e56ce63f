// Package authz is keygate's ext_authz server: for every request Envoy asks
// about, it authenticates the API key, checks the path and the key's scope,
// applies the key's rate limit, debits the route's price, and answers with an
// allow or a JSON denial.
//
// The decision reads only memory: the key index and route table are immutable
// snapshots, rate-limit buckets are sharded and the ledger locks one account.
// A denial is an answer, not an error: Check returns a nil error for every
// request, malformed ones included.
package authz
