package region

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	fnote "github.com/transparency-dev/formats/note"
	"golang.org/x/mod/sumdb/note"

	"github.com/knhk/knhk/internal/fsutil"
)

// Cosigner is this region's witness key: a tlog-cosignature/v1 signer and
// the verifier key ("vkey") peers pin for it. LoadOrCreateKey opens a
// local key file, OpenVaultKey a Vault Transit key.
type Cosigner struct {
	Signer   note.Signer
	Verifier string
	// Created: a witness state that records no key may adopt this one.
	// A key file is Created when it has never been bound to a witness
	// state, so it never cosigned anything: it lives at <path>.new until
	// NewWitness binds it, then takes its place at path. A Vault key is
	// always Created, since knhk cannot know whether it cosigned before;
	// a state made for another key refuses it all the same.
	Created bool
	path    string // the key file; empty for a Vault key
}

// pendingSuffix marks a key not yet bound to a witness state: a crash
// between making the key and binding it leaves it there, and the next
// start binds it rather than refusing a key that never signed.
const pendingSuffix = ".new"

// commit moves a newly bound key file to its path.
func (c *Cosigner) commit() error {
	if !c.Created {
		return nil
	}
	if c.path == "" { // in Vault: nothing to move
		c.Created = false
		return nil
	}
	if err := os.Rename(c.path+pendingSuffix, c.path); err != nil {
		return fmt.Errorf("witness key %s: %w", c.path, err)
	}
	if err := fsutil.SyncDir(filepath.Dir(c.path)); err != nil {
		return fmt.Errorf("witness key %s: %w", c.path, err)
	}
	c.Created = false
	return nil
}

// LoadOrCreateKey reads the Ed25519 witness key at path (a C2SP note
// signer key), creating it 0600 on first start under name. A key file
// that others can read is refused rather than used.
func LoadOrCreateKey(path, name string) (*Cosigner, error) {
	b, err := readKey(path)
	created := false
	if errors.Is(err, fs.ErrNotExist) {
		created = true
		if b, err = readKey(path + pendingSuffix); errors.Is(err, fs.ErrNotExist) {
			b, err = createKey(path+pendingSuffix, name)
		}
	}
	if err != nil {
		return nil, err
	}
	skey := strings.TrimSpace(string(b))
	s, err := fnote.NewSignerForCosignatureV1(skey)
	if err != nil {
		return nil, fmt.Errorf("witness key %s: not a C2SP Ed25519 signer key", path) // never echo key material
	}
	if s.Name() != name {
		return nil, fmt.Errorf("witness key %s is named %q, but region.name is %q", path, s.Name(), name)
	}
	vkey, err := cosignatureVKey(name, skey)
	if err != nil {
		return nil, fmt.Errorf("witness key %s: %w", path, err)
	}
	return &Cosigner{Signer: s, Verifier: vkey, Created: created, path: path}, nil
}

// readKey reads the key through one descriptor, so the mode checked is
// the file read; a symlink or anything but a regular file is refused.
func readKey(path string) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
		return nil, fmt.Errorf("witness key %s: %w", path, err)
	}
	defer func() { _ = f.Close() }()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("witness key %s: %w", path, err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("witness key %s: not a regular file", path)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("witness key %s: mode %04o lets others read it; want 0600", path, fi.Mode().Perm())
	}
	b, err := io.ReadAll(io.LimitReader(f, 4096))
	if err != nil {
		return nil, fmt.Errorf("witness key %s: %w", path, err)
	}
	return b, nil
}

// cosignatureVKey derives the cosignature/v1 verifier key from a note
// signer key: "PRIVATE+KEY+<name>+<hash>+base64(0x01 || seed)".
func cosignatureVKey(name, skey string) (string, error) {
	parts := strings.SplitN(skey, "+", 5)
	if len(parts) != 5 {
		return "", errors.New("not a C2SP signer key")
	}
	raw, err := base64.StdEncoding.DecodeString(parts[4])
	if err != nil || len(raw) != 1+ed25519.SeedSize || raw[0] != 0x01 {
		return "", errors.New("not a C2SP Ed25519 signer key")
	}
	pub := ed25519.NewKeyFromSeed(raw[1:]).Public().(ed25519.PublicKey)
	vkey, err := note.NewEd25519VerifierKey(name, pub)
	if err != nil {
		return "", err
	}
	return fnote.VKeyToCosignatureV1(vkey)
}

func createKey(path, name string) ([]byte, error) {
	skey, _, err := note.GenerateKey(rand.Reader, name)
	if err != nil {
		return nil, fmt.Errorf("witness key for %q: %w", name, err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("witness key %s: %w", path, err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("witness key %s: %w", path, err)
	}
	_, err = f.WriteString(skey + "\n")
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = fsutil.SyncDir(filepath.Dir(path))
	}
	if err != nil {
		_ = os.Remove(path)
		return nil, fmt.Errorf("witness key %s: %w", path, err)
	}
	return []byte(skey), nil
}
