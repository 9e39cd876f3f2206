package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	awskms "github.com/aws/aws-sdk-go-v2/service/kms"
	"github.com/aws/aws-sdk-go-v2/service/kms/types"

	"github.com/knhk/knhk/internal/harness"
	"github.com/knhk/knhk/pkg/config"
	"github.com/knhk/knhk/pkg/receipt"
)

// TestEveryResponseCarriesAVerifiableReceipt: through real Envoy, every
// response has x-knhk-receipt, and `knhk receipt verify` passes on a sample
// once a signed checkpoint covers them; a changed token fails, naming the check.
func TestEveryResponseCarriesAVerifiableReceipt(t *testing.T) {
	s := startStack(t, harness.StackOptions{Weight: 20, Configure: func(c *config.Config) {
		c.Receipts.Enabled = true
		c.Receipts.CheckpointInterval = config.Duration(200 * time.Millisecond)
	}})
	const n = 200
	var mu sync.Mutex
	var tokens []string
	err := parallel(n, 16, func(i int) error {
		r, err := get(s.URL+fmt.Sprintf("/item/%d", i), map[string]string{"x-user-id": fmt.Sprint("u", i)})
		if err != nil {
			return err
		}
		if r.status != http.StatusOK {
			return fmt.Errorf("status %d", r.status)
		}
		tok := r.header.Get("x-knhk-receipt")
		if _, err := receipt.ParseToken(tok); err != nil || len(tok) > 512 {
			return fmt.Errorf("response %d: x-knhk-receipt %q: %w", i, tok, err)
		}
		mu.Lock()
		tokens = append(tokens, tok)
		mu.Unlock()
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	knhk := binDir + "/knhk"
	for _, tok := range tokens[:5] {
		var out string
		err := harness.Poll(10*time.Second, 100*time.Millisecond, func() error {
			o, err := runCmd(knhk, "receipt", "verify", "--admin", s.Knhk.AdminURL(), tok)
			out = o
			if err != nil {
				return fmt.Errorf("%w: %s", err, o)
			}
			return nil
		})
		if err != nil {
			t.Fatalf("receipt verify: %v", err)
		}
		for _, check := range []string{"✓ token", "✓ receipt", "✓ certificate", "✓ signature", "✓ checkpoint", "✓ inclusion"} {
			if !strings.Contains(out, check) {
				t.Fatalf("verify output lacks %q:\n%s", check, out)
			}
		}
	}
	// Consistency between an early and the latest checkpoint, via the API.
	var cons struct{ Proof [][]byte }
	err = harness.Poll(10*time.Second, 100*time.Millisecond, func() error {
		return harness.GetJSON(s.Knhk.AdminURL()+fmt.Sprintf("/v1/consistency?from=10&to=%d", n), &cons)
	})
	if err != nil || len(cons.Proof) == 0 {
		t.Fatalf("consistency proof 10 → %d: %v %v", n, cons, err)
	}
	resp, err := http.Get(s.Knhk.AdminURL() + "/v1/consistency?from=10&to=x")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("bad consistency query: %d", resp.StatusCode)
	}
	// A forged signature (one bit of it changed, the token otherwise well
	// formed) fails. Editing the token's text instead could give a string
	// that is not a token at all: decoding is strict, and a kr2 token of a
	// lone receipt ends in zero bytes.
	parsed, err := receipt.ParseToken(tokens[0])
	if err != nil {
		t.Fatal(err)
	}
	parsed.Signature[0] ^= 1
	forged := parsed.String()
	out, err := runCmd(knhk, "receipt", "verify", "--admin", s.Knhk.AdminURL(), forged)
	if err == nil || !strings.Contains(out, "signature check failed") {
		t.Fatalf("forged token verified or failed at the wrong check: %v\n%s", err, out)
	}
}

// TestCrashLosesNoAcknowledgedReceipt: kill -9 knhk under load; after a
// restart every receipt a client received in a header is in the log and
// verifies.
func TestCrashLosesNoAcknowledgedReceipt(t *testing.T) {
	s := startStack(t, harness.StackOptions{Weight: 20, FailureModeAllow: true, Configure: func(c *config.Config) {
		c.Receipts.Enabled = true
		c.Receipts.CheckpointInterval = config.Duration(200 * time.Millisecond)
	}})
	load := harness.StartLoad(s.URL, 300, "crash")
	// Kill while receipts are being written.
	if err := harness.Poll(10*time.Second, 20*time.Millisecond, func() error {
		n := 0
		for _, x := range load.Samples() {
			if x.Receipt != "" {
				n++
			}
		}
		if n < 300 {
			return fmt.Errorf("%d receipts so far", n)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := s.Knhk.Restart(true); err != nil { // SIGKILL, then start again
		t.Fatal(err)
	}
	samples := load.Stop()

	var keys receipt.PublishedKeys
	if err := harness.GetJSON(s.Knhk.AdminURL()+"/v1/keys", &keys); err != nil {
		t.Fatal(err)
	}
	var tokens []string
	for _, x := range samples {
		if x.Receipt != "" {
			tokens = append(tokens, x.Receipt)
		}
	}
	t.Logf("%d of %d responses carried a receipt across the crash", len(tokens), len(samples))
	for i, tok := range tokens {
		var b receipt.Bundle
		err := harness.Poll(10*time.Second, 50*time.Millisecond, func() error {
			return harness.GetJSON(s.Knhk.AdminURL()+"/v1/receipts/"+tok, &b)
		})
		if err != nil {
			t.Fatalf("receipt %d of %d, acknowledged before the crash, is not in the log: %v", i, len(tokens), err)
		}
		b.Token = tok
		checks := receipt.Verify(b, keys)
		if last := checks[len(checks)-1]; last.Err != nil {
			t.Fatalf("receipt %d: %s check failed: %v", i, last.Name, last.Err)
		}
	}
}

// TestKMSOutageDelaysCheckpointsNotRequests: with checkpoints signed by
// AWS KMS (local-kms), stopping the KMS mid-run leaves every request with a
// receipt; when it returns, checkpoint signing resumes, the checkpoint
// covers everything and every receipt verifies — the log has no gap.
func TestKMSOutageDelaysCheckpointsNotRequests(t *testing.T) {
	lg := logs(t)
	lk := startLocalKMS(t, lg)
	keyID := createKMSKey(t, lk.Endpoint)
	s := startStack(t, harness.StackOptions{Weight: 20, Logs: lg, Configure: func(c *config.Config) {
		c.Receipts.Enabled = true
		c.Receipts.CheckpointInterval = config.Duration(200 * time.Millisecond)
		c.Receipts.KMS = config.KMSConfig{Provider: "aws", KeyID: keyID, Region: "eu-west-1", Endpoint: lk.Endpoint}
	}})
	var keys receipt.PublishedKeys
	if err := harness.GetJSON(s.Knhk.AdminURL()+"/v1/keys", &keys); err != nil {
		t.Fatal(err)
	}
	load := harness.StartLoad(s.URL, 200, "outage")
	size := func() uint64 {
		var cp struct{ Size uint64 }
		raw, err := http.Get(s.Knhk.AdminURL() + "/v1/checkpoint")
		if err != nil {
			return 0
		}
		defer raw.Body.Close()
		var origin string
		_, _ = fmt.Fscanf(raw.Body, "%s\n%d\n", &origin, &cp.Size)
		return cp.Size
	}
	waitGrowth := func(what string) {
		t.Helper()
		base := size()
		if err := harness.Poll(15*time.Second, 50*time.Millisecond, func() error {
			if size() <= base+50 {
				return fmt.Errorf("checkpoint stuck at %d", size())
			}
			return nil
		}); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}
	waitGrowth("before the outage")

	lk.Stop()
	outageStart := len(load.Samples())
	// Requests keep flowing and keep getting receipts while the KMS is down.
	if err := harness.Poll(10*time.Second, 50*time.Millisecond, func() error {
		if len(load.Samples()) < outageStart+300 {
			return fmt.Errorf("only %d requests during the outage", len(load.Samples())-outageStart)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	stuck := size()
	if err := lk.Restart(); err != nil {
		t.Fatal(err)
	}
	waitGrowth("after the KMS returned")
	samples := load.Stop()
	during := samples[outageStart:]
	without := 0
	for _, x := range during {
		if x.Receipt == "" {
			without++
		}
	}
	t.Logf("%d requests during the outage, %d without a receipt; checkpoint stuck at %d, now %d", len(during), without, stuck, size())
	if without > 0 {
		t.Fatalf("%d responses lost their receipt during the KMS outage", without)
	}
	// Every receipt, including those issued during the outage, verifies.
	for i, x := range samples {
		if x.Receipt == "" {
			t.Fatalf("response %d has no receipt", i)
		}
		if i%25 != 0 && i < len(samples)-5 {
			continue // a sample keeps the test short; the crash test checks them all
		}
		var b receipt.Bundle
		if err := harness.Poll(10*time.Second, 50*time.Millisecond, func() error {
			return harness.GetJSON(s.Knhk.AdminURL()+"/v1/receipts/"+x.Receipt, &b)
		}); err != nil {
			t.Fatalf("receipt %d: %v", i, err)
		}
		b.Token = x.Receipt
		if cs := receipt.Verify(b, keys); cs[len(cs)-1].Err != nil {
			t.Fatalf("receipt %d: %s: %v", i, cs[len(cs)-1].Name, cs[len(cs)-1].Err)
		}
	}
}

// startLocalKMS runs local-kms for the test, with the credentials knhk's
// AWS SDK chain will read.
func startLocalKMS(t *testing.T, lg *harness.LogBuffer) *harness.LocalKMS {
	t.Helper()
	lk, err := harness.StartLocalKMS(t.TempDir(), lg)
	if err != nil {
		t.Fatal(err) // never skipped: the error says how to install local-kms
	}
	t.Cleanup(lk.Stop)
	t.Setenv("AWS_ACCESS_KEY_ID", "test")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "test")
	return lk
}

func createKMSKey(t *testing.T, endpoint string) string {
	t.Helper()
	c := awskms.New(awskms.Options{Region: "eu-west-1", BaseEndpoint: aws.String(endpoint),
		Credentials: credentials.NewStaticCredentialsProvider("test", "test", "")})
	out, err := c.CreateKey(context.Background(), &awskms.CreateKeyInput{KeySpec: types.KeySpecEccNistP256, KeyUsage: types.KeyUsageTypeSignVerify})
	if err != nil {
		t.Fatal(err)
	}
	return aws.ToString(out.KeyMetadata.KeyId)
}

// TestKMSKeyRotationAtRuntime: the KMS key is an AWS alias; moving it to a
// new key (how AWS rotates asymmetric keys) is picked up while knhk runs.
// The new key is published beside the old, signs the next checkpoints and
// certifies the next delegated key; receipts from both sides verify with
// `knhk receipt verify`, also after a restart.
func TestKMSKeyRotationAtRuntime(t *testing.T) {
	lg := logs(t)
	lk := startLocalKMS(t, lg)
	ctx := context.Background()
	c := awskms.New(awskms.Options{Region: "eu-west-1", BaseEndpoint: aws.String(lk.Endpoint),
		Credentials: credentials.NewStaticCredentialsProvider("test", "test", "")})
	first := createKMSKey(t, lk.Endpoint)
	if _, err := c.CreateAlias(ctx, &awskms.CreateAliasInput{AliasName: aws.String("alias/knhk"), TargetKeyId: aws.String(first)}); err != nil {
		t.Fatal(err)
	}
	s := startStack(t, harness.StackOptions{Weight: 20, Logs: lg, Configure: func(c *config.Config) {
		c.Receipts.CheckpointInterval = config.Duration(200 * time.Millisecond)
		c.Receipts.KMS = config.KMSConfig{Provider: "aws", KeyID: "alias/knhk", Region: "eu-west-1", Endpoint: lk.Endpoint}
	}})
	knhk := filepath.Join(binDir, "knhk")
	receiptNow := func(user string) string {
		r, err := get(s.URL+"/", map[string]string{"x-user-id": user})
		if err != nil || r.header.Get("x-knhk-receipt") == "" {
			t.Fatalf("no receipt: %v", err)
		}
		return r.header.Get("x-knhk-receipt")
	}
	verify := func(what, tok string) {
		t.Helper()
		err := harness.Poll(10*time.Second, 100*time.Millisecond, func() error {
			o, err := runCmd(knhk, "receipt", "verify", "--admin", s.Knhk.AdminURL(), tok)
			if err != nil {
				return fmt.Errorf("%w: %s", err, o)
			}
			return nil
		})
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}
	before := receiptNow("before-rotation")
	verify("receipt before the rotation", before)

	second := createKMSKey(t, lk.Endpoint)
	if _, err := c.UpdateAlias(ctx, &awskms.UpdateAliasInput{AliasName: aws.String("alias/knhk"), TargetKeyId: aws.String(second)}); err != nil {
		t.Fatal(err)
	}
	var refreshed struct {
		Changed bool
		receipt.PublishedKeys
	}
	if err := postJSON(s.Knhk.AdminURL()+"/v1/keys/refresh", &refreshed); err != nil {
		t.Fatal(err)
	}
	if !refreshed.Changed || len(refreshed.KMS) != 2 || len(refreshed.LogVerifierKeys) != 2 {
		t.Fatalf("after moving the alias: changed %v, %d KMS keys, %d verifier keys", refreshed.Changed, len(refreshed.KMS), len(refreshed.LogVerifierKeys))
	}
	var newID string
	for id := range refreshed.KMS {
		if strings.Contains(id, second) {
			newID = id
		}
	}
	if newID == "" {
		t.Fatalf("the new key %s is not published: %v", second, refreshed.KMS)
	}
	after := receiptNow("after-rotation")
	verify("receipt after the rotation", after)
	// The delegated key that signed the new receipt is certified by the new KMS key.
	var keys receipt.PublishedKeys
	if err := harness.GetJSON(s.Knhk.AdminURL()+"/v1/keys", &keys); err != nil {
		t.Fatal(err)
	}
	tok, _ := receipt.ParseToken(after)
	for _, cert := range keys.Certificates {
		if cert.KeyID == fmt.Sprintf("%x", tok.KeyID[:]) && cert.Issuer != newID {
			t.Fatalf("the receipt after the rotation is certified by %s, want %s", cert.Issuer, newID)
		}
	}

	if err := s.Knhk.Restart(false); err != nil {
		t.Fatal(err)
	}
	verify("pre-rotation receipt after a restart", before)
	verify("post-rotation receipt after a restart", after)
}

func postJSON(url string, v any) error {
	resp, err := http.Post(url, "application/json", nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("POST %s: %s: %s", url, resp.Status, b)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}
