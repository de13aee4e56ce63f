//go:build !linux

package keystore

// hugePages is advice that only Linux takes (see hugepage_linux.go).
func hugePages[T any](s []T) {}
