package region

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	vault "github.com/hashicorp/vault/api"
	fnote "github.com/transparency-dev/formats/note"
	"golang.org/x/mod/sumdb/note"

	"github.com/knhk/knhk/pkg/kms"
)

// VaultKeyConfig names the Vault Transit ed25519 key that cosigns for this
// region (region.witness_kms).
type VaultKeyConfig struct {
	Address string // the Vault server
	// Token authenticates to Vault. Empty: the VAULT_TOKEN environment
	// variable, which the vault/api client reads itself.
	Token string
	Mount string // the Transit mount (default "transit")
	Key   string // the Transit key's name
	// Name is the cosigner's name in its signatures and vkey: region.name.
	Name string
	// Timeout bounds one whole cosignature, key check and sign together
	// (default 5 s). The witness library signs inside its state
	// transaction, so this is also the longest a slow Vault holds it.
	Timeout time.Duration
}

// vaultKeyField is the config key errors name for the Transit key.
const vaultKeyField = "region.witness_kms.key_id"

// OpenVaultKey reads the Transit key, which must be a non-derived ed25519
// key, and returns a Cosigner pinned to its latest version: its vkey is
// that version's public key, and each signature is made with that version
// (key_version) and checked against it before it is returned.
//
// knhk never creates a Vault key, so it cannot tell a first start from a
// lost witness state: a witness state that records no key adopts this one
// (Created is set), and a state made for another key (another Transit key,
// a rotated one, or one deleted and created again under the same name) is
// refused exactly as for a key file.
func OpenVaultKey(ctx context.Context, c VaultKeyConfig) (*Cosigner, error) {
	c.Mount = strings.Trim(c.Mount, "/")
	if c.Mount == "" {
		c.Mount = "transit"
	}
	if c.Timeout <= 0 {
		c.Timeout = 5 * time.Second
	}
	vc := vault.DefaultConfig()
	if vc.Error != nil {
		return nil, fmt.Errorf("region.witness_kms: the Vault client's environment: %w", vc.Error)
	}
	vc.Address = c.Address
	vc.Timeout = c.Timeout
	vc.MaxRetries = 2 // the client backs off on 412/429/5xx, within Timeout
	client, err := vault.NewClient(vc)
	if err != nil {
		return nil, fmt.Errorf("region.witness_kms.endpoint %q: %w", c.Address, err)
	}
	if c.Token != "" {
		client.SetToken(c.Token)
	}
	if client.Token() == "" {
		return nil, errors.New("region.witness_kms: no Vault token: set VAULT_TOKEN")
	}
	s := &vaultSigner{client: client, cfg: c}
	rctx, cancel := context.WithTimeout(ctx, c.Timeout)
	defer cancel()
	k, err := s.read(rctx)
	if err != nil {
		return nil, err
	}
	s.version, s.pub = k.latest, k.pub[k.latest]
	vkey, err := note.NewEd25519VerifierKey(c.Name, s.pub)
	if err != nil {
		return nil, fmt.Errorf("region.name %q: %w", c.Name, err)
	}
	if vkey, err = fnote.VKeyToCosignatureV1(vkey); err != nil {
		return nil, fmt.Errorf("region.name %q: %w", c.Name, err)
	}
	// formats' own verifier gives the key hash (the cosignature/v1 key ID:
	// SHA-256 of name, newline, 0x04 and the public key) and checks each
	// signature before it goes out.
	v, err := fnote.NewVerifierForCosignatureV1(vkey)
	if err != nil {
		return nil, fmt.Errorf("region.name %q: %w", c.Name, err)
	}
	s.verifier = v
	return &Cosigner{Signer: s, Verifier: vkey, Created: true}, nil
}

// vaultSigner is a tlog-cosignature/v1 note.Signer whose Ed25519 key is
// in Vault Transit. It is immutable after OpenVaultKey, so safe for
// concurrent use.
type vaultSigner struct {
	client   *vault.Client
	cfg      VaultKeyConfig
	version  int               // pinned: the latest when opened
	pub      ed25519.PublicKey // the pinned version's
	verifier note.Verifier
}

var _ note.Signer = (*vaultSigner)(nil)

// Name implements [note.Signer.Name]: region.name.
func (s *vaultSigner) Name() string { return s.cfg.Name }

// KeyHash implements [note.Signer.KeyHash]: the cosignature/v1 key ID.
func (s *vaultSigner) KeyHash() uint32 { return s.verifier.KeyHash() }

// errWitnessKeyRotated: the Transit key moved past the version this
// region's peers pinned.
var errWitnessKeyRotated = errors.New("the witness key rotated in Vault")

