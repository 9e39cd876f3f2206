package receipt

import (
	"crypto/ed25519"
	"encoding/base64"
	"fmt"
	"strings"
)

// Token is the x-knhk-receipt header: enough to find the receipt in the log
// and check its inline signature offline.
type Token struct {
	ID        [16]byte
	LeafHash  [32]byte
	KeyID     [8]byte // the delegated signing key (first 8 bytes of SHA-256 of its public key)
	Signature [ed25519.SignatureSize]byte
}

const (
	tokenPrefix = "kr1."
	tokenRaw    = 16 + 32 + 8 + ed25519.SignatureSize
	// TokenLen is the header's length: 4 + base64url(120 bytes) = 164 ≤ 512.
	TokenLen = len(tokenPrefix) + (tokenRaw*8+5)/6
)

// signedMessage is what the delegated key signs: a domain tag, so a
// receipt signature can never be replayed as anything else, and the leaf.
func signedMessage(leaf [32]byte) []byte {
	return append([]byte("knhk-receipt-v1\n"), leaf[:]...)
}

// Sign builds the token for a receipt's leaf hash with the delegated key.
func Sign(id [16]byte, leaf [32]byte, keyID [8]byte, key ed25519.PrivateKey) Token {
	t := Token{ID: id, LeafHash: leaf, KeyID: keyID}
	copy(t.Signature[:], ed25519.Sign(key, signedMessage(leaf)))
	return t
}

// VerifySignature checks the token's inline signature with the delegated
// public key.
func (t Token) VerifySignature(pub ed25519.PublicKey) bool {
	return len(pub) == ed25519.PublicKeySize && ed25519.Verify(pub, signedMessage(t.LeafHash), t.Signature[:])
}

// String encodes the token: "kr1." and base64url without padding.
func (t Token) String() string {
	raw := make([]byte, 0, tokenRaw)
	raw = append(raw, t.ID[:]...)
	raw = append(raw, t.LeafHash[:]...)
	raw = append(raw, t.KeyID[:]...)
	raw = append(raw, t.Signature[:]...)
	return tokenPrefix + base64.RawURLEncoding.EncodeToString(raw)
}

// ParseToken decodes a header value; errors say what is wrong with it.
func ParseToken(s string) (Token, error) {
	var t Token
	rest, ok := strings.CutPrefix(strings.TrimSpace(s), tokenPrefix)
	if !ok {
		return t, fmt.Errorf("receipt token: does not start with %q (unknown version or not a knhk receipt)", tokenPrefix)
	}
	raw, err := base64.RawURLEncoding.DecodeString(rest)
	if err != nil {
		return t, fmt.Errorf("receipt token: not base64url: %w", err)
	}
	if len(raw) != tokenRaw {
		return t, fmt.Errorf("receipt token: %d bytes, want %d", len(raw), tokenRaw)
	}
	n := copy(t.ID[:], raw)
	n += copy(t.LeafHash[:], raw[n:])
	n += copy(t.KeyID[:], raw[n:])
	copy(t.Signature[:], raw[n:])
	return t, nil
}
