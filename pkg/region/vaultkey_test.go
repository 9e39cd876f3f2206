package region

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/base64"
	"fmt"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"

	vault "github.com/hashicorp/vault/api"
	fnote "github.com/transparency-dev/formats/note"
	"golang.org/x/mod/sumdb/note"

	"github.com/knhk/knhk/internal/vaulttest"
)

const testVaultToken = "s.test-root-token"

// testVault is the in-repo Transit server behind the real vault/api
// client, with an admin client for what an operator does.
type testVault struct {
	t     *testing.T
	url   string
	admin *vault.Client
}

func newTestVault(t *testing.T) *testVault {
	t.Helper()
	srv := httptest.NewServer(vaulttest.New(testVaultToken))
	t.Cleanup(srv.Close)
	admin, err := vault.NewClient(&vault.Config{Address: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	admin.SetToken(testVaultToken)
	return &testVault{t: t, url: srv.URL, admin: admin}
}

// write is `vault write transit/<path> …`.
func (v *testVault) write(path string, data map[string]any) {
	v.t.Helper()
	if _, err := v.admin.Logical().Write("transit/"+path, data); err != nil {
		v.t.Fatal(err)
	}
}

func (v *testVault) open(key string) (*Cosigner, error) {
	return OpenVaultKey(context.Background(), VaultKeyConfig{Address: v.url, Token: testVaultToken, Key: key, Name: "us-east"})
}

func (v *testVault) mustOpen(key string) *Cosigner {
	v.t.Helper()
	c, err := v.open(key)
	if err != nil {
		v.t.Fatal(err)
	}
	return c
}

// exported is the key's v1 as a C2SP signer key, the form formats'
// NewSignerForCosignatureV1 reads: PRIVATE+KEY+<name>+<hash>+base64(0x01 || seed).
func (v *testVault) exported(key, name string) string {
	v.t.Helper()
	s, err := v.admin.Logical().Read("transit/export/signing-key/" + key + "/1")
	if err != nil {
		v.t.Fatal(err)
	}
	priv, err := base64.StdEncoding.DecodeString(s.Data["keys"].(map[string]any)["1"].(string))
	if err != nil || len(priv) != ed25519.PrivateKeySize {
		v.t.Fatalf("exported key: %v", err)
	}
	seed := ed25519.PrivateKey(priv).Seed()
	return fmt.Sprintf("PRIVATE+KEY+%s+%08x+%s", name, 0, base64.StdEncoding.EncodeToString(append([]byte{0x01}, seed...)))
}

// TestVaultCosignatureIsFormats: the Vault signer's cosignature is, byte
// for byte, what formats' NewSignerForCosignatureV1 makes with the same
// key at the same second; its vkey and key hash are formats' too; and
// formats' verifier, through x/mod's note, accepts it under the vkey
// this region publishes.
func TestVaultCosignatureIsFormats(t *testing.T) {
	v := newTestVault(t)
	v.write("keys/witness", map[string]any{"type": "ed25519", "exportable": true})
	c := v.mustOpen("witness")
	if !c.Created {
		t.Fatal("a Vault key is not adoptable by a state that records no key")
	}
	skey := v.exported("witness", "us-east")
	ref, err := fnote.NewSignerForCosignatureV1(skey)
	if err != nil {
		t.Fatal(err)
	}
	if want, err := cosignatureVKey("us-east", skey); err != nil || c.Verifier != want {
		t.Fatalf("vkey %q, want %q (%v)", c.Verifier, want, err)
	}
	if c.Signer.Name() != ref.Name() || c.Signer.KeyHash() != ref.KeyHash() {
		t.Fatalf("name/hash %s/%08x, formats' %s/%08x", c.Signer.Name(), c.Signer.KeyHash(), ref.Name(), ref.KeyHash())
	}
	text := []byte("example.com/log\n12\n" + base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{7}, 32)) + "\n")
	same := false
	for range 5 { // both must fall in the same second
		got, err := c.Signer.Sign(text)
		if err != nil {
			t.Fatal(err)
		}
		want, err := ref.Sign(text)
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != 8+ed25519.SignatureSize {
			t.Fatalf("signature of %d bytes, want 8 + 64", len(got))
		}
		if !bytes.Equal(got[:8], want[:8]) {
			continue
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("Vault's cosignature\n%x\nformats'\n%x", got, want)
		}
		same = true
		break
	}
	if !same {
		t.Fatal("never signed within one second as formats' signer")
	}

	// The published vkey verifies it, through code that is not knhk's.
	signed, err := note.Sign(&note.Note{Text: string(text)}, c.Signer)
	if err != nil {
		t.Fatal(err)
	}
	cv, err := fnote.NewVerifierForCosignatureV1(c.Verifier)
	if err != nil {
		t.Fatal(err)
	}
	n, err := note.Open(signed, note.VerifierList(cv))
	if err != nil || len(n.Sigs) != 1 {
		t.Fatalf("the cosigned note does not verify: %v\n%s", err, signed)
	}
	if ts, err := fnote.CoSigV1Timestamp(n.Sigs[0]); err != nil || ts.IsZero() {
		t.Fatalf("timestamp %v %v", ts, err)
	}
}

