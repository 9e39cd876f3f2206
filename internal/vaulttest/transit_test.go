package vaulttest

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	vault "github.com/hashicorp/vault/api"
)

func client(t *testing.T, s *Server) *vault.Client {
	t.Helper()
	srv := httptest.NewServer(s)
	t.Cleanup(srv.Close)
	c, err := vault.NewClient(&vault.Config{Address: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	c.SetToken(s.Token)
	return c
}

func num(t *testing.T, x any) int64 {
	t.Helper()
	n, err := x.(json.Number).Int64()
	if err != nil {
		t.Fatalf("%v (%T) is not a JSON number", x, x)
	}
	return n
}

func entry(t *testing.T, data map[string]any, version string) map[string]any {
	t.Helper()
	keys, ok := data["keys"].(map[string]any)
	if !ok {
		t.Fatalf("keys is %T, want a map of versions", data["keys"])
	}
	e, ok := keys[version].(map[string]any)
	if !ok {
		t.Fatalf("keys[%s] is %T, want an object", version, keys[version])
	}
	return e
}

// TestReadKeyShapes: a key read answers what Vault's formatKeyPolicy
// does, per type: base64 ed25519 public keys, PEM ECDSA ones, creation
// times for a symmetric key, and no public key for a derived ed25519 key.
func TestReadKeyShapes(t *testing.T) {
	c := client(t, New("root"))
	for name, body := range map[string]map[string]any{
		"ed": {"type": "ed25519"}, "ec": {"type": "ecdsa-p256"}, "aes": {"type": "aes256-gcm96"}, "derived": {"type": "ed25519", "derived": true},
	} {
		if _, err := c.Logical().Write("transit/keys/"+name, body); err != nil {
			t.Fatal(err)
		}
	}
	ed, err := c.Logical().Read("transit/keys/ed")
	if err != nil {
		t.Fatal(err)
	}
	if ed.Data["type"] != "ed25519" || ed.Data["derived"] != false || ed.Data["supports_signing"] != true || num(t, ed.Data["latest_version"]) != 1 {
		t.Fatalf("ed25519 key: %v", ed.Data)
	}
	e := entry(t, ed.Data, "1")
	pub, err := base64.StdEncoding.DecodeString(e["public_key"].(string))
	if err != nil || len(pub) != ed25519.PublicKeySize || e["name"] != "ed25519" || e["creation_time"] == "" {
		t.Fatalf("ed25519 version entry: %v (%v)", e, err)
	}

	ec, err := c.Logical().Read("transit/keys/ec")
	if err != nil {
		t.Fatal(err)
	}
	e = entry(t, ec.Data, "1")
	blk, _ := pem.Decode([]byte(e["public_key"].(string)))
	if blk == nil || e["name"] != "P-256" {
		t.Fatalf("ecdsa version entry: %v", e)
	}
	if k, err := x509.ParsePKIXPublicKey(blk.Bytes); err != nil {
		t.Fatal(err)
	} else if _, ok := k.(*ecdsa.PublicKey); !ok {
		t.Fatalf("%T", k)
	}

	aes, err := c.Logical().Read("transit/keys/aes")
	if err != nil {
		t.Fatal(err)
	}
	if aes.Data["supports_signing"] != false {
		t.Fatalf("aes key: %v", aes.Data)
	}
	if created := num(t, aes.Data["keys"].(map[string]any)["1"]); created <= 0 {
		t.Fatalf("aes version 1 created at %d", created)
	}

	der, err := c.Logical().Read("transit/keys/derived")
	if err != nil {
		t.Fatal(err)
	}
	if der.Data["derived"] != true || entry(t, der.Data, "1")["public_key"] != "" {
		t.Fatalf("derived key: %v", der.Data)
	}

	if s, err := c.Logical().Read("transit/keys/missing"); s != nil || err != nil {
		t.Fatalf("a missing key reads as nil, nil: %v %v", s, err)
	}
}

// TestSignEd25519: input is base64, key_version pins the version, the
// answer is vault:v<N>:<base64> with key_version, and an ed25519
// signature is pure Ed25519 over the input.
func TestSignEd25519(t *testing.T) {
	c := client(t, New("root"))
	if _, err := c.Logical().Write("transit/keys/w", map[string]any{"type": "ed25519", "exportable": true}); err != nil {
		t.Fatal(err)
	}
	msg := []byte("cosignature/v1\ntime 1\nexample.com/log\n1\nAAAA\n")
	in := base64.StdEncoding.EncodeToString(msg)
	sign := func(body map[string]any) (string, int64) {
		t.Helper()
		s, err := c.Logical().Write("transit/sign/w", body)
		if err != nil {
			t.Fatal(err)
		}
		return s.Data["signature"].(string), num(t, s.Data["key_version"])
	}
	sig1, v := sign(map[string]any{"input": in})
	if v != 1 || !strings.HasPrefix(sig1, "vault:v1:") {
		t.Fatalf("latest: %s v%d", sig1, v)
	}
	if _, err := c.Logical().Write("transit/keys/w/rotate", nil); err != nil {
		t.Fatal(err)
	}
	if sig, v := sign(map[string]any{"input": in}); v != 2 || !strings.HasPrefix(sig, "vault:v2:") {
		t.Fatalf("after rotation, latest: %s v%d", sig, v)
	}
	pinned, v := sign(map[string]any{"input": in, "key_version": 1})
	if v != 1 || pinned != sig1 {
		t.Fatalf("pinned to v1: %s v%d, want %s (Ed25519 is deterministic)", pinned, v, sig1)
	}

	// The signature is Ed25519 over the input itself, under the key the
	// read publishes (and the export hands out).
	k, err := c.Logical().Read("transit/keys/w")
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := base64.StdEncoding.DecodeString(entry(t, k.Data, "1")["public_key"].(string))
	if num(t, k.Data["latest_version"]) != 2 || entry(t, k.Data, "2")["public_key"] == entry(t, k.Data, "1")["public_key"] {
		t.Fatalf("after rotation: %v", k.Data)
	}
	raw, _ := base64.StdEncoding.DecodeString(strings.TrimPrefix(sig1, "vault:v1:"))
	if !ed25519.Verify(pub, msg, raw) {
		t.Fatal("the v1 signature does not verify under v1's published public key")
	}
	x, err := c.Logical().Read("transit/export/signing-key/w/1")
	if err != nil {
		t.Fatal(err)
	}
	priv, _ := base64.StdEncoding.DecodeString(x.Data["keys"].(map[string]any)["1"].(string))
	if len(priv) != ed25519.PrivateKeySize || !ed25519.PublicKey(pub).Equal(ed25519.PrivateKey(priv).Public()) {
		t.Fatal("the exported v1 key is not the published one")
	}
	if s, err := c.Logical().Write("transit/verify/w", map[string]any{"input": in, "signature": sig1}); err != nil || s.Data["valid"] != true {
		t.Fatalf("verify: %v %v", s, err)
	}

	if _, err := c.Logical().Write("transit/sign/w", map[string]any{"input": in, "key_version": 3}); !isStatus(err, 400) {
		t.Fatalf("a version past the latest: %v", err)
	}
}

func isStatus(err error, code int) bool {
	var re *vault.ResponseError
	return errors.As(err, &re) && re.StatusCode == code
}

// TestKeyLifecycle: create is an upsert that keeps an existing key,
// deletion needs deletion_allowed, export needs exportable, a key that
// does not sign refuses to, and a wrong token is refused.
func TestKeyLifecycle(t *testing.T) {
	s := New("root")
	s.Mount = "kms/transit"
	c := client(t, s)
	if _, err := c.Logical().Write("kms/transit/keys/w", map[string]any{"type": "ed25519"}); err != nil {
		t.Fatal(err)
	}
	first, _ := c.Logical().Read("kms/transit/keys/w")
	again, err := c.Logical().Write("kms/transit/keys/w", map[string]any{"type": "ecdsa-p256"})
	if err != nil || len(again.Warnings) == 0 || again.Data["type"] != "ed25519" {
		t.Fatalf("create over an existing key: %v %v", again, err)
	}
	if entry(t, again.Data, "1")["public_key"] != entry(t, first.Data, "1")["public_key"] {
		t.Fatal("create replaced an existing key")
	}
	if _, err := c.Logical().Read("kms/transit/export/signing-key/w"); !isStatus(err, 400) {
		t.Fatalf("export of a key that is not exportable: %v", err)
	}
	if _, err := c.Logical().Delete("kms/transit/keys/w"); !isStatus(err, 400) {
		t.Fatalf("delete without deletion_allowed: %v", err)
	}
	if _, err := c.Logical().Write("kms/transit/keys/w/config", map[string]any{"deletion_allowed": true}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Logical().Delete("kms/transit/keys/w"); err != nil {
		t.Fatal(err)
	}
	if k, err := c.Logical().Read("kms/transit/keys/w"); k != nil || err != nil {
		t.Fatalf("a deleted key still reads: %v %v", k, err)
	}
	if _, err := c.Logical().Write("kms/transit/keys/aes", map[string]any{"type": "aes256-gcm96"}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Logical().Write("kms/transit/sign/aes", map[string]any{"input": "AA=="}); !isStatus(err, 400) || !strings.Contains(err.Error(), "does not support signing") {
		t.Fatalf("signing with an aes key: %v", err)
	}
	if k, err := c.Logical().Read("transit/keys/aes"); k != nil || err != nil { // a 404: the client answers nil, nil
		t.Fatalf("the default mount is served when Mount is set: %v %v", k, err)
	}
	c.SetToken("wrong")
	if _, err := c.Logical().Read("kms/transit/keys/aes"); !isStatus(err, http.StatusForbidden) {
		t.Fatalf("a wrong token: %v", err)
	}
}
