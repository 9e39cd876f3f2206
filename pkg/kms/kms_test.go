package kms

import (
	"context"
	"crypto/ed25519"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestLocalCreatesKeyWithMode0600AndReloadsIt(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keys", "kms.key")
	a, err := OpenLocal(path)
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(path)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode %v, want 0600 (%v)", st.Mode().Perm(), err)
	}
	if d, _ := os.Stat(filepath.Dir(path)); d.Mode().Perm() != 0o700 {
		t.Fatalf("key directory mode %v, want 0700", d.Mode().Perm())
	}
	b, err := OpenLocal(path)
	if err != nil {
		t.Fatal(err)
	}
	if a.KeyID() != b.KeyID() || !strings.HasPrefix(a.KeyID(), "local:") {
		t.Fatalf("reloaded a different key: %s vs %s", a.KeyID(), b.KeyID())
	}
	msg := []byte("checkpoint")
	sig, err := a.Sign(context.Background(), msg)
	if err != nil {
		t.Fatal(err)
	}
	if err := Verify(b.Algorithm(), b.Public(), msg, sig); err != nil {
		t.Fatal(err)
	}
	sig[0] ^= 1
	if err := Verify(Ed25519, b.Public(), msg, sig); !errors.Is(err, ErrBadSignature) {
		t.Fatalf("tampered signature: %v", err)
	}
}

func TestLocalRefusesOpenKeyFilesAndGarbage(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "kms.key")
	if _, err := OpenLocal(path); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenLocal(path); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Fatalf("world-readable key accepted: %v", err)
	}
	bad := filepath.Join(dir, "bad.key")
	if err := os.WriteFile(bad, []byte("not a key"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenLocal(bad); err == nil || !strings.Contains(err.Error(), bad) {
		t.Fatalf("garbage key: %v", err)
	}
}

func TestVerifyRejectsWrongKeyTypes(t *testing.T) {
	pub, _, _ := ed25519.GenerateKey(nil)
	if err := Verify(ECDSAP256SHA256, pub, []byte("m"), []byte("s")); err == nil {
		t.Fatal("Ed25519 key accepted as ECDSA")
	}
	if err := Verify("rsa", pub, nil, nil); err == nil {
		t.Fatal("unknown algorithm accepted")
	}
}
