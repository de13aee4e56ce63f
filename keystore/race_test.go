//go:build race

package keystore

// raceEnabled: the race detector changes allocation counts.
const raceEnabled = true
