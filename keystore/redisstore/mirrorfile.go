package redisstore

import "github.com/keygate/keygate/keystore"

// IsMirror reports whether local has been a Redis replica's mirror: it
// remembers a Redis epoch. Such a file is a cache of key records, not a
// store to serve or administer on its own: its balances are not the truth.
func IsMirror(local *keystore.Store) (bool, error) {
	epoch, err := local.Meta(metaEpoch)
	return epoch != "", err
}
