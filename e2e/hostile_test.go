package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/knhk/knhk/internal/harness"
	"github.com/knhk/knhk/pkg/config"
	"github.com/knhk/knhk/pkg/receipt"
)

// manyHeaders is n distinct client headers (Envoy adds a few of its own).
func manyHeaders(n int, user string) map[string]string {
	h := map[string]string{"x-user-id": user}
	for i := range n - 1 {
		h[fmt.Sprintf("x-pad-%02d", i)] = "v"
	}
	return h
}

// bigHeaders is a header block of about kib KiB in one value.
func bigHeaders(kib int, user string) map[string]string {
	return map[string]string{"x-user-id": user, "x-big": strings.Repeat("a", kib*1024-200)}
}

// canaryUser finds a user id that knhk routes to the canary, through Envoy.
func canaryUser(t *testing.T, s *harness.Stack) string {
	t.Helper()
	for i := range 2000 {
		u := fmt.Sprint("hostile-", i)
		r, err := get(s.URL+"/probe", map[string]string{"x-user-id": u})
		if err == nil && r.status == http.StatusOK && r.version == "canary" {
			return u
		}
	}
	t.Fatal("no canary user found")
	return ""
}

// reset sends request headers for user and resets the connection before
// any response: what a client does to abandon a request.
func reset(addr, user string) error {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(c, "GET /reset HTTP/1.1\r\nHost: x\r\nx-user-id: %s\r\n\r\n", user)
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0) // RST, not FIN
	}
	_ = c.Close()
	return err
}

// TestOversizedRequestsAreServedWithReceipts: a 9 KiB path, a 59 KiB
// header block, a 60 KiB header and 95 headers are all served, each with a receipt that
// verifies, whether or not receipts are required; so is knhk's 431 for a
// request Envoy takes but that leaves no room for knhk's headers. A long
// path once went out unreceipted, and 95 headers once failed with a bare
// 500 because knhk's own headers pushed Envoy over its header-count limit.
func TestOversizedRequestsAreServedWithReceipts(t *testing.T) {
	for _, required := range []bool{false, true} {
		t.Run(fmt.Sprintf("required=%v", required), func(t *testing.T) {
			s := startStack(t, harness.StackOptions{Weight: 50, Configure: func(c *config.Config) {
				c.Receipts.Enabled, c.Receipts.Required = true, required
				c.Receipts.CheckpointInterval = config.Duration(200 * time.Millisecond)
				// The journal waits ¾ of message_timeout for its sync; at the
				// 200 ms default one slow fsync on two shared cores (once 150+
				// ms under CI) refuses a request this test is not about.
				c.Envoy.MessageTimeout = config.Duration(2 * time.Second)
			}})
			longPath := "/" + strings.Repeat("p", 9*1024)
			cases := []struct {
				name    string
				path    string
				headers map[string]string
				status  int
			}{
				{"9 KiB path", longPath, map[string]string{"x-user-id": "u1"}, http.StatusOK},
				{"59 KiB header block", "/big", bigHeaders(59, "u2"), http.StatusOK},
				{"95 headers", "/many", manyHeaders(95, "u3"), http.StatusOK},
				{"a 60 KiB header", "/60k", map[string]string{"x-user-id": "u5", "x-big": strings.Repeat("b", 60*1024)}, http.StatusOK},
				// Envoy takes it, but knhk's headers would not fit: knhk's own 431.
				{"116 headers", "/too-many", manyHeaders(116, "u4"), http.StatusRequestHeaderFieldsTooLarge},
			}
			for _, c := range cases {
				r, err := get(s.URL+c.path, c.headers)
				if err != nil {
					t.Fatalf("%s: %v", c.name, err)
				}
				tok := r.header.Get("x-knhk-receipt")
				if r.status != c.status || (c.status == http.StatusOK && r.version == "") {
					t.Fatalf("%s: status %d, version %q, want %d (with x-knhk-version if served)", c.name, r.status, r.version, c.status)
				}
				if _, err := receipt.ParseToken(tok); err != nil || len(tok) > 512 {
					t.Fatalf("%s: x-knhk-receipt %q (%d bytes): %v", c.name, tok, len(tok), err)
				}
				err = harness.Poll(20*time.Second, 200*time.Millisecond, func() error {
					out, err := runCmd(binDir+"/knhk", "receipt", "verify", "--admin", s.Knhk.AdminURL(), tok)
					if err != nil {
						return fmt.Errorf("%w: %s", err, out)
					}
					return nil
				})
				if err != nil {
					t.Fatalf("%s: receipt verify: %v", c.name, err)
				}
			}
			metrics, err := s.Knhk.Get("/metrics")
			if err != nil {
				t.Fatal(err)
			}
			if m := metricValue(string(metrics), "knhk_receipt_errors_total"); m != 0 {
				t.Fatalf("knhk_receipt_errors_total %v, want 0", m)
			}
		})
	}
}

