package rconntest

import "syscall"

// sysProcAttr kills redis-server when the test binary dies (a panic, a
// test timeout), so that no server outlives its test.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
