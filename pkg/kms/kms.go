// Package kms is the one interface knhk signs through — checkpoints and
// delegation certificates — and its providers: a local Ed25519 key, AWS
// KMS, Azure Key Vault and HashiCorp Vault Transit.
package kms

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
)

// Algorithm names a signature scheme.
type Algorithm string

const (
	Ed25519         Algorithm = "ed25519"           // signs the message itself
	ECDSAP256SHA256 Algorithm = "ecdsa-p256-sha256" // signs SHA-256(message), ASN.1 DER signature
)

// Signer signs with a key it may never reveal.
type Signer interface {
	// Sign signs msg (providers that sign digests hash it themselves).
	Sign(ctx context.Context, msg []byte) ([]byte, error)
	// Public returns the public key.
	Public() crypto.PublicKey
	// KeyID identifies the key (and its version) across providers.
	KeyID() string
	// Algorithm is the signature scheme.
	Algorithm() Algorithm
}

// Versioned is a key that can be rotated inside the KMS (a new key version,
// or an alias moved to a new key). A Signer stays pinned to one version, so
// what it signs always matches the public key it published.
type Versioned interface {
	// Latest returns a signer pinned to the key's current version: the
	// receiver itself when nothing changed.
	Latest(ctx context.Context) (Signer, error)
}

// ErrBadSignature is returned by Verify when the signature does not match.
var ErrBadSignature = errors.New("signature does not verify")

// Verify checks sig over msg with a public key of the given algorithm.
func Verify(alg Algorithm, pub crypto.PublicKey, msg, sig []byte) error {
	switch alg {
	case Ed25519:
		k, ok := pub.(ed25519.PublicKey)
		if !ok || len(k) != ed25519.PublicKeySize {
			return fmt.Errorf("%s: public key is %T, not an Ed25519 key", alg, pub)
		}
		if !ed25519.Verify(k, msg, sig) {
			return ErrBadSignature
		}
		return nil
	case ECDSAP256SHA256:
		k, ok := pub.(*ecdsa.PublicKey)
		if !ok {
			return fmt.Errorf("%s: public key is %T, not an ECDSA key", alg, pub)
		}
		d := sha256.Sum256(msg)
		if !ecdsa.VerifyASN1(k, d[:], sig) {
			return ErrBadSignature
		}
		return nil
	}
	return fmt.Errorf("unknown algorithm %q", alg)
}

// Fingerprint is a short, stable id of a public key: hex of the first 8
// bytes of SHA-256 over its encoding.
func Fingerprint(pub []byte) string {
	h := sha256.Sum256(pub)
	return hex.EncodeToString(h[:8])
}
