package kms

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"strconv"
	"strings"
	"time"

	vault "github.com/hashicorp/vault/api"
)

// VaultConfig names a Vault Transit key.
type VaultConfig struct {
	Address string
	Token   string
	Mount   string // default "transit"
	Key     string
	Timeout time.Duration // per call (default 5 s)
}

// Vault signs with a HashiCorp Vault Transit key (ed25519 or ecdsa-p256),
// pinned to the key version that was latest when it was opened: the
// public key published is the one that signs.
type Vault struct {
	client  *vault.Client
	cfg     VaultConfig
	version int
	alg     Algorithm
	pub     crypto.PublicKey
}

// OpenVault reads the key's latest version and its public key.
func OpenVault(ctx context.Context, c VaultConfig) (*Vault, error) {
	if c.Mount == "" {
		c.Mount = "transit"
	}
	if c.Timeout <= 0 {
		c.Timeout = 5 * time.Second
	}
	vc := vault.DefaultConfig()
	vc.Address = c.Address
	vc.Timeout = c.Timeout
	vc.MaxRetries = 4 // the client backs off on 412/429/5xx
	client, err := vault.NewClient(vc)
	if err != nil {
		return nil, fmt.Errorf("vault-transit key %s: %w", c.Key, err)
	}
	client.SetToken(c.Token)
	v := &Vault{client: client, cfg: c}
	return v, v.load(ctx)
}

func (v *Vault) path(parts ...string) string {
	return v.cfg.Mount + "/" + strings.Join(parts, "/")
}

// load reads type, latest version and that version's public key.
func (v *Vault) load(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, v.cfg.Timeout)
	defer cancel()
	s, err := v.client.Logical().ReadWithContext(ctx, v.path("keys", v.cfg.Key))
	if err != nil {
		return fmt.Errorf("vault-transit key %s: read: %w", v.cfg.Key, err)
	}
	if s == nil {
		return fmt.Errorf("vault-transit key %s: no such key under %s", v.cfg.Key, v.cfg.Mount)
	}
	typ, _ := s.Data["type"].(string)
	latest, err := intOf(s.Data["latest_version"])
	if err != nil {
		return fmt.Errorf("vault-transit key %s: latest_version: %w", v.cfg.Key, err)
	}
	keys, _ := s.Data["keys"].(map[string]any)
	entry, _ := keys[strconv.Itoa(latest)].(map[string]any)
	pubStr, _ := entry["public_key"].(string)
	switch typ {
	case "ed25519":
		raw, err := base64.StdEncoding.DecodeString(pubStr)
		if err != nil || len(raw) != ed25519.PublicKeySize {
			return fmt.Errorf("vault-transit key %s v%d: bad ed25519 public key", v.cfg.Key, latest)
		}
		v.alg, v.pub = Ed25519, ed25519.PublicKey(raw)
	case "ecdsa-p256":
		blk, _ := pem.Decode([]byte(pubStr))
		if blk == nil {
			return fmt.Errorf("vault-transit key %s v%d: public key is not PEM", v.cfg.Key, latest)
		}
		k, err := x509.ParsePKIXPublicKey(blk.Bytes)
		if err != nil {
			return fmt.Errorf("vault-transit key %s v%d: %w", v.cfg.Key, latest, err)
		}
		ek, ok := k.(*ecdsa.PublicKey)
		if !ok {
			return fmt.Errorf("vault-transit key %s v%d: %T, want ECDSA", v.cfg.Key, latest, k)
		}
		v.alg, v.pub = ECDSAP256SHA256, ek
	default:
		return fmt.Errorf("vault-transit key %s: type %q is not supported (want ed25519 or ecdsa-p256)", v.cfg.Key, typ)
	}
	v.version = latest
	return nil
}

func intOf(x any) (int, error) { return VaultInt(x) }

// VaultInt reads a number from a Vault API answer (json.Number or
// float64, as the client decodes it).
func VaultInt(x any) (int, error) {
	switch n := x.(type) {
	case json.Number:
		i, err := n.Int64()
		return int(i), err
	case float64:
		return int(n), nil
	case int:
		return n, nil
	}
	return 0, fmt.Errorf("%v is not a number", x)
}

// VaultSignature splits a Transit signature "vault:v<N>:<base64>" into
// its key version and base64 part; ok is false for anything else.
func VaultSignature(sig string) (version int, b64 string, ok bool) {
	parts := strings.SplitN(sig, ":", 3)
	if len(parts) != 3 || parts[0] != "vault" || !strings.HasPrefix(parts[1], "v") {
		return 0, "", false
	}
	n, err := strconv.Atoi(parts[1][1:])
	if err != nil {
		return 0, "", false
	}
	return n, parts[2], true
}

// Sign signs msg with the pinned key version.
func (v *Vault) Sign(ctx context.Context, msg []byte) ([]byte, error) {
	data := map[string]any{"input": base64.StdEncoding.EncodeToString(msg), "key_version": v.version}
	p := v.path("sign", v.cfg.Key)
	if v.alg == ECDSAP256SHA256 {
		p = v.path("sign", v.cfg.Key, "sha2-256")
		data["marshaling_algorithm"] = "asn1"
	}
	ctx, cancel := context.WithTimeout(ctx, v.cfg.Timeout)
	defer cancel()
	s, err := v.client.Logical().WriteWithContext(ctx, p, data)
	if err != nil {
		return nil, fmt.Errorf("vault-transit key %s: sign: %w", v.cfg.Key, err)
	}
	sig, _ := s.Data["signature"].(string)
	return v.parseSignature(sig)
}

// parseSignature strips "vault:vN:" and checks N is the pinned version.
func (v *Vault) parseSignature(sig string) ([]byte, error) {
	n, b64, ok := VaultSignature(sig)
	if !ok {
		return nil, fmt.Errorf("vault-transit key %s: signature %q is not vault:vN:…", v.cfg.Key, sig)
	}
	if n != v.version {
		return nil, fmt.Errorf("vault-transit key %s: signed with version v%d, want v%d", v.cfg.Key, n, v.version)
	}
	return base64.StdEncoding.DecodeString(b64)
}

// Latest returns a signer pinned to the key's latest version.
func (v *Vault) Latest(ctx context.Context) (Signer, error) {
	next := &Vault{client: v.client, cfg: v.cfg}
	if err := next.load(ctx); err != nil {
		return nil, err
	}
	if next.version == v.version {
		return v, nil
	}
	return next, nil
}

// Public returns the pinned version's public key.
func (v *Vault) Public() crypto.PublicKey { return v.pub }

// KeyID is "vault:<mount>/<key>:v<N>".
func (v *Vault) KeyID() string {
	return fmt.Sprintf("vault:%s/%s:v%d", v.cfg.Mount, v.cfg.Key, v.version)
}

// Algorithm is the signature scheme.
func (v *Vault) Algorithm() Algorithm { return v.alg }
