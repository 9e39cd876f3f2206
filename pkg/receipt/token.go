package receipt

import (
	"crypto/ed25519"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"strings"
)

// Token is the x-knhk-receipt header: enough to find the receipt in the log
// and check its signature offline.
//
//   - kr1 (tokens issued before batches): the delegated key signed the
//     leaf hash itself.
//   - kr2: the delegated key signed the root of the receipt's batch (see
//     batch.go); the token carries the batch's id and size, the leaf's
//     index in it and its audit path to the root.
type Token struct {
	ID        [16]byte
	LeafHash  [32]byte
	KeyID     [8]byte // the delegated signing key (first 8 bytes of SHA-256 of its public key)
	Signature [ed25519.SignatureSize]byte

	Batched   bool // kr2
	BatchID   uint64
	BatchSize int
	LeafIndex int
	Path      [][32]byte
}

const (
	kr1Prefix = "kr1."
	kr2Prefix = "kr2."
	kr1Raw    = 16 + 32 + 8 + ed25519.SignatureSize
	kr2Head   = kr1Raw + 8 + 2 + 2 // + batch id, size, leaf index
)

// TokenLen is the longest header a token takes: a kr2 token with a full
// audit path, 4 + base64url(132 + 7 × 32 bytes) = 479 ≤ 512.
var TokenLen = len(kr2Prefix) + base64.RawURLEncoding.EncodedLen(kr2Head+maxPath*32)

// kr1Message is what the delegated key signed for a kr1 token: a domain
// tag, so a receipt signature can never be replayed as anything else, and
// the leaf.
func kr1Message(leaf [32]byte) []byte {
	return append([]byte("knhk-receipt-v1\n"), leaf[:]...)
}

// batchToken is the kr2 token of leaf index in a sealed batch.
func batchToken(id [16]byte, leaf [32]byte, s *batchSeal, index int, path [][32]byte) Token {
	return Token{ID: id, LeafHash: leaf, KeyID: s.KeyID, Signature: s.Signature,
		Batched: true, BatchID: s.ID, BatchSize: len(s.Leaves), LeafIndex: index, Path: path}
}

// VerifySignature checks the token's signature with the delegated public
// key: over the leaf (kr1), or over the batch root its audit path leads to
// (kr2).
func (t Token) VerifySignature(pub ed25519.PublicKey) bool {
	if len(pub) != ed25519.PublicKeySize {
		return false
	}
	if !t.Batched {
		return ed25519.Verify(pub, kr1Message(t.LeafHash), t.Signature[:])
	}
	root, err := batchRoot(t.LeafHash, t.LeafIndex, t.BatchSize, t.Path)
	return err == nil && ed25519.Verify(pub, batchMessage(t.BatchID, t.BatchSize, root), t.Signature[:])
}

// String encodes the token: its version prefix and base64url without
// padding.
func (t Token) String() string {
	raw := make([]byte, 0, kr2Head+len(t.Path)*32)
	raw = append(raw, t.ID[:]...)
	raw = append(raw, t.LeafHash[:]...)
	raw = append(raw, t.KeyID[:]...)
	raw = append(raw, t.Signature[:]...)
	if !t.Batched {
		return kr1Prefix + base64.RawURLEncoding.EncodeToString(raw)
	}
	raw = binary.BigEndian.AppendUint64(raw, t.BatchID)
	raw = binary.BigEndian.AppendUint16(raw, uint16(t.BatchSize))
	raw = binary.BigEndian.AppendUint16(raw, uint16(t.LeafIndex))
	for _, h := range t.Path {
		raw = append(raw, h[:]...)
	}
	return kr2Prefix + base64.RawURLEncoding.EncodeToString(raw)
}

// ParseToken decodes a header value, kr1 or kr2; errors say what is wrong
// with it. It checks the shape only: VerifySignature checks the rest.
func ParseToken(s string) (Token, error) {
	var t Token
	s = strings.TrimSpace(s)
	rest, kr1 := strings.CutPrefix(s, kr1Prefix)
	if !kr1 {
		var ok bool
		if rest, ok = strings.CutPrefix(s, kr2Prefix); !ok {
			return t, fmt.Errorf("receipt token: does not start with %q or %q (unknown version or not a knhk receipt)", kr1Prefix, kr2Prefix)
		}
	}
	if len(s) > TokenLen {
		return t, fmt.Errorf("receipt token: %d bytes, longer than any token (%d)", len(s), TokenLen)
	}
	// Strict: when a token's length is not a multiple of 3 bytes (most kr2
	// tokens), the last character has unused bits, and without it they
	// could be anything, giving one token many spellings.
	raw, err := base64.RawURLEncoding.Strict().DecodeString(rest)
	if err != nil {
		return t, fmt.Errorf("receipt token: not base64url: %w", err)
	}
	switch {
	case kr1 && len(raw) != kr1Raw:
		return t, fmt.Errorf("receipt token: %d bytes, want %d for kr1", len(raw), kr1Raw)
	case !kr1 && (len(raw) < kr2Head || (len(raw)-kr2Head)%32 != 0):
		return t, fmt.Errorf("receipt token: %d bytes, want %d and a whole number of 32-byte path hashes for kr2", len(raw), kr2Head)
	}
	n := copy(t.ID[:], raw)
	n += copy(t.LeafHash[:], raw[n:])
	n += copy(t.KeyID[:], raw[n:])
	n += copy(t.Signature[:], raw[n:])
	if kr1 {
		return t, nil
	}
	t.Batched = true
	t.BatchID = binary.BigEndian.Uint64(raw[n:])
	t.BatchSize = int(binary.BigEndian.Uint16(raw[n+8:]))
	t.LeafIndex = int(binary.BigEndian.Uint16(raw[n+10:]))
	if t.BatchSize < 1 || t.BatchSize > maxBatch || t.LeafIndex >= t.BatchSize {
		return t, fmt.Errorf("receipt token: leaf %d of a batch of %d (a batch holds 1 to %d)", t.LeafIndex, t.BatchSize, maxBatch)
	}
	for p := raw[kr2Head:]; len(p) > 0; p = p[32:] {
		t.Path = append(t.Path, [32]byte(p[:32]))
	}
	return t, nil
}