// metricValue reads an unlabelled metric from a Prometheus text page (-1
// when absent).
func metricValue(page, name string) float64 {
	for _, l := range strings.Split(page, "\n") {
		if v, ok := strings.CutPrefix(l, name+" "); ok {
			var f float64
			if _, err := fmt.Sscan(v, &f); err == nil {
				return f
			}
		}
	}
	return -1
}

// breakJournal makes the receipt journal unable to open its next segments
// (a directory stands where each file would go), as a full or failed disk
// would: from the next segment on, no receipt can be made durable.
func breakJournal(t *testing.T, s *harness.Stack) {
	t.Helper()
	dir := filepath.Join(s.Knhk.Config.DataDir, "receipts", "journal")
	names, err := filepath.Glob(filepath.Join(dir, "wal-*.log"))
	if err != nil || len(names) == 0 {
		t.Fatalf("no journal segment in %s (%v)", dir, err)
	}
	var last uint64
	for _, n := range names {
		var seq uint64
		if _, err := fmt.Sscanf(filepath.Base(n), "wal-%d.log", &seq); err == nil {
			last = max(last, seq)
		}
	}
	for seq := last + 1; seq < last+5000; seq++ {
		if err := os.Mkdir(filepath.Join(dir, fmt.Sprintf("wal-%016d.log", seq)), 0o700); err != nil {
			t.Fatal(err)
		}
	}
}