// TestVaultWitnessCosigns: a witness whose key is in Vault cosigns a plain
// tessera log; the cosignatures verify with formats and x/mod against the
// published vkey; the state binds the Vault key, so a restart with it
// carries on and a restart with another Vault key is refused.
func TestVaultWitnessCosigns(t *testing.T) {
	v := newTestVault(t)
	v.write("keys/witness", map[string]any{"type": "ed25519"})
	v.write("keys/other", map[string]any{"type": "ed25519"})
	l := newPlainLog(t)
	dir := t.TempDir()
	path := filepath.Join(dir, "witness.db")
	ctx := context.Background()

	key := v.mustOpen("witness")
	w, err := NewWitness(ctx, WitnessOptions{Key: key, Logs: []string{l.vkey}, Path: path})
	if err != nil {
		t.Fatalf("a fresh state did not adopt the Vault key: %v", err)
	}
	if key.Created {
		t.Fatal("the key is still adoptable after binding")
	}
	cv, err := fnote.NewVerifierForCosignatureV1(key.Verifier)
	if err != nil {
		t.Fatal(err)
	}
	logV, err := fnote.NewVerifier(l.vkey)
	if err != nil {
		t.Fatal(err)
	}
	cosigned := func(cp []byte, o Outcome) {
		t.Helper()
		if o.Status != 200 {
			t.Fatalf("%d %s", o.Status, o.Body)
		}
		n, err := note.Open(append(bytes.Clone(cp), o.Body...), note.VerifierList(logV, cv))
		if err != nil || len(n.Sigs) != 2 {
			t.Fatalf("the Vault cosignature does not verify: %v\n%s%s", err, cp, o.Body)
		}
	}
	cp3 := l.grow(3)
	cosigned(cp3, w.AddCheckpoint(ctx, body(0, nil, cp3)))
	cp9 := l.grow(6)
	cosigned(cp9, w.AddCheckpoint(ctx, body(3, l.consistency(3, 9), cp9)))
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}

	// Restarted with the same Vault key: the state carries on.
	w, err = NewWitness(ctx, WitnessOptions{Key: v.mustOpen("witness"), Logs: []string{l.vkey}, Path: path})
	if err != nil {
		t.Fatalf("restart with the bound Vault key: %v", err)
	}
	if o := w.AddCheckpoint(ctx, body(0, nil, cp9)); o.Status != 409 || string(o.Body) != "9\n" {
		t.Fatalf("after restart: %d %q, want 409 9", o.Status, o.Body)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}

	// Another Vault key, or the same name deleted and created again, is
	// another witness: the state made for the first refuses it.
	if _, err := NewWitness(ctx, WitnessOptions{Key: v.mustOpen("other"), Logs: []string{l.vkey}, Path: path}); err == nil || !strings.Contains(err.Error(), "was made for the witness key") {
		t.Fatalf("restart with another Vault key: %v", err)
	}
	v.write("keys/witness/config", map[string]any{"deletion_allowed": true})
	if _, err := v.admin.Logical().Delete("transit/keys/witness"); err != nil {
		t.Fatal(err)
	}
	v.write("keys/witness", map[string]any{"type": "ed25519"})
	if _, err := NewWitness(ctx, WitnessOptions{Key: v.mustOpen("witness"), Logs: []string{l.vkey}, Path: path}); err == nil || !strings.Contains(err.Error(), "was made for the witness key") {
		t.Fatalf("restart with a key created again under the same name: %v", err)
	}
}

