package e2e

import (
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

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
	// A forged signature (last characters of the token changed) fails.
	tok := tokens[0]
	forged := tok[:len(tok)-3] + map[bool]string{true: "AAA", false: "BBB"}[!strings.HasSuffix(tok, "AAA")]
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
