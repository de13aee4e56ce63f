//go:build !linux

package rconntest

import "syscall"

func sysProcAttr() *syscall.SysProcAttr { return nil }
