package kms_test

import (
	"context"
	"encoding/base64"
	"net/http/httptest"
	"strings"
	"testing"

	vault "github.com/hashicorp/vault/api"

	"github.com/knhk/knhk/internal/vaulttest"
	"github.com/knhk/knhk/pkg/kms"
)

// TestVaultTransit drives the provider through the real vault/api client
// against the in-repo transit server: both key types, signing, rotation
// (old signatures keep verifying with the old version's key) and errors.
func TestVaultTransit(t *testing.T) {
	srv := httptest.NewServer(vaulttest.New("root-token"))
	defer srv.Close()
	ctx := context.Background()
	admin, err := vault.NewClient(&vault.Config{Address: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	admin.SetToken("root-token")
	for _, typ := range []string{"ed25519", "ecdsa-p256"} {
		t.Run(typ, func(t *testing.T) {
			if _, err := admin.Logical().Write("transit/keys/knhk-"+typ, map[string]any{"type": typ}); err != nil {
				t.Fatal(err)
			}
			v, err := kms.OpenVault(ctx, kms.VaultConfig{Address: srv.URL, Token: "root-token", Key: "knhk-" + typ})
			if err != nil {
				t.Fatal(err)
			}
			if !strings.HasSuffix(v.KeyID(), ":v1") {
				t.Fatalf("key id %s", v.KeyID())
			}
			msg := []byte("checkpoint")
			sig, err := v.Sign(ctx, msg)
			if err != nil {
				t.Fatal(err)
			}
			if err := kms.Verify(v.Algorithm(), v.Public(), msg, sig); err != nil {
				t.Fatalf("Vault's signature does not verify locally: %v", err)
			}
			// Vault agrees too.
			s, err := admin.Logical().Write("transit/verify/knhk-"+typ, map[string]any{
				"input": base64.StdEncoding.EncodeToString(msg), "signature": "vault:v1:" + base64.StdEncoding.EncodeToString(sig)})
			if err != nil || s.Data["valid"] != true {
				t.Fatalf("vault verify: %v %v", s, err)
			}
			oldPub, oldID := v.Public(), v.KeyID()
			if same, err := v.Latest(ctx); err != nil || same != kms.Signer(v) {
				t.Fatalf("Latest without rotation: %v, %v (want the same signer)", same, err)
			}
			// What an operator does: vault write -f transit/keys/<key>/rotate.
			if _, err := admin.Logical().Write("transit/keys/knhk-"+typ+"/rotate", nil); err != nil {
				t.Fatal(err)
			}
			if v.KeyID() != oldID {
				t.Fatalf("a signer moved off its pinned version: %s", v.KeyID())
			}
			nv, err := v.Latest(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if !strings.HasSuffix(nv.KeyID(), ":v2") {
				t.Fatalf("Latest after rotation is %s, want v2", nv.KeyID())
			}
			if _, err := v.Sign(ctx, msg); err != nil {
				t.Fatalf("the pinned v1 signer stopped signing after rotation: %v", err)
			}
			sig2, err := nv.Sign(ctx, msg)
			if err != nil {
				t.Fatal(err)
			}
			if err := kms.Verify(nv.Algorithm(), nv.Public(), msg, sig2); err != nil {
				t.Fatal(err)
			}
			if err := kms.Verify(v.Algorithm(), oldPub, msg, sig); err != nil {
				t.Fatal("a v1 signature stopped verifying after rotation")
			}
		})
	}
	_, err = kms.OpenVault(ctx, kms.VaultConfig{Address: srv.URL, Token: "root-token", Key: "missing"})
	if err == nil || !strings.Contains(err.Error(), "vault-transit key missing") {
		t.Fatalf("missing key: %v", err)
	}
	_, err = kms.OpenVault(ctx, kms.VaultConfig{Address: srv.URL, Token: "wrong", Key: "knhk-ed25519"})
	if err == nil || !strings.Contains(err.Error(), "permission denied") {
		t.Fatalf("bad token: %v", err)
	}
}
