package e2e

import (
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/knhk/knhk/internal/harness"
)

// TestKnhkDownFailureMode runs two Envoys against one knhk — one failing
// open, one failing closed — and stops knhk.
func TestKnhkDownFailureMode(t *testing.T) {
	lg := logs(t)
	s := startStack(t, harness.StackOptions{Weight: 20, FailureModeAllow: true, Logs: lg})
	ports, err := harness.FreePorts(2)
	if err != nil {
		t.Fatal(err)
	}
	closedURL := "http://127.0.0.1:" + strconv.Itoa(ports[0])
	closed, err := harness.StartEnvoyFor(binDir, s.Opts.Dir, "envoy-closed", s.Knhk.ConfigPath, ports[1], lg,
		"--failure-mode-allow=false", "--listener-port", strconv.Itoa(ports[0]), "--admin-port", strconv.Itoa(ports[1]))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = closed.Stop() })

	for _, url := range []string{s.URL, closedURL} {
		r, err := get(url+"/", map[string]string{"x-user-id": "u1"})
		if err != nil || r.status != http.StatusOK || r.version == "" {
			t.Fatalf("%s before stop: %+v %v", url, r, err)
		}
	}

	if err := s.Knhk.Stop(10 * time.Second); err != nil {
		t.Fatalf("knhk did not exit 0 on SIGTERM: %v", err)
	}

	for i := range 50 {
		user := map[string]string{"x-user-id": "u" + strconv.Itoa(i)}
		r, err := get(s.URL+"/", user)
		if err != nil {
			t.Fatal(err)
		}
		if r.status != http.StatusOK {
			t.Fatalf("failure_mode_allow: true, knhk down: status %d, want 200", r.status)
		}
		if r.body != "stable" && r.body != "canary" {
			t.Fatalf("fail-open response not from an upstream: %q", r.body)
		}
		r, err = get(closedURL+"/", user)
		if err != nil {
			t.Fatal(err)
		}
		if r.status < 500 {
			t.Fatalf("failure_mode_allow: false, knhk down: status %d, want 5xx", r.status)
		}
	}
}
