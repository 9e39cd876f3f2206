package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	fnote "github.com/transparency-dev/formats/note"
	"golang.org/x/mod/sumdb/note"

	"github.com/knhk/knhk/internal/receipttest"
	"github.com/knhk/knhk/pkg/receipt"
	"github.com/knhk/knhk/pkg/region"
)

// policyFixture is a receipt in a signed checkpoint, its published keys,
// and peer witness keys to cosign with, all written to files as verify
// reads them.
type policyFixture struct {
	dir     string
	keys    receipt.PublishedKeys
	bundle  receipt.Bundle
	peers   []region.PeerWitness
	signers map[string]note.Signer
}

func newPolicyFixture(t *testing.T) *policyFixture {
	t.Helper()
	rs, _ := receipttest.Open(t, 100*time.Millisecond)
	tok := freshToken(t, rs)
	parsed, err := receipt.ParseToken(tok)
	if err != nil {
		t.Fatal(err)
	}
	var b receipt.Bundle
	poll(t, 10*time.Second, func() error {
		b, err = rs.Bundle(context.Background(), parsed.ID)
		return err
	})
	keys, err := rs.Published()
	if err != nil {
		t.Fatal(err)
	}
	f := &policyFixture{dir: t.TempDir(), keys: keys, bundle: b, signers: map[string]note.Signer{}}
	for i, name := range []string{"eu-west", "ap-south"} {
		skey, vkey, err := note.GenerateKey(rand.Reader, name)
		if err != nil {
			t.Fatal(err)
		}
		cvkey, err := fnote.VKeyToCosignatureV1(vkey)
		if err != nil {
			t.Fatal(err)
		}
		if f.signers[name], err = fnote.NewSignerForCosignatureV1(skey); err != nil {
			t.Fatal(err)
		}
		f.peers = append(f.peers, region.PeerWitness{Name: name, Key: cvkey, URL: fmt.Sprintf("https://127.0.0.%d:9443", i+2)})
	}
	return f
}

