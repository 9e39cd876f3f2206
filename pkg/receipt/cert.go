package receipt

import (
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/knhk/knhk/pkg/kms"
)

// MaxDelegation is the longest a delegated key may be valid.
const MaxDelegation = 24 * time.Hour

// Cert is a delegation certificate: the KMS key vouches that PublicKey may
// sign receipts between NotBefore and NotAfter, for one region and instance.
type Cert struct {
	PublicKey ed25519.PublicKey
	NotBefore time.Time
	NotAfter  time.Time
	Region    string
	Instance  string
	Issuer    string        // KMS key id (with version)
	IssuerAlg kms.Algorithm // how Signature was made
}

// SignedCert is a certificate with the KMS signature over its encoding.
type SignedCert struct {
	Cert      Cert
	Signature []byte
}

// KeyID is the delegated key's id as carried in tokens.
func (c *Cert) KeyID() [8]byte {
	h := sha256.Sum256(c.PublicKey)
	var id [8]byte
	copy(id[:], h[:8])
	return id
}

func (c *Cert) encode() ([]byte, error) {
	if len(c.PublicKey) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("delegation certificate: public key is %d bytes, want %d", len(c.PublicKey), ed25519.PublicKeySize)
	}
	b := []byte("knhk-delegation-v1\n")
	b = append(b, c.PublicKey...)
	b = binary.BigEndian.AppendUint64(b, uint64(c.NotBefore.Unix()))
	b = binary.BigEndian.AppendUint64(b, uint64(c.NotAfter.Unix()))
	// These come from the config and the KMS, not from requests: a hard
	// limit is an error at start, not a receipt a client can dodge.
	for _, s := range []string{c.Region, c.Instance, c.Issuer, string(c.IssuerAlg)} {
		if len(s) > maxInline {
			return nil, fmt.Errorf("delegation certificate: a field of %d bytes is over the %d-byte limit", len(s), maxInline)
		}
		b = appendString(b, s)
	}
	return b, nil
}

// Certify has the KMS key sign a certificate for pub.
func Certify(ctx context.Context, signer kms.Signer, pub ed25519.PublicKey, notBefore time.Time, lifetime time.Duration, region, instance string) (SignedCert, error) {
	if lifetime <= 0 || lifetime > MaxDelegation {
		return SignedCert{}, fmt.Errorf("delegation lifetime %s: must be above 0 and at most %s", lifetime, MaxDelegation)
	}
	c := Cert{PublicKey: pub, NotBefore: notBefore.Truncate(time.Second), NotAfter: notBefore.Truncate(time.Second).Add(lifetime),
		Region: region, Instance: instance, Issuer: signer.KeyID(), IssuerAlg: signer.Algorithm()}
	msg, err := c.encode()
	if err != nil {
		return SignedCert{}, err
	}
	sig, err := signer.Sign(ctx, msg)
	if err != nil {
		return SignedCert{}, fmt.Errorf("certify delegated key with %s: %w", signer.KeyID(), err)
	}
	return SignedCert{Cert: c, Signature: sig}, nil
}

// ErrCertificate wraps every certificate failure.
var ErrCertificate = errors.New("certificate check failed")

// Verify checks the KMS signature and that at was within the validity.
func (s *SignedCert) Verify(issuerPub crypto.PublicKey, at time.Time) error {
	if err := s.verifySignature(issuerPub); err != nil {
		return err
	}
	c := &s.Cert
	if at.Before(c.NotBefore) || !at.Before(c.NotAfter) {
		return fmt.Errorf("%w: used at %s, valid %s to %s", ErrCertificate, at.UTC().Format(time.RFC3339), c.NotBefore.UTC().Format(time.RFC3339), c.NotAfter.UTC().Format(time.RFC3339))
	}
	return nil
}

// verifySignature checks the KMS signature and the lifetime, not when the
// certificate was used.
func (s *SignedCert) verifySignature(issuerPub crypto.PublicKey) error {
	c := &s.Cert
	if c.NotAfter.Sub(c.NotBefore) > MaxDelegation {
		return fmt.Errorf("%w: valid for %s, over the %s maximum", ErrCertificate, c.NotAfter.Sub(c.NotBefore), MaxDelegation)
	}
	msg, err := c.encode()
	if err != nil {
		return fmt.Errorf("%w: %w", ErrCertificate, err)
	}
	if err := kms.Verify(c.IssuerAlg, issuerPub, msg, s.Signature); err != nil {
		return fmt.Errorf("%w: KMS signature by %s: %w", ErrCertificate, c.Issuer, err)
	}
	return nil
}
