package receipt

import (
	"crypto/ed25519"
	"encoding/json"
	"os"
	"testing"
)

// signKR1 signs a token as knhk did before batches (kr1): the tests that
// old tokens and old journals keep working need one.
func signKR1(id [16]byte, leaf [32]byte, keyID [8]byte, key ed25519.PrivateKey) Token {
	t := Token{ID: id, LeafHash: leaf, KeyID: keyID}
	copy(t.Signature[:], ed25519.Sign(key, kr1Message(leaf)))
	return t
}

// kr1Record is a journal record as knhk wrote it before batches.
func kr1Record(t Token, enc []byte) []byte {
	b := append(append([]byte{}, t.KeyID[:]...), t.Signature[:]...)
	return append(b, enc...)
}

// TestKR1BundleStillVerifies: a bundle and keys served by knhk before
// batches (testdata/kr1, made with that version) verify with this one, and
// changing its token's signature fails the signature check.
func TestKR1BundleStillVerifies(t *testing.T) {
	var b Bundle
	var k PublishedKeys
	for p, v := range map[string]any{"testdata/kr1/bundle.json": &b, "testdata/kr1/keys.json": &k} {
		raw, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(raw, v); err != nil {
			t.Fatal(err)
		}
	}
	if name, bad := failed(Verify(b, k)); bad {
		t.Fatalf("kr1 bundle failed at %s: %v", name, Verify(b, k))
	}
	tok, err := ParseToken(b.Token)
	if err != nil || tok.Batched {
		t.Fatalf("kr1 token parsed as %+v, %v", tok, err)
	}
	tok.Signature[0] ^= 1
	b.Token = tok.String()
	if name, bad := failed(Verify(b, k)); !bad || name != "signature" {
		t.Fatalf("a kr1 token with a changed signature failed at %q (failed %v), want signature", name, bad)
	}
}
