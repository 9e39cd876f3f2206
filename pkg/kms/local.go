package kms

import (
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/knhk/knhk/internal/fsutil"
)

// Local is an Ed25519 key kept in a file (PKCS #8 PEM, mode 0600): the
// embedded default, for a single machine.
type Local struct {
	key ed25519.PrivateKey
	id  string
}

// OpenLocal loads path, creating the key (and its directory, 0700) on first
// use. A key file readable by group or others is refused: keys never leave
// mode 0600.
func OpenLocal(path string) (*Local, error) {
	st, err := os.Stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return createLocal(path)
	case err != nil:
		return nil, fmt.Errorf("local key %s: %w", path, err)
	case st.Mode().Perm()&0o077 != 0:
		return nil, fmt.Errorf("local key %s: mode %v is readable by others; chmod 600 it", path, st.Mode().Perm())
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("local key %s: %w", path, err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "PRIVATE KEY" {
		return nil, fmt.Errorf("local key %s: not a PEM PRIVATE KEY", path)
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("local key %s: %w", path, err)
	}
	ek, ok := k.(ed25519.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("local key %s: a %T key, want Ed25519", path, k)
	}
	return newLocal(ek), nil
}

// createLocal writes a new key durably: the file synced, then its
// directory (and any directory created for it), or a crash could lose the
// key after it signed something.
func createLocal(path string) (*Local, error) {
	if err := fsutil.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("local key %s: %w", path, err)
	}
	_, k, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, err
	}
	// O_EXCL: two processes racing to create the key cannot both win.
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("local key %s: %w", path, err)
	}
	if err := pem.Encode(f, &pem.Block{Type: "PRIVATE KEY", Bytes: der}); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("local key %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("local key %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return nil, fmt.Errorf("local key %s: %w", path, err)
	}
	if err := fsutil.SyncDir(filepath.Dir(path)); err != nil {
		return nil, fmt.Errorf("local key %s: %w", path, err)
	}
	return newLocal(k), nil
}

func newLocal(k ed25519.PrivateKey) *Local {
	pub := k.Public().(ed25519.PublicKey)
	return &Local{key: k, id: "local:" + Fingerprint(pub)}
}

// Sign signs msg with Ed25519.
func (l *Local) Sign(_ context.Context, msg []byte) ([]byte, error) {
	return ed25519.Sign(l.key, msg), nil
}

// Public returns the Ed25519 public key.
func (l *Local) Public() crypto.PublicKey { return l.key.Public() }

// KeyID is "local:" and the key's fingerprint.
func (l *Local) KeyID() string { return l.id }

// Algorithm is Ed25519.
func (l *Local) Algorithm() Algorithm { return Ed25519 }
