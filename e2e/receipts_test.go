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