// Sign implements [note.Signer.Sign] as formats' NewSignerForCosignatureV1
// does: it signs "cosignature/v1\ntime <t>\n" followed by the note text,
// and returns the 8-byte big-endian t followed by the Ed25519 signature.
// It refuses once the key has rotated in Vault (a rotated witness key
// needs the peers re-pinned) or no longer matches the pinned public key.
func (s *vaultSigner) Sign(msg []byte) ([]byte, error) {
	// The same check as formats' message formatting.
	if len(bytes.Split(msg, []byte("\n"))) < 3 {
		return nil, errors.New("cosigned note format invalid")
	}
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.Timeout)
	defer cancel()
	k, err := s.read(ctx)
	if err != nil {
		return nil, err
	}
	if k.latest != s.version {
		return nil, fmt.Errorf("%s %q: %w (v%d is the latest; this region cosigns with v%d, the key its peers pin), so it no longer cosigns: a rotated witness key is a new witness, which the peers must pin (its new witness_verifier_key) and which needs a new witness.db (the old one is bound to the old key)",
			vaultKeyField, s.cfg.Key, errWitnessKeyRotated, k.latest, s.version)
	}
	if !bytes.Equal(k.pub[s.version], s.pub) {
		return nil, fmt.Errorf("%s %q: v%d's public key is not the one this region started with (the key was deleted and created again?): it does not cosign with another key", vaultKeyField, s.cfg.Key, s.version)
	}
	t := uint64(time.Now().Unix())
	m := fmt.Appendf(nil, "cosignature/v1\ntime %d\n%s", t, msg)
	sec, err := s.client.Logical().WriteWithContext(ctx, s.cfg.Mount+"/sign/"+s.cfg.Key, map[string]any{
		"input": base64.StdEncoding.EncodeToString(m), "key_version": s.version,
	})
	if err != nil {
		return nil, fmt.Errorf("region.witness_kms: Vault sign with key %q: %w", s.cfg.Key, err)
	}
	if sec == nil {
		return nil, fmt.Errorf("%s %q: sign: Vault answered no data", vaultKeyField, s.cfg.Key)
	}
	raw, err := s.parseSignature(sec.Data)
	if err != nil {
		return nil, err
	}
	sig := binary.BigEndian.AppendUint64(make([]byte, 0, 8+ed25519.SignatureSize), t)
	sig = append(sig, raw...)
	if !s.verifier.Verify(msg, sig) {
		return nil, fmt.Errorf("%s %q: Vault's signature does not verify under the witness key (v%d): not sent", vaultKeyField, s.cfg.Key, s.version)
	}
	return sig, nil
}

// parseSignature takes the Ed25519 signature out of "vault:v<N>:<base64>",
// checking N (and key_version, which newer Vaults also answer) is the
// pinned version.
func (s *vaultSigner) parseSignature(data map[string]any) ([]byte, error) {
	str, _ := data["signature"].(string)
	n, b64, ok := kms.VaultSignature(str)
	if !ok {
		return nil, fmt.Errorf("%s %q: sign: the signature is not vault:v<N>:<base64>", vaultKeyField, s.cfg.Key)
	}
	if n != s.version {
		return nil, fmt.Errorf("%s %q: sign: signed with version v%d, want v%d", vaultKeyField, s.cfg.Key, n, s.version)
	}
	if kv, ok := data["key_version"]; ok {
		if n, err := kms.VaultInt(kv); err != nil || n != s.version {
			return nil, fmt.Errorf("%s %q: sign: key_version %v, want %d", vaultKeyField, s.cfg.Key, kv, s.version)
		}
	}
	raw, err := base64.StdEncoding.DecodeString(b64)
	if err != nil || len(raw) != ed25519.SignatureSize {
		return nil, fmt.Errorf("%s %q: sign: not a %d-byte Ed25519 signature", vaultKeyField, s.cfg.Key, ed25519.SignatureSize)
	}
	return raw, nil
}

// transitKey is what a Transit key read says about an ed25519 key.
type transitKey struct {
	latest int
	pub    map[int]ed25519.PublicKey // by version
}

// read reads the key (GET /v1/<mount>/keys/<name>) and checks it is a
// non-derived ed25519 key whose latest version has a public key.
func (s *vaultSigner) read(ctx context.Context) (transitKey, error) {
	name := s.cfg.Key
	sec, err := s.client.Logical().ReadWithContext(ctx, s.cfg.Mount+"/keys/"+name)
	if err != nil {
		return transitKey{}, fmt.Errorf("region.witness_kms: Vault read of key %q: %w", name, err)
	}
	if sec == nil || sec.Data == nil {
		return transitKey{}, fmt.Errorf("%s %q: no such key under the Transit mount %q", vaultKeyField, name, s.cfg.Mount)
	}
	if typ, _ := sec.Data["type"].(string); typ != "ed25519" {
		return transitKey{}, fmt.Errorf("%s %q: a Transit key of type %q; the witness cosignature (tlog-cosignature/v1) needs an ed25519 key (vault write %s/keys/<name> type=ed25519)", vaultKeyField, name, typ, s.cfg.Mount)
	}
	if derived, _ := sec.Data["derived"].(bool); derived {
		return transitKey{}, fmt.Errorf("%s %q: a derived ed25519 key has a public key per context; the witness needs one key (create it without derived=true)", vaultKeyField, name)
	}
	latest, err := kms.VaultInt(sec.Data["latest_version"])
	if err != nil || latest < 1 {
		return transitKey{}, fmt.Errorf("%s %q: latest_version %v is not a version", vaultKeyField, name, sec.Data["latest_version"])
	}
	keys, _ := sec.Data["keys"].(map[string]any)
	k := transitKey{latest: latest, pub: make(map[int]ed25519.PublicKey, len(keys))}
	for ver, e := range keys {
		n, err := strconv.Atoi(ver)
		entry, _ := e.(map[string]any)
		if err != nil || entry == nil {
			continue
		}
		b64, _ := entry["public_key"].(string)
		raw, err := base64.StdEncoding.DecodeString(b64)
		if err != nil || len(raw) != ed25519.PublicKeySize {
			continue
		}
		k.pub[n] = ed25519.PublicKey(raw)
	}
	if k.pub[latest] == nil {
		return transitKey{}, fmt.Errorf("%s %q: v%d has no ed25519 public key in Vault's answer", vaultKeyField, name, latest)
	}
	return k, nil
}
