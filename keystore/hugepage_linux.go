package keystore

import (
	"syscall"
	"unsafe"
)

// madvCollapse is MADV_COLLAPSE (Linux 6.1), which package syscall does not
// name. Older kernels refuse it with EINVAL, and the advice alone remains.
const madvCollapse = 25

const hugePageSize = 2 << 20

// hugePages asks the kernel to back the whole 2 MiB pages inside s with
// transparent huge pages, before s is written. At a million keys the
// slabs and the index are a quarter of a gigabyte read at random: with
// 4 KiB pages nearly every Lookup also misses the TLB, three times (the
// slot, the tail, the Key), and on a virtual machine each such miss walks
// two levels of page tables. MADV_HUGEPAGE is enough where transparent huge
// pages are "always" or "madvise" and the memory is fresh from the system;
// MADV_COLLAPSE makes it so at once even where the runtime hands out memory
// it used before. Both are advice: a kernel without them, or one with huge
// pages "never", keeps 4 KiB pages, and nothing else changes. Only pages
// wholly inside s are advised, so no other object shares them, and s
// costs no more resident memory than it would anyway once it is filled.
func hugePages[T any](s []T) {
	if len(s) == 0 {
		return
	}
	start := uintptr(unsafe.Pointer(unsafe.SliceData(s)))
	end := start + uintptr(len(s))*unsafe.Sizeof(s[0])
	lo, hi := (start+hugePageSize-1)&^(hugePageSize-1), end&^(hugePageSize-1)
	if hi <= lo {
		return
	}
	// Errors are ignored on purpose: this is advice (see above).
	syscall.Syscall(syscall.SYS_MADVISE, lo, hi-lo, syscall.MADV_HUGEPAGE)
	syscall.Syscall(syscall.SYS_MADVISE, lo, hi-lo, madvCollapse)
}
