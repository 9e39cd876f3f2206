package receipt

import (
	"bytes"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"time"

	fnote "github.com/transparency-dev/formats/note"
	"golang.org/x/mod/sumdb/note"

	"github.com/knhk/knhk/pkg/kms"
)

// Bundle is GET /v1/receipts/{id}: everything needed to verify offline.
type Bundle struct {
	Token   string `json:"token"`
	Receipt []byte `json:"receipt"` // canonical encoding: what is verified
	// Decoded is Receipt's View, for people and scripts; Verify checks it
	// says what Receipt says.
	Decoded    json.RawMessage `json:"decoded,omitempty"`
	Index      uint64          `json:"index"`
	Proof      [][]byte        `json:"inclusion_proof"`
	Checkpoint string          `json:"checkpoint"` // C2SP signed note
	// Pruned: the body was deleted under receipts.retention. Receipt and
	// Decoded are then empty and LeafHash is the leaf the log holds for it;
	// Verify proves the token's leaf hash instead of the body's.
	Pruned   bool   `json:"pruned,omitempty"`
	LeafHash []byte `json:"leaf_hash,omitempty"`
}

// PublishedKeys is GET /v1/keys: the log's note verifier keys, the KMS
// public keys and every delegation certificate — for every KMS key version
// ever used, so receipts from before a rotation keep verifying.
type PublishedKeys struct {
	LogVerifierKey  string            `json:"log_verifier_key"`  // the current one
	LogVerifierKeys []string          `json:"log_verifier_keys"` // every one, current included
	KMS             map[string][]byte `json:"kms"`               // KMS key id → PKIX DER public key
	Certificates    []PublishedCert   `json:"certificates"`
}

// checkView makes sure a bundle's decoded view, when it has one, shows the
// receipt that was verified and not another.
func checkView(r *Receipt, decoded json.RawMessage) error {
	if len(decoded) == 0 {
		return nil
	}
	var got, want map[string]any
	if err := json.Unmarshal(decoded, &got); err != nil {
		return fmt.Errorf("decoded view: %w", err)
	}
	// Through JSON, so both sides hold JSON's types.
	raw, err := json.Marshal(r.View())
	if err != nil {
		return err
	}
	if err := json.Unmarshal(raw, &want); err != nil {
		return err
	}
	if !reflect.DeepEqual(got, want) {
		return errors.New("the decoded view does not match the receipt's canonical bytes")
	}
	return nil
}

// Check is one verification step's outcome. Note, on a check that
// passed, says what it could not check and why (a pruned body); a
// verifier shows it beside the check's name.
type Check struct {
	Name string
	Err  error
	Note string
}

// Notes on the checks of a receipt whose body was pruned.
const (
	prunedNote       = "body deleted under retention; the token's leaf hash is proved (its id and time cannot be checked without the body)"
	prunedCertNote   = "validity at the receipt's time not checked: the time went with the pruned body"
	checkPruned      = "pruned"
	checkReceipt     = "receipt"
	checkCertificate = "certificate"
)

// Verify runs every check in order and stops at the first failure; the
// returned slice names each check done and, last, the one that failed.
func Verify(b Bundle, k PublishedKeys) []Check {
	var out []Check
	fail := func(name string, err error) []Check { return append(out, Check{Name: name, Err: err}) }
	pass := func(name string) { out = append(out, Check{Name: name}) }

	tok, err := ParseToken(b.Token)
	if err != nil {
		return fail("token", err)
	}
	pass("token")
	var r Receipt
	if b.Pruned {
		// No body to check: the leaf hash the client holds is what the
		// inclusion check proves, said here in so many words.
		switch {
		case len(b.Receipt) != 0 || len(b.Decoded) != 0:
			return fail(checkPruned, errors.New("a bundle marked pruned carries a receipt body"))
		case len(b.LeafHash) != 0 && !bytes.Equal(b.LeafHash, tok.LeafHash[:]):
			return fail(checkPruned, errors.New("the pruned receipt's leaf hash is not the token's"))
		}
		out = append(out, Check{Name: checkPruned, Note: prunedNote})
	} else {
		if r, err = Decode(b.Receipt); err != nil {
			return fail(checkReceipt, err)
		}
		if LeafHash(b.Receipt) != tok.LeafHash || r.ID != tok.ID {
			return fail(checkReceipt, errors.New("the receipt's hash or id does not match the token"))
		}
		if err := checkView(&r, b.Decoded); err != nil {
			return fail(checkReceipt, err)
		}
		pass(checkReceipt)
	}

	var cert *SignedCert
	for _, c := range k.Certificates {
		sc := FromPublished(c)
		if sc.Cert.KeyID() == tok.KeyID {
			cert = &sc
			break
		}
	}
	if cert == nil {
		return fail("certificate", fmt.Errorf("no published certificate for signing key %s", hex.EncodeToString(tok.KeyID[:])))
	}
	der, ok := k.KMS[cert.Cert.Issuer]
	if !ok {
		return fail("certificate", fmt.Errorf("certificate issuer %s is not a published KMS key", cert.Cert.Issuer))
	}
	kmsPub, err := x509.ParsePKIXPublicKey(der)
	if err != nil {
		return fail("certificate", fmt.Errorf("KMS key %s: %w", cert.Cert.Issuer, err))
	}
	if b.Pruned {
		if err := cert.verifySignature(kmsPub); err != nil {
			return fail(checkCertificate, err)
		}
		out = append(out, Check{Name: checkCertificate, Note: prunedCertNote})
	} else {
		if err := cert.Verify(kmsPub, time.Unix(0, r.Time)); err != nil {
			return fail(checkCertificate, err)
		}
		pass(checkCertificate)
	}

	if !tok.VerifySignature(cert.Cert.PublicKey) {
		return fail("signature", kms.ErrBadSignature)
	}
	pass("signature")

	var vs []note.Verifier
	origin := ""
	seen := map[string]bool{"": true} // note.VerifierList refuses duplicates as ambiguous
	for _, vk := range append([]string{k.LogVerifierKey}, k.LogVerifierKeys...) {
		if seen[vk] {
			continue
		}
		seen[vk] = true
		v, err := fnote.NewVerifier(vk)
		if err != nil {
			return fail("checkpoint", fmt.Errorf("log verifier key: %w", err))
		}
		if origin == "" {
			origin = v.Name()
		}
		vs = append(vs, v)
	}
	if len(vs) == 0 {
		return fail("checkpoint", errors.New("no log verifier key published"))
	}
	cp, err := openCheckpoint([]byte(b.Checkpoint), origin, vs)
	if err != nil {
		return fail("checkpoint", err)
	}
	pass("checkpoint")

	if err := VerifyInclusion(tok.LeafHash, b.Index, cp.Size, b.Proof, cp.Hash); err != nil {
		return fail("inclusion", err)
	}
	pass("inclusion")
	return out
}