// TestReceiptFailure: when no receipt can be logged, receipts.required
// answers 503 x-knhk-shed: receipt and never serves a response without
// one; without it responses go out unreceipted and are counted. Either way
// the log gets a line a second at most, not one per request.
func TestReceiptFailure(t *testing.T) {
	for _, required := range []bool{true, false} {
		t.Run(fmt.Sprintf("required=%v", required), func(t *testing.T) {
			logs := &harness.LogBuffer{}
			s := startStack(t, harness.StackOptions{Weight: 50, Logs: logs, Configure: func(c *config.Config) {
				c.Receipts.Enabled, c.Receipts.Required = true, required
				c.Envoy.MessageTimeout = config.Duration(2 * time.Second) // as above: a slow fsync is not this test's fault
			}})
			if r, err := get(s.URL+"/ok", map[string]string{"x-user-id": "u1"}); err != nil || r.status != http.StatusOK || r.header.Get("x-knhk-receipt") == "" {
				t.Fatalf("before the fault: %+v %v", r, err)
			}
			breakJournal(t, s)
			var refused, unreceipted int
			err := harness.Poll(30*time.Second, 20*time.Millisecond, func() error {
				for i := range 20 {
					r, err := get(s.URL+"/after", map[string]string{"x-user-id": fmt.Sprint("u", i)})
					if err != nil {
						return err
					}
					switch {
					case r.status == http.StatusServiceUnavailable && r.header.Get("x-knhk-shed") == "receipt":
						refused++
					case r.status == http.StatusOK && r.header.Get("x-knhk-receipt") == "":
						unreceipted++
					}
				}
				if required && unreceipted > 0 {
					t.Fatalf("receipts.required: %d responses served without a receipt", unreceipted)
				}
				if refused+unreceipted < 100 {
					return fmt.Errorf("%d refused, %d unreceipted so far", refused, unreceipted)
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if !required && refused > 0 {
				t.Fatalf("receipts not required, yet %d requests refused", refused)
			}
			metrics, err := s.Knhk.Get("/metrics")
			if err != nil {
				t.Fatal(err)
			}
			if m := metricValue(string(metrics), "knhk_receipt_errors_total"); m < 100 {
				t.Fatalf("knhk_receipt_errors_total %v, want ≥ 100", m)
			}
			// Not ready, saying why without naming server files.
			resp, err := http.Get(s.Knhk.AdminURL() + "/readyz")
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			_ = resp.Body.Close()
			if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(body), "receipt journal failed") ||
				strings.Contains(string(body), s.Knhk.Config.DataDir) {
				t.Fatalf("/readyz with a failed journal: %d %q", resp.StatusCode, body)
			}
			if lines := strings.Count(logs.String(), "receipts not logged"); lines == 0 || lines > 60 {
				t.Fatalf("%d log lines for %d failures, want a line a second at most", lines, refused+unreceipted)
			}
			t.Logf("refused %d, unreceipted %d", refused, unreceipted)
		})
	}
}

// TestCraftedRequestsCannotRollBackACanary: one client on the canary sends
// requests built to fail inside Envoy or knhk rather than at the canary —
// 95 headers, a 59 KiB block, too many headers for Envoy, abandoned
// requests. None may count against the canary; a genuine upstream 5xx
// still rolls it back. 25 requests with 95 headers once aborted any rollout.
func TestCraftedRequestsCannotRollBackACanary(t *testing.T) {
	s := startStack(t, harness.StackOptions{Weight: 0, Configure: func(c *config.Config) {
		fastRollout([]float64{50, 100}, time.Minute)(c) // no scheduled check during the test
		c.Receipts.Enabled = true
	}})
	mustAction(t, s, "start")
	user := canaryUser(t, s)
	served := func(path string, h map[string]string) error {
		r, err := get(s.URL+path, h)
		if err == nil && (r.status != http.StatusOK || r.version != "canary") {
			err = fmt.Errorf("status %d from %q, want 200 from the canary", r.status, r.version)
		}
		return err
	}
	refused := func(path string, h map[string]string) {
		_, _ = get(s.URL+path, h) // Envoy answers 431 or resets: either is fine
	}
	crafted := []func() error{
		func() error { return served("/many", manyHeaders(95, user)) },
		func() error { return served("/big", bigHeaders(59, user)) },
		func() error { refused("/too-many", manyHeaders(150, user)); return nil },
		func() error { refused("/no-room", manyHeaders(116, user)); return nil },
		func() error { refused("/too-big", bigHeaders(120, user)); return nil },
		func() error { return reset(s.ListenerAddr(), user) },
	}
	for i := range 50 {
		if err := crafted[i%len(crafted)](); err != nil {
			t.Fatalf("crafted request %d: %v", i, err)
		}
	}
	// Give the abandoned streams time to end, then the canary must be untouched.
	err := harness.Poll(10*time.Second, 100*time.Millisecond, func() error {
		m, err := s.Knhk.Get("/metrics")
		if err != nil {
			return err
		}
		if n := metricValue(string(m), "knhk_extproc_unanswered_requests_total"); n < 1 {
			return fmt.Errorf("%v abandoned requests seen", n)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	v := rolloutView(t, s)
	if v.Phase != "Progressing" {
		t.Fatalf("crafted requests moved the rollout to %s:%s", v.Phase, decisionLog(v))
	}
	if c := v.Window["canary"]; c.Errors != 0 {
		t.Fatalf("crafted requests counted as %d canary errors (of %d)", c.Errors, c.Requests)
	}
	raw, err := s.Knhk.Get("/v1/rollout")
	if err != nil || !json.Valid(raw) {
		t.Fatalf("/v1/rollout: %v", err)
	}

	// A canary that really fails is still rolled back.
	if err := s.Canary.SetFault(1, 0); err != nil {
		t.Fatal(err)
	}
	load := harness.StartLoad(s.URL, 200, "genuine")
	defer load.Stop()
	v = waitPhase(t, s, "RolledBack", 30*time.Second)
	if last := v.Decisions[len(v.Decisions)-1]; last.Decision != "rollback" || last.Reason == "" || last.Reason == "manual" {
		t.Fatalf("rolled back without a reason:%s", decisionLog(v))
	}
}