// write writes v as JSON (or bytes as they are) to a file in the
// fixture's directory.
func (f *policyFixture) write(t *testing.T, name string, v any) string {
	t.Helper()
	raw, ok := v.([]byte)
	if !ok {
		var err error
		if raw, err = json.Marshal(v); err != nil {
			t.Fatal(err)
		}
	}
	p := filepath.Join(f.dir, name)
	if err := os.WriteFile(p, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// cosigned is the bundle as GET /v1/receipts/{id} serves it with regions
// on: its checkpoint cosigned by the peers named, and the durability
// fields (which verify does not trust).
func (f *policyFixture) cosigned(t *testing.T, peers ...string) any {
	t.Helper()
	v, err := fnote.NewVerifier(f.keys.LogVerifierKey)
	if err != nil {
		t.Fatal(err)
	}
	n, err := note.Open([]byte(f.bundle.Checkpoint), note.VerifierList(v))
	if err != nil {
		t.Fatal(err)
	}
	var ss []note.Signer
	for _, p := range peers {
		ss = append(ss, f.signers[p])
	}
	cp, err := note.Sign(n, ss...)
	if err != nil {
		t.Fatal(err)
	}
	b := f.bundle
	b.Checkpoint = string(cp)
	return struct {
		receipt.Bundle
		Durable      bool                 `json:"durable"`
		Cosignatures []region.Cosignature `json:"cosignatures"`
	}{b, true, []region.Cosignature{}}
}

func (f *policyFixture) verify(t *testing.T, keys, bundle, policy string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := receiptCmd([]string{"verify", "--keys", keys, "--bundle", bundle, "--policy", policy}, &out, &errb)
	return code, out.String(), errb.String()
}

// TestReceiptVerifyPolicy: with --policy, verify names a "policy" check
// after inclusion, passing when the checkpoint is cosigned to the
// policy's quorum and failing, with the group and the witnesses, when it
// is not.
func TestReceiptVerifyPolicy(t *testing.T) {
	f := newPolicyFixture(t)
	keys := f.write(t, "keys.json", f.keys)
	bundle := f.write(t, "bundle.json", f.cosigned(t, "eu-west"))

	met := f.write(t, "met.policy", region.Policy("test/log", f.keys.LogVerifierKey, f.peers, 2))
	code, out, errb := f.verify(t, keys, bundle, met)
	if code != 0 || !strings.Contains(out, "✓ checkpoint\n✓ inclusion\n✓ policy\nreceipt ") {
		t.Fatalf("quorum met: exit %d\n%s%s", code, out, errb)
	}

	unmet := f.write(t, "unmet.policy", region.Policy("test/log", f.keys.LogVerifierKey, f.peers, 3))
	code, out, errb = f.verify(t, keys, bundle, unmet)
	want := "✓ inclusion\n✗ policy      group peers needs 2 of eu-west, ap-south; only eu-west cosigned (ap-south: no cosignature)\n"
	if code != 1 || !strings.HasSuffix(out, want) || errb != "knhk receipt verify: policy check failed\n" {
		t.Fatalf("quorum unmet: exit %d\n%s%s", code, out, errb)
	}

	// Without --policy the same bundle verifies, with no policy check.
	var o, e bytes.Buffer
	if code := receiptCmd([]string{"verify", "--keys", keys, "--bundle", bundle}, &o, &e); code != 0 || strings.Contains(o.String(), "policy") {
		t.Fatalf("without --policy: exit %d\n%s%s", code, o.String(), e.String())
	}
}

// TestReceiptVerifyPolicyIsTheTrustRoot: under a policy, the checkpoint
// is verified with the policy's log keys only, never the published ones.
func TestReceiptVerifyPolicyIsTheTrustRoot(t *testing.T) {
	f := newPolicyFixture(t)
	keys := f.write(t, "keys.json", f.keys)
	bundle := f.write(t, "bundle.json", f.cosigned(t, "eu-west", "ap-south"))

	// A policy naming another log key: the published one, which signed the
	// checkpoint, does not rescue it.
	_, otherLog, err := note.GenerateKey(rand.Reader, "test/log")
	if err != nil {
		t.Fatal(err)
	}
	wrong := f.write(t, "wrong.policy", region.Policy("test/log", otherLog, f.peers, 3))
	code, out, errb := f.verify(t, keys, bundle, wrong)
	if code != 1 || !strings.Contains(out, "✓ signature\n✗ checkpoint  no valid signature by a log key of the policy") ||
		strings.Contains(out, "inclusion") || errb != "knhk receipt verify: checkpoint check failed\n" {
		t.Fatalf("wrong log key: exit %d\n%s%s", code, out, errb)
	}

	// A policy without a log line fails as such rather than fall back.
	var noLog strings.Builder
	for _, line := range strings.SplitAfter(string(region.Policy("test/log", f.keys.LogVerifierKey, f.peers, 3)), "\n") {
		if !strings.HasPrefix(line, "log ") {
			noLog.WriteString(line)
		}
	}
	nolog := f.write(t, "nolog.policy", []byte(noLog.String()))
	code, out, errb = f.verify(t, keys, bundle, nolog)
	if code != 1 || !strings.Contains(out, "✓ signature\n✗ policy      "+nolog+`: the policy has no "log" line`) ||
		strings.Contains(out, "✓ checkpoint") || strings.Contains(out, "✗ checkpoint") || errb != "knhk receipt verify: policy check failed\n" {
		t.Fatalf("no log line: exit %d\n%s%s", code, out, errb)
	}

	// Published keys that do not verify the checkpoint: the policy's do.
	forged := f.keys
	forged.LogVerifierKey, forged.LogVerifierKeys = otherLog, []string{otherLog}
	forgedKeys := f.write(t, "forged-keys.json", forged)
	var o, e bytes.Buffer
	if code := receiptCmd([]string{"verify", "--keys", forgedKeys, "--bundle", bundle}, &o, &e); code != 1 || !strings.Contains(o.String(), "✗ checkpoint") {
		t.Fatalf("forged keys without --policy: exit %d\n%s%s", code, o.String(), e.String())
	}
	good := f.write(t, "good.policy", region.Policy("test/log", f.keys.LogVerifierKey, f.peers, 3))
	if code, out, errb := f.verify(t, forgedKeys, bundle, good); code != 0 || !strings.Contains(out, "✓ checkpoint\n✓ inclusion\n✓ policy\n") {
		t.Fatalf("forged keys with --policy: exit %d\n%s%s", code, out, errb)
	}
}

// TestReceiptVerifyBadPolicyFile: a policy that does not parse is named,
// with its line, before anything is fetched.
func TestReceiptVerifyBadPolicyFile(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "bad.policy")
	if err := os.WriteFile(p, []byte("# ok\nwitness eu-west\nquorum eu-west\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var out, errb bytes.Buffer
	code := receiptCmd([]string{"verify", "--keys", filepath.Join(dir, "none.json"), "--bundle", filepath.Join(dir, "none.json"), "--policy", p}, &out, &errb)
	want := "knhk receipt verify: policy: " + p + ":2: want: witness <name> <vkey> [<url>]\n"
	if code != 1 || errb.String() != want || out.Len() != 0 {
		t.Fatalf("exit %d, stdout %q, stderr %q, want %q", code, out.String(), errb.String(), want)
	}
	code = receiptCmd([]string{"verify", "--keys", p, "--bundle", p, "--policy", filepath.Join(dir, "missing.policy")}, &out, &errb)
	if code != 1 || !strings.Contains(errb.String(), "missing.policy") {
		t.Fatalf("missing file: exit %d, %q", code, errb.String())
	}
}
