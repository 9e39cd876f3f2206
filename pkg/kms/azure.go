package kms

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/sha256"
	"errors"
	"fmt"
	"math/big"
	"net/http"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/azidentity"
	"github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys"
	"golang.org/x/crypto/cryptobyte"
	"golang.org/x/crypto/cryptobyte/asn1"
)

// AzureConfig names an Azure Key Vault key.
type AzureConfig struct {
	VaultURL string // https://<vault>.vault.azure.net/
	Key      string // key name; its latest version is pinned at open
	// Credential defaults to azidentity's DefaultAzureCredential
	// (environment, workload identity, managed identity, Azure CLI).
	Credential azcore.TokenCredential
	// HTTPClient replaces the transport (tests: trust an emulator's
	// certificate). Nil uses the SDK's.
	HTTPClient *http.Client
	// DisableChallengeResourceVerification lets the vault's auth challenge
	// name a resource outside *.vault.azure.net (emulators).
	DisableChallengeResourceVerification bool
	Timeout                              time.Duration // per call (default 5 s)
}

// Azure signs with an Azure Key Vault EC P-256 key (ES256 over a SHA-256
// digest), pinned to one key version.
type Azure struct {
	client  *azkeys.Client
	cfg     AzureConfig
	version string
	pub     *ecdsa.PublicKey
}

// OpenAzure connects and pins the key's latest version.
func OpenAzure(ctx context.Context, c AzureConfig) (*Azure, error) {
	if c.VaultURL == "" || c.Key == "" {
		return nil, errors.New("azure-key-vault: the vault URL and the key name are required")
	}
	if c.Timeout <= 0 {
		c.Timeout = 5 * time.Second
	}
	if c.Credential == nil {
		cred, err := azidentity.NewDefaultAzureCredential(nil)
		if err != nil {
			return nil, fmt.Errorf("azure-key-vault key %s: credentials: %w", c.Key, err)
		}
		c.Credential = cred
	}
	opts := &azkeys.ClientOptions{DisableChallengeResourceVerification: c.DisableChallengeResourceVerification}
	// The SDK retries throttling (429) and 5xx with exponential backoff.
	opts.Retry = policy.RetryOptions{MaxRetries: 4, RetryDelay: 200 * time.Millisecond, MaxRetryDelay: 2 * time.Second}
	if c.HTTPClient != nil {
		opts.Transport = c.HTTPClient
	}
	client, err := azkeys.NewClient(c.VaultURL, c.Credential, opts)
	if err != nil {
		return nil, fmt.Errorf("azure-key-vault key %s: %w", c.Key, err)
	}
	return loadAzure(ctx, client, c)
}

// loadAzure reads the key's latest version and its public key.
func loadAzure(ctx context.Context, client *azkeys.Client, c AzureConfig) (*Azure, error) {
	cctx, cancel := context.WithTimeout(ctx, c.Timeout)
	defer cancel()
	resp, err := client.GetKey(cctx, c.Key, "", nil)
	if err != nil {
		return nil, fmt.Errorf("azure-key-vault key %s: get key: %w", c.Key, err)
	}
	k := resp.Key
	if k == nil || k.KID == nil {
		return nil, fmt.Errorf("azure-key-vault key %s: the vault returned no key", c.Key)
	}
	if k.Kty == nil || (*k.Kty != azkeys.KeyTypeEC && *k.Kty != azkeys.KeyTypeECHSM) || k.Crv == nil || *k.Crv != azkeys.CurveNameP256 {
		return nil, fmt.Errorf("azure-key-vault key %s: want an EC P-256 key (ES256), got kty %v crv %v", c.Key, deref(k.Kty), deref(k.Crv))
	}
	if len(k.X) > 32 || len(k.Y) > 32 {
		return nil, fmt.Errorf("azure-key-vault key %s: public key coordinates of %d and %d bytes", c.Key, len(k.X), len(k.Y))
	}
	pt := make([]byte, 65)
	pt[0] = 4
	copy(pt[33-len(k.X):33], k.X)
	copy(pt[65-len(k.Y):], k.Y)
	pub, err := ecdsa.ParseUncompressedPublicKey(elliptic.P256(), pt) // rejects points off the curve
	if err != nil {
		return nil, fmt.Errorf("azure-key-vault key %s: public key: %w", c.Key, err)
	}
	return &Azure{client: client, cfg: c, version: k.KID.Version(), pub: pub}, nil
}

func deref[T any](p *T) any {
	if p == nil {
		return nil
	}
	return *p
}

// Sign signs SHA-256(msg) with ES256 and returns an ASN.1 DER signature
// (Key Vault returns the JOSE form, r ‖ s).
func (a *Azure) Sign(ctx context.Context, msg []byte) ([]byte, error) {
	d := sha256.Sum256(msg)
	ctx, cancel := context.WithTimeout(ctx, a.cfg.Timeout)
	defer cancel()
	alg := azkeys.SignatureAlgorithmES256
	resp, err := a.client.Sign(ctx, a.cfg.Key, a.version, azkeys.SignParameters{Algorithm: &alg, Value: d[:]}, nil)
	if err != nil {
		return nil, fmt.Errorf("azure-key-vault key %s/%s: sign: %w", a.cfg.Key, a.version, err)
	}
	if len(resp.Result) != 64 {
		return nil, fmt.Errorf("azure-key-vault key %s/%s: ES256 signature of %d bytes, want 64", a.cfg.Key, a.version, len(resp.Result))
	}
	var b cryptobyte.Builder
	b.AddASN1(asn1.SEQUENCE, func(b *cryptobyte.Builder) {
		b.AddASN1BigInt(new(big.Int).SetBytes(resp.Result[:32]))
		b.AddASN1BigInt(new(big.Int).SetBytes(resp.Result[32:]))
	})
	return b.Bytes()
}

// Latest returns a signer pinned to the key's latest version.
func (a *Azure) Latest(ctx context.Context) (Signer, error) {
	next, err := loadAzure(ctx, a.client, a.cfg)
	if err != nil {
		return nil, err
	}
	if next.version == a.version {
		return a, nil
	}
	return next, nil
}

// Public returns the pinned version's public key.
func (a *Azure) Public() crypto.PublicKey { return a.pub }

// KeyID is "azure:<vault URL>keys/<name>/<version>".
func (a *Azure) KeyID() string {
	return fmt.Sprintf("azure:%skeys/%s/%s", withSlash(a.cfg.VaultURL), a.cfg.Key, a.version)
}

func withSlash(u string) string {
	if u != "" && u[len(u)-1] != '/' {
		return u + "/"
	}
	return u
}

// Algorithm is the signature scheme.
func (a *Azure) Algorithm() Algorithm { return ECDSAP256SHA256 }

// DERToJOSE converts an ASN.1 DER ECDSA P-256 signature to r ‖ s (32
// bytes each), the form JOSE and Key Vault use.
func DERToJOSE(der []byte) ([]byte, error) {
	var r, s big.Int
	in := cryptobyte.String(der)
	var seq cryptobyte.String
	if !in.ReadASN1(&seq, asn1.SEQUENCE) || !in.Empty() || !seq.ReadASN1Integer(&r) || !seq.ReadASN1Integer(&s) || !seq.Empty() ||
		r.Sign() <= 0 || s.Sign() <= 0 || r.BitLen() > 256 || s.BitLen() > 256 {
		return nil, errors.New("not an ASN.1 DER P-256 ECDSA signature")
	}
	out := make([]byte, 64)
	r.FillBytes(out[:32])
	s.FillBytes(out[32:])
	return out, nil
}
