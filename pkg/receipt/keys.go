package receipt

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"log/slog"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/knhk/knhk/internal/fsutil"
	"github.com/knhk/knhk/pkg/kms"
)

// Delegate is the current short-lived signing key and its certificate.
type Delegate struct {
	Key   ed25519.PrivateKey
	KeyID [8]byte
	Cert  SignedCert
}

// Keys keeps the delegated signing key: created in memory, certified by the
// KMS key, rotated before expiry without blocking signers (they read an
// atomic pointer), and every certificate ever used appended to a file so
// old receipts keep verifying after restarts.
type Keys struct {
	signer   kms.Signer
	lifetime time.Duration
	region   string
	instance string
	path     string // certificates file (JSON lines)
	log      *slog.Logger
	now      func() time.Time

	current atomic.Pointer[Delegate]
	mu      sync.Mutex
	certs   []SignedCert
}

// PublishedCert is a certificate as published at /v1/keys and stored on disk.
type PublishedCert struct {
	KeyID     string    `json:"key_id"`
	PublicKey []byte    `json:"public_key"`
	NotBefore time.Time `json:"not_before"`
	NotAfter  time.Time `json:"not_after"`
	Region    string    `json:"region"`
	Instance  string    `json:"instance"`
	Issuer    string    `json:"issuer"`
	IssuerAlg string    `json:"issuer_alg"`
	Signature []byte    `json:"signature"`
}

func toJSON(s SignedCert) PublishedCert {
	id := s.Cert.KeyID()
	return PublishedCert{KeyID: fmt.Sprintf("%x", id[:]), PublicKey: s.Cert.PublicKey, NotBefore: s.Cert.NotBefore, NotAfter: s.Cert.NotAfter,
		Region: s.Cert.Region, Instance: s.Cert.Instance, Issuer: s.Cert.Issuer, IssuerAlg: string(s.Cert.IssuerAlg), Signature: s.Signature}
}

// FromPublished converts a published certificate back.
func FromPublished(c PublishedCert) SignedCert {
	return SignedCert{Cert: Cert{PublicKey: c.PublicKey, NotBefore: c.NotBefore, NotAfter: c.NotAfter, Region: c.Region,
		Instance: c.Instance, Issuer: c.Issuer, IssuerAlg: kms.Algorithm(c.IssuerAlg)}, Signature: c.Signature}
}

// OpenKeys loads published certificates from dir and certifies a fresh key.
func OpenKeys(ctx context.Context, dir string, signer kms.Signer, lifetime time.Duration, region, instance string, log *slog.Logger) (*Keys, error) {
	k := &Keys{signer: signer, lifetime: lifetime, region: region, instance: instance,
		path: filepath.Join(dir, "delegations.jsonl"), log: log, now: time.Now}
	if err := fsutil.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	certs, err := readJSONLines[PublishedCert](k.path, log)
	if err != nil {
		return nil, err
	}
	for _, c := range certs {
		k.certs = append(k.certs, FromPublished(c))
	}
	if err := k.Rotate(ctx); err != nil {
		return nil, err
	}
	return k, nil
}

// Current is the key to sign with now.
func (k *Keys) Current() *Delegate { return k.current.Load() }

// certBackdate starts a delegated key's validity before its certification.
// A receipt's time is its request's start, and the key that signs it is
// the one current when its batch commits, later; without it, a request
// that began just before a rotation would carry a receipt dated before
// its key's validity. A minute is longer than any request knhk waits on.
const certBackdate = time.Minute

// Rotate certifies a new key and makes it current. Signers keep using the
// old key until the swap; the old certificate stays published.
func (k *Keys) Rotate(ctx context.Context) error {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return err
	}
	k.mu.Lock()
	signer := k.signer
	k.mu.Unlock()
	sc, err := Certify(ctx, signer, pub, k.now().Add(-certBackdate), k.lifetime, k.region, k.instance)
	if err != nil {
		return err
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	// Publish before use: a receipt must never carry a key id whose
	// certificate could be lost in a crash.
	if err := appendJSONLine(k.path, toJSON(sc)); err != nil {
		return err
	}
	k.certs = append(k.certs, sc)
	k.current.Store(&Delegate{Key: priv, KeyID: sc.Cert.KeyID(), Cert: sc})
	k.log.Info("receipt signing key rotated", "key_id", fmt.Sprintf("%x", sc.Cert.KeyID()), "not_after", sc.Cert.NotAfter, "issuer", sc.Cert.Issuer)
	return nil
}

// SetSigner makes a rotated KMS key certify the next delegated keys.
func (k *Keys) SetSigner(s kms.Signer) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.signer = s
}

// Run rotates at 80 % of the lifetime until ctx ends; a KMS outage delays
// rotation (retried every 10 s) while the current key stays in use.
func (k *Keys) Run(ctx context.Context) {
	for {
		d := k.Current()
		wait := time.Until(d.Cert.Cert.NotBefore.Add(k.lifetime * 8 / 10))
		select {
		case <-ctx.Done():
			return
		case <-time.After(max(wait, 0)):
		}
		if err := k.Rotate(ctx); err != nil {
			k.log.Warn("receipt key rotation failed; retrying", "error", err.Error())
			select {
			case <-ctx.Done():
				return
			case <-time.After(10 * time.Second):
			}
		}
	}
}

// Published returns every certificate ever used (for GET /v1/keys).
func (k *Keys) Published() []PublishedCert {
	k.mu.Lock()
	defer k.mu.Unlock()
	out := make([]PublishedCert, len(k.certs))
	for i, c := range k.certs {
		out[i] = toJSON(c)
	}
	return out
}
