// Package keystore holds keygate's accounts, API keys and balances in one
// bbolt file, with an in-memory index for the hot path and a write-behind
// ledger for debits.
//
// What is durable when:
//
//   - Admin writes (CreateAccount, Credit, CreateKey, Revoke, Rotate, and
//     Import for many accounts and keys at once) are one fsync'd bbolt
//     transaction each: durable when the call returns. Memory changes only
//     after the commit, so a revoked key is refused from the next Lookup on,
//     and memory never shows what the disk does not have.
//   - Debits (Debit) change memory only: the account balance and the key
//     spend, under the account's mutex. Run writes every changed value each
//     FlushInterval into the ledger's blocks (slots.go), paced over up to
//     half the interval so that the Checks sharing its CPU barely notice;
//     Flush does it on demand at full speed, and Close does it one last
//     time. A crash loses at most the debits since the last flush; a clean
//     stop loses nothing.
//   - Balances and spends are copied under the account's mutex. A large
//     flush commits in parts, every spend before any balance (Credit writes
//     both in one transaction), so a crash never keeps the price of a debit
//     in a balance while losing it from the key's spend, which would let a
//     key pass its cap after a restart. See flushLocked for the order.
//
// Reads (Account, Accounts, Key, Keys) answer from memory and include every
// debit so far, flushed or not.
//
// The hot path, Lookup then Debit, takes no store-wide lock, touches no disk
// and allocates nothing: Lookup checks the secret's format and checksum,
// hashes it and reads a lock-free, copy-on-write index; Debit locks only the
// key's account.
//
// Secrets are "kg_" plus 32 random base62 characters and a 6-character
// checksum; the store keeps only their SHA-256. Expired and revoked keys stay
// in the store for operators to see; Lookup refuses them.
//
// Only one process may open a store at a time (ErrLocked).
package keystore
