//go:build race

package main_test

// raceEnabled: the tests run under -race, so the keygate binary is built with
// it as well.
const raceEnabled = true
