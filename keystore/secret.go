package keystore

import (
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"hash/crc32"
)

// A secret is "kg_", 32 random base62 characters, then 6 base62 characters
// of the CRC32 of the random part: the shape of GitHub's tokens. The fixed
// prefix lets secret scanners find a leaked key; the checksum lets Lookup
// refuse a mistyped or made-up key without hashing it or touching the index.
// 32 base62 characters carry about 190 bits, so a plain SHA-256 is enough to
// store: there is nothing for a salt or a slow hash to protect.
const (
	secretPrefix    = "kg_"
	secretRandLen   = 32
	secretSumLen    = 6
	secretLen       = len(secretPrefix) + secretRandLen + secretSumLen
	keyIDPrefix     = "key_"
	keyIDRandLen    = 16
	keyIDLen        = len(keyIDPrefix) + keyIDRandLen
	base62Alphabet  = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
	base62RejectMin = 248 // 4*62: random bytes at or above it are dropped, so each character is uniform
)

// hashSize is the size of a stored secret hash.
const hashSize = sha256.Size

// ValidSecretFormat reports whether secret has the shape of a keygate secret:
// the prefix, the length, base62 characters and a matching checksum. It says
// nothing about whether the key exists. It does not allocate.
func ValidSecretFormat(secret string) bool {
	if len(secret) != secretLen || secret[:len(secretPrefix)] != secretPrefix {
		return false
	}
	body := secret[len(secretPrefix):]
	var seen byte // the high bit is set if any character is not base62
	for i := range secretRandLen {
		seen |= base62Index[body[i]]
	}
	var sum uint64
	for i := secretRandLen; i < len(body); i++ {
		v := base62Index[body[i]]
		seen |= v
		sum = sum*62 + uint64(v)
	}
	return seen&0x80 == 0 && sum == uint64(checksum(body[:secretRandLen]))
}

// base62Index maps a character to its base62 value, or to 0xff. It is a
// constant table, built once.
var base62Index = func() (t [256]byte) {
	for i := range t {
		t[i] = 0xff
	}
	for i := range len(base62Alphabet) {
		t[base62Alphabet[i]] = byte(i)
	}
	return t
}()

// checksum is the CRC32 (IEEE) of s, a byte at a time: crc32.ChecksumIEEE
// would make its argument escape (it calls through a function variable), so
// the hot path would allocate. 32 table lookups cost a few nanoseconds.
func checksum(s string) uint32 {
	tab := crc32.IEEETable
	crc := ^uint32(0)
	for i := 0; i < len(s); i++ {
		crc = tab[byte(crc)^s[i]] ^ crc>>8
	}
	return ^crc
}

// hashSecret returns the SHA-256 of a secret of valid format (the only ones
// worth hashing), without allocating.
func hashSecret(secret string) [hashSize]byte {
	var buf [secretLen]byte
	n := copy(buf[:], secret)
	return sha256.Sum256(buf[:n])
}

// appendBase62Random appends n uniformly random base62 characters from
// crypto/rand.
func appendBase62Random(dst []byte, n int) ([]byte, error) {
	var buf [64]byte
	for n > 0 {
		if _, err := rand.Read(buf[:]); err != nil {
			return dst, fmt.Errorf("read random bytes: %w", err)
		}
		for _, b := range buf {
			if n == 0 {
				break
			}
			if b >= base62RejectMin {
				continue
			}
			dst = append(dst, base62Alphabet[b%62])
			n--
		}
	}
	return dst, nil
}

// appendChecksum appends the 6-character base62 checksum of random.
func appendChecksum(dst []byte, random string) []byte {
	sum := uint64(checksum(random))
	var out [secretSumLen]byte
	for i := secretSumLen - 1; i >= 0; i-- {
		out[i] = base62Alphabet[sum%62]
		sum /= 62
	}
	return append(dst, out[:]...)
}

// newSecret returns a fresh secret and its hash.
func newSecret() (string, [hashSize]byte, error) {
	b := make([]byte, 0, secretLen)
	b = append(b, secretPrefix...)
	b, err := appendBase62Random(b, secretRandLen)
	if err != nil {
		return "", [hashSize]byte{}, err
	}
	b = appendChecksum(b, string(b[len(secretPrefix):]))
	s := string(b)
	return s, hashSecret(s), nil
}

// newKeyID returns a fresh public key ID, "key_" and 16 base62 characters
// (about 95 bits: unique without coordination, and safe to log).
func newKeyID() (string, error) {
	b := make([]byte, 0, keyIDLen)
	b = append(b, keyIDPrefix...)
	b, err := appendBase62Random(b, keyIDRandLen)
	if err != nil {
		return "", err
	}
	return string(b), nil
}