// TestVaultKeyRotationRefuses: once the Transit key rotates, the witness
// stops cosigning (the peers pin the old version's vkey) and stores
// nothing; a restart then meets a state bound to the old key. A key
// deleted and created again under the same name is refused mid-flight
// too.
func TestVaultKeyRotationRefuses(t *testing.T) {
	v := newTestVault(t)
	v.write("keys/witness", map[string]any{"type": "ed25519"})
	l := newPlainLog(t)
	path := filepath.Join(t.TempDir(), "witness.db")
	ctx := context.Background()
	key := v.mustOpen("witness")
	w, err := NewWitness(ctx, WitnessOptions{Key: key, Logs: []string{l.vkey}, Path: path})
	if err != nil {
		t.Fatal(err)
	}
	cp2 := l.grow(2)
	if o := w.AddCheckpoint(ctx, body(0, nil, cp2)); o.Status != 200 {
		t.Fatalf("%d %s", o.Status, o.Body)
	}

	v.write("keys/witness/rotate", nil)
	text := []byte("example.com/log\n1\n" + base64.StdEncoding.EncodeToString(make([]byte, 32)) + "\n")
	if _, err := key.Signer.Sign(text); err == nil || !strings.Contains(err.Error(), "the witness key rotated") ||
		!strings.Contains(err.Error(), "region.witness_kms.key_id") || !strings.Contains(err.Error(), "pin") {
		t.Fatalf("signing after a rotation: %v", err)
	}
	cp5 := l.grow(3)
	if o := w.AddCheckpoint(ctx, body(2, l.consistency(2, 5), cp5)); o.Status != 500 {
		t.Fatalf("a push after the rotation: %d %s (want 500: no cosignature)", o.Status, o.Body)
	}
	if latest, err := w.Latest(ctx, testOrigin); err != nil || !bytes.HasPrefix(latest, cp2) {
		t.Fatalf("a refused cosignature moved the state: %v\n%s", err, latest)
	}
	// Restarted, the key's latest version is another vkey.
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := NewWitness(ctx, WitnessOptions{Key: v.mustOpen("witness"), Logs: []string{l.vkey}, Path: path}); err == nil || !strings.Contains(err.Error(), "was made for the witness key") {
		t.Fatalf("a restart with the rotated key: %v", err)
	}

	// Deleted and created again under the same name, mid-flight.
	v.write("keys/again", map[string]any{"type": "ed25519"})
	again := v.mustOpen("again")
	v.write("keys/again/config", map[string]any{"deletion_allowed": true})
	if _, err := v.admin.Logical().Delete("transit/keys/again"); err != nil {
		t.Fatal(err)
	}
	v.write("keys/again", map[string]any{"type": "ed25519"})
	if _, err := again.Signer.Sign(text); err == nil || !strings.Contains(err.Error(), "not the one this region started with") {
		t.Fatalf("signing with a key created again: %v", err)
	}
}

// TestVaultKeyRefused: what is not one non-derived ed25519 key is refused
// at start with an error naming region.witness_kms.key_id, and no error
// carries the token.
func TestVaultKeyRefused(t *testing.T) {
	v := newTestVault(t)
	v.write("keys/ec", map[string]any{"type": "ecdsa-p256"})
	v.write("keys/aes", map[string]any{"type": "aes256-gcm96"})
	v.write("keys/derived", map[string]any{"type": "ed25519", "derived": true})
	v.write("keys/ok", map[string]any{"type": "ed25519"})
	for key, want := range map[string]string{
		"ec":      `region.witness_kms.key_id "ec": a Transit key of type "ecdsa-p256"; the witness cosignature (tlog-cosignature/v1) needs an ed25519 key`,
		"aes":     `region.witness_kms.key_id "aes": a Transit key of type "aes256-gcm96"`,
		"derived": `region.witness_kms.key_id "derived": a derived ed25519 key`,
		"missing": `region.witness_kms.key_id "missing": no such key under the Transit mount "transit"`,
	} {
		if _, err := v.open(key); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v\nwant %s", key, err, want)
		}
	}
	_, err := OpenVaultKey(context.Background(), VaultKeyConfig{Address: v.url, Token: testVaultToken + "x", Key: "ok", Name: "us-east"})
	if err == nil || !strings.Contains(err.Error(), "permission denied") || strings.Contains(err.Error(), testVaultToken) {
		t.Fatalf("a wrong token: %v", err)
	}
	_, err = OpenVaultKey(context.Background(), VaultKeyConfig{Address: v.url, Token: testVaultToken, Mount: "elsewhere", Key: "ok", Name: "us-east"})
	if err == nil || !strings.Contains(err.Error(), `no such key under the Transit mount "elsewhere"`) {
		t.Fatalf("another mount: %v", err)
	}
	t.Setenv("VAULT_TOKEN", "")
	if _, err := OpenVaultKey(context.Background(), VaultKeyConfig{Address: v.url, Key: "ok", Name: "us-east"}); err == nil || !strings.Contains(err.Error(), "set VAULT_TOKEN") {
		t.Fatalf("no token: %v", err)
	}
	t.Setenv("VAULT_TOKEN", testVaultToken) // what the server does: the token from the environment
	if _, err := OpenVaultKey(context.Background(), VaultKeyConfig{Address: v.url, Key: "ok", Name: "us-east"}); err != nil {
		t.Fatalf("the token from VAULT_TOKEN: %v", err)
	}
	if _, err := OpenVaultKey(context.Background(), VaultKeyConfig{Address: v.url, Token: testVaultToken, Key: "ok", Name: "us east"}); err == nil || !strings.Contains(err.Error(), "region.name") {
		t.Fatalf("a name that cannot name a key: %v", err)
	}
}
