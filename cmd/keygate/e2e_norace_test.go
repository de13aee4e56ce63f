//go:build !race

package main_test

// raceEnabled: the tests run without -race, so the keygate binary is built
// without it as well.
const raceEnabled = false
