package e2e

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/knhk/knhk/internal/harness"
)

// TestSIGTERMDrainsOpenStreams: a request whose ext_proc stream is open when
// knhk gets SIGTERM still completes through knhk (its response phase runs),
// and knhk exits 0.
func TestSIGTERMDrainsOpenStreams(t *testing.T) {
	s := startStack(t, harness.StackOptions{Weight: 20, FailureModeAllow: false})
	s.Stable.SetDelay(1500 * time.Millisecond)
	s.Canary.SetDelay(1500 * time.Millisecond)

	type res struct {
		r   result
		err error
	}
	done := make(chan res, 1)
	go func() {
		r, err := get(s.URL+"/", map[string]string{"x-user-id": "draining-user"})
		done <- res{r, err}
	}()
	// Wait until the request's stream is open in knhk.
	err := harness.Poll(5*time.Second, 10*time.Millisecond, func() error {
		v, err := metric(s.Knhk.AdminURL(), "knhk_extproc_streams_active")
		if err != nil {
			return err
		}
		if v < 1 {
			return fmt.Errorf("no open stream yet")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	stopped := make(chan error, 1)
	go func() { stopped <- s.Knhk.Stop(10 * time.Second) }()

	got := <-done
	if got.err != nil {
		t.Fatal(got.err)
	}
	if got.r.status != http.StatusOK || got.r.version == "" {
		t.Fatalf("in-flight request during drain: status %d, x-knhk-version %q (response phase must still run)", got.r.status, got.r.version)
	}
	if err := <-stopped; err != nil {
		t.Fatalf("knhk exit after drain: %v", err)
	}
}

// metric reads one unlabelled sample from /metrics.
func metric(adminURL, name string) (float64, error) {
	resp, err := client.Get(adminURL + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, name+" "); ok {
			var v float64
			_, err := fmt.Sscan(rest, &v)
			return v, err
		}
	}
	return 0, fmt.Errorf("metric %s not found", name)
}

func TestBadConfigExitsNonZeroNamingTheKey(t *testing.T) {
	dir := t.TempDir()
	cases := map[string]string{
		"canary:\n  weight: 140\n":                "canary.weight",
		"canary:\n  stickykeys: [\"header:a\"]\n": "canary.stickykeys: unknown key",
		"upstreams:\n  stable: [\"10.0.0.1\"]\n":  "upstreams.stable[0]",
		"listen:\n  admin: \"127.0.0.1:9002\"\n":  "listen.admin: same address as listen.grpc",
		"envoy:\n  message_timeout: 0s\n":         "envoy.message_timeout",
	}
	for body, want := range cases {
		p := filepath.Join(dir, "bad.yaml")
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		for _, sub := range []string{"serve", "envoy-config"} {
			var stderr bytes.Buffer
			cmd := exec.Command(filepath.Join(binDir, "knhk"), sub, "--config", p)
			cmd.Stderr = &stderr
			err := cmd.Run()
			if err == nil {
				t.Fatalf("knhk %s accepted %q", sub, body)
			}
			if msg := stderr.String(); !strings.Contains(msg, p) || !strings.Contains(msg, want) {
				t.Fatalf("knhk %s on %q: error %q does not name the file and %q", sub, body, msg, want)
			}
		}
	}
}

// TestCommittedBootstrapIsGeneratedAndValid: envoy/envoy.yaml is exactly what
// `knhk envoy-config --config envoy/knhk.yaml` prints, and Envoy 1.40 accepts it.
func TestCommittedBootstrapIsGeneratedAndValid(t *testing.T) {
	needEnvoy(t)
	root, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "envoy.yaml")
	if err := harness.EnvoyConfig(filepath.Join(binDir, "knhk"), filepath.Join(root, "envoy/knhk.yaml"), out); err != nil {
		t.Fatal(err)
	}
	want, _ := os.ReadFile(out)
	got, err := os.ReadFile(filepath.Join(root, "envoy/envoy.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("envoy/envoy.yaml is stale: regenerate with `bin/knhk envoy-config --config envoy/knhk.yaml > envoy/envoy.yaml`")
	}
	envoy, _ := harness.EnvoyPath()
	for _, f := range []string{filepath.Join(root, "envoy/envoy.yaml")} {
		cmd := exec.Command(envoy, "--mode", "validate", "-c", f, "--use-dynamic-base-id")
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("envoy rejects %s: %v\n%s", f, err, b)
		}
	}
}

// TestSPIFFEBootstrapIsValid: `knhk envoy-config --spiffe` (SVID over SDS
// from the SPIRE agent, mTLS to knhk checking its SPIFFE ID) is accepted by
// Envoy 1.40, and refused without the identity it needs.
func TestSPIFFEBootstrapIsValid(t *testing.T) {
	needEnvoy(t)
	dir := t.TempDir()
	cfg := filepath.Join(dir, "knhk.yaml")
	body := "identity:\n  trust_domain: example.org\n  allowed: {extproc: [\"spiffe://example.org/envoy\"], xds: [\"spiffe://example.org/envoy\"], admin: [\"spiffe://example.org/op\"]}\n"
	if err := os.WriteFile(cfg, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "envoy.yaml")
	err := harness.EnvoyConfig(filepath.Join(binDir, "knhk"), cfg, out, "--spiffe",
		"--spiffe-envoy-id", "spiffe://example.org/envoy", "--spiffe-knhk-id", "spiffe://example.org/knhk")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(out)
	for _, want := range []string{"spire_agent", "tls_certificate_sds_secret_configs", "spiffe://example.org/knhk", "name: spiffe://example.org"} {
		if !strings.Contains(string(b), want) {
			t.Fatalf("SPIFFE bootstrap lacks %q", want)
		}
	}
	envoy, _ := harness.EnvoyPath()
	if o, err := exec.Command(envoy, "--mode", "validate", "-c", out, "--use-dynamic-base-id").CombinedOutput(); err != nil {
		t.Fatalf("envoy rejects the SPIFFE bootstrap: %v\n%s", err, o)
	}
	if err := harness.EnvoyConfig(filepath.Join(binDir, "knhk"), filepath.Join(dir, "knhk.yaml"), out, "--spiffe"); err == nil {
		t.Fatal("--spiffe without the IDs was accepted")
	}
}
