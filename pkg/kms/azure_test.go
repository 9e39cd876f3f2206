package kms_test

import (
	"context"
	"crypto/sha256"
	"errors"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys"

	"github.com/knhk/knhk/internal/azkvtest"
	"github.com/knhk/knhk/pkg/kms"
)

// staticToken is a fake credential: the test vault checks the token, not
// Entra ID.
type staticToken string

func (s staticToken) GetToken(context.Context, policy.TokenRequestOptions) (azcore.AccessToken, error) {
	return azcore.AccessToken{Token: string(s), ExpiresOn: time.Now().Add(time.Hour)}, nil
}

// TestAzureKeyVault drives the provider through the real azkeys client
// (bearer challenge, TLS) against the in-repo Key Vault keys API: ES256
// signing, rotation to a new key version (old signatures keep verifying),
// and errors naming the provider and key.
func TestAzureKeyVault(t *testing.T) {
	srv := httptest.NewTLSServer(azkvtest.New("token-1"))
	defer srv.Close()
	ctx := context.Background()
	vaultURL := srv.URL + "/"
	copts := &azkeys.ClientOptions{DisableChallengeResourceVerification: true}
	copts.Transport = srv.Client()
	admin, err := azkeys.NewClient(vaultURL, staticToken("token-1"), copts)
	if err != nil {
		t.Fatal(err)
	}
	kty, crv := azkeys.KeyTypeEC, azkeys.CurveNameP256
	if _, err := admin.CreateKey(ctx, "receipts", azkeys.CreateKeyParameters{Kty: &kty, Curve: &crv}, nil); err != nil {
		t.Fatal(err)
	}
	cfg := kms.AzureConfig{VaultURL: vaultURL, Key: "receipts", Credential: staticToken("token-1"), HTTPClient: srv.Client(),
		DisableChallengeResourceVerification: true}
	a, err := kms.OpenAzure(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if a.Algorithm() != kms.ECDSAP256SHA256 || !strings.HasPrefix(a.KeyID(), "azure:"+vaultURL+"keys/receipts/") {
		t.Fatalf("alg %s, id %s", a.Algorithm(), a.KeyID())
	}
	msg := []byte("checkpoint")
	sig, err := a.Sign(ctx, msg)
	if err != nil {
		t.Fatal(err)
	}
	if err := kms.Verify(a.Algorithm(), a.Public(), msg, sig); err != nil {
		t.Fatalf("Key Vault's signature does not verify locally: %v", err)
	}
	if err := kms.Verify(a.Algorithm(), a.Public(), []byte("other"), sig); !errors.Is(err, kms.ErrBadSignature) {
		t.Fatalf("verified another message: %v", err)
	}

	if same, err := a.Latest(ctx); err != nil || same != kms.Signer(a) {
		t.Fatalf("Latest without rotation: %v, %v", same, err)
	}
	// What an operator or a rotation policy does.
	if _, err := admin.RotateKey(ctx, "receipts", nil); err != nil {
		t.Fatal(err)
	}
	next, err := a.Latest(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if next.KeyID() == a.KeyID() {
		t.Fatal("Latest did not move to the new key version")
	}
	sig2, err := next.Sign(ctx, msg)
	if err != nil {
		t.Fatal(err)
	}
	if err := kms.Verify(next.Algorithm(), next.Public(), msg, sig2); err != nil {
		t.Fatal(err)
	}
	if err := kms.Verify(a.Algorithm(), a.Public(), msg, sig); err != nil {
		t.Fatal("an old-version signature stopped verifying after rotation")
	}
	// The pinned old version still signs (in-flight checkpoints finish).
	if _, err := a.Sign(ctx, msg); err != nil {
		t.Fatal(err)
	}
	// The vault agrees with the DER we built from its r ‖ s.
	d := sha256.Sum256(msg)
	alg := azkeys.SignatureAlgorithmES256
	raw, _ := kms.DERToJOSE(sig)
	vr, err := admin.Verify(ctx, "receipts", strings.TrimPrefix(a.KeyID(), "azure:"+vaultURL+"keys/receipts/"),
		azkeys.VerifyParameters{Algorithm: &alg, Digest: d[:], Signature: raw}, nil)
	if err != nil || vr.Value == nil || !*vr.Value {
		t.Fatalf("vault verify: %v %v", vr.Value, err)
	}

	missing := cfg
	missing.Key = "missing"
	if _, err := kms.OpenAzure(ctx, missing); err == nil || !strings.Contains(err.Error(), "azure-key-vault key missing") || !strings.Contains(err.Error(), "KeyNotFound") {
		t.Fatalf("missing key: %v", err)
	}
	bad := cfg
	bad.Credential = staticToken("wrong")
	if _, err := kms.OpenAzure(ctx, bad); err == nil || !strings.Contains(err.Error(), "azure-key-vault key receipts") || !strings.Contains(err.Error(), "401") {
		t.Fatalf("bad token: %v", err)
	}
}
