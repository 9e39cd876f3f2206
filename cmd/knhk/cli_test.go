package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/knhk/knhk/internal/harness"
	"github.com/knhk/knhk/internal/server"
	"github.com/knhk/knhk/pkg/promotion"
)

// runCLI runs the command line in-process and returns exit code, stdout, stderr.
func runCLI(args ...string) (int, string, string) {
	var out, errb bytes.Buffer
	code := run(args, &out, &errb)
	return code, out.String(), errb.String()
}

// fakeAdmin answers the admin endpoints the CLI reads with view.
func fakeAdmin(t *testing.T, view server.RolloutView) *httptest.Server {
	t.Helper()
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/rollout", func(w http.ResponseWriter, _ *http.Request) {
		_ = json.NewEncoder(w).Encode(view)
	})
	mux.HandleFunc("POST /v1/rollout/{action}", func(w http.ResponseWriter, _ *http.Request) {
		_ = json.NewEncoder(w).Encode(view)
	})
	mux.HandleFunc("GET /v1/capacity", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte(`{"key":"path"}`))
	})
	s := httptest.NewServer(mux)
	t.Cleanup(s.Close)
	return s
}

func idleView() server.RolloutView {
	return server.RolloutView{Phase: promotion.Idle, Weight: 20, Steps: []float64{1, 5, 10, 25, 50, 100}}
}

func TestAdminBase(t *testing.T) {
	for in, want := range map[string]string{
		"127.0.0.1:9090":               "http://127.0.0.1:9090",
		"localhost:9090":               "http://localhost:9090",
		"knhk.svc.cluster.local:9090":  "http://knhk.svc.cluster.local:9090",
		"[::1]:9090":                   "http://[::1]:9090",
		":9090":                        "http://127.0.0.1:9090",
		"http://127.0.0.1:9090":        "http://127.0.0.1:9090",
		"http://127.0.0.1:9090/":       "http://127.0.0.1:9090",
		"https://knhk.example.org":     "https://knhk.example.org",
		"HTTPS://knhk.example.org/x/":  "https://knhk.example.org/x",
		" http://127.0.0.1:9090 ":      "http://127.0.0.1:9090",
		"https://knhk.example.org:443": "https://knhk.example.org:443",
	} {
		got, err := adminBase(in)
		if err != nil || got != want {
			t.Errorf("adminBase(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for in, want := range map[string]string{
		"":                          "empty",
		"127.0.0.1":                 `"127.0.0.1": want host:port`,
		"127.0.0.1:http":            `"127.0.0.1:http": port must be 1..65535`,
		"127.0.0.1:0":               `"127.0.0.1:0": port must be 1..65535`,
		"ftp://127.0.0.1:9090":      `"ftp://127.0.0.1:9090": scheme must be http or https`,
		"http://":                   `"http://": no host`,
		"http://127.0.0.1:9090?a=b": "no query",
		"http://127.0.0.1:99999":    "port must be 1..65535",
	} {
		_, err := adminBase(in)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("adminBase(%q): %v; want an error containing %q", in, err, want)
		}
	}
}

// Every command that talks to the admin API takes host:port as well as a URL,
// from --admin or KNHK_ADMIN.
func TestAdminFlagAcceptsHostPort(t *testing.T) {
	s := fakeAdmin(t, idleView())
	hostPort := strings.TrimPrefix(s.URL, "http://")
	for _, admin := range []string{hostPort, s.URL, s.URL + "/"} {
		for _, cmd := range [][]string{{"status"}, {"status", "--json"}, {"start"}, {"abort"}, {"capacity"}, {"capacity", "--json"}} {
			code, _, stderr := runCLI(append(cmd, "--admin", admin)...)
			if code != 0 {
				t.Errorf("knhk %s --admin %s: exit %d: %s", strings.Join(cmd, " "), admin, code, stderr)
			}
		}
	}
	t.Setenv("KNHK_ADMIN", hostPort)
	if code, _, stderr := runCLI("status"); code != 0 {
		t.Errorf("KNHK_ADMIN=%s knhk status: exit %d: %s", hostPort, code, stderr)
	}
}

func TestBadAdminAddressIsAUsageError(t *testing.T) {
	code, _, stderr := runCLI("status", "--admin", "ftp://x:1")
	if code != 2 || !strings.Contains(stderr, `"ftp://x:1": scheme must be http or https`) || !strings.Contains(stderr, "--admin") {
		t.Fatalf("exit %d: %s", code, stderr)
	}
}

// freeAddr is a loopback address nothing listens on.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	_ = l.Close()
	return addr
}

func TestRefusedConnectionHints(t *testing.T) {
	addr := freeAddr(t)
	want := "cannot reach the admin API at http://" + addr + ": connection refused (is knhk running? set --admin or KNHK_ADMIN)"
	for _, cmd := range [][]string{{"status"}, {"start"}, {"capacity"}} {
		code, _, stderr := runCLI(append(cmd, "--admin", addr)...)
		if code != 1 || !strings.Contains(stderr, want) {
			t.Errorf("knhk %s: exit %d\n got  %s want %s", cmd[0], code, stderr, want)
		}
	}
}

func TestStatusShowsNoStepOutsideARollout(t *testing.T) {
	for phase, want := range map[promotion.Phase]string{
		promotion.Idle:        "",
		promotion.Promoted:    "",
		promotion.RolledBack:  "",
		promotion.Progressing: "step 2/6",
		promotion.Paused:      "step 2/6",
	} {
		v := idleView()
		v.Phase, v.Step = phase, 1
		out := renderStatus(v)
		if want == "" && strings.Contains(out, "step ") {
			t.Errorf("%s: shows a step:\n%s", phase, out)
		}
		if want != "" && !strings.Contains(out, want) {
			t.Errorf("%s: no %q:\n%s", phase, want, out)
		}
	}
}

func TestStatusJSONHasNoNullDecisions(t *testing.T) {
	s := fakeAdmin(t, idleView()) // Decisions nil: encoded as null by the server
	code, stdout, stderr := runCLI("status", "--json", "--admin", s.URL)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	var raw map[string]json.RawMessage
	if err := json.Unmarshal([]byte(stdout), &raw); err != nil {
		t.Fatalf("not JSON: %v\n%s", err, stdout)
	}
	if got := string(raw["decisions"]); got != "[]" {
		t.Fatalf(`"decisions": %s, want []`, got)
	}
}

// --xds-addr overrides listen.xds: a bad value fails validation with that key
// before anything is bound.
func TestServeXDSAddrFlag(t *testing.T) {
	code, _, stderr := runCLI("serve", "--data-dir", t.TempDir(), "--xds-addr", "nope")
	if code != 1 || !strings.Contains(stderr, `listen.xds: "nope" is not host:port`) {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	code, _, stderr = runCLI("serve", "--data-dir", t.TempDir(), "--xds-addr", "127.0.0.1:9002")
	if code != 1 || !strings.Contains(stderr, "listen.xds: same address as listen.grpc") {
		t.Fatalf("exit %d: %s", code, stderr)
	}
}

// poll calls f until it returns nil or the deadline passes.
func poll(t *testing.T, within time.Duration, f func() error) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
		time.Sleep(50 * time.Millisecond) // poll period
	}
}

func get(url string) (string, error) {
	resp, err := http.Get(url) //nolint:gosec,noctx // the test's own server
	if err != nil {
		return "", err
	}
	defer func() { _ = resp.Body.Close() }()
	b, err := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return string(b), fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return string(b), err
}

// A SIGHUP whose file no longer loads is rejected, and counted: the load
// error reaches the server, not only the log.
func TestSIGHUPWithAFileThatDoesNotLoadIsCounted(t *testing.T) {
	dir := t.TempDir()
	admin := freeAddr(t)
	cfgPath := filepath.Join(dir, "knhk.yaml")
	good := fmt.Sprintf("listen: {grpc: %q, xds: %q, admin: %q}\ndata_dir: %q\n", freeAddr(t), freeAddr(t), admin, filepath.Join(dir, "data"))
	if err := os.WriteFile(cfgPath, []byte(good), 0o600); err != nil {
		t.Fatal(err)
	}
	stderr := &harness.LogBuffer{}
	done := make(chan int, 1)
	go func() { done <- run([]string{"serve", "--config", cfgPath}, io.Discard, stderr) }()
	poll(t, 30*time.Second, func() error {
		select {
		case code := <-done:
			t.Fatalf("serve exited %d: %s", code, stderr)
		default:
		}
		_, err := get("http://" + admin + "/readyz")
		return err
	})
	// Serve is running, so its SIGTERM handler is installed and this stops it.
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			_ = syscall.Kill(os.Getpid(), syscall.SIGTERM)
			<-done
		}
	})

	if err := os.WriteFile(cfgPath, []byte(good+"canary:\n  weight: lots\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	const want = `knhk_config_reloads_total{result="error"} 1`
	poll(t, 10*time.Second, func() error {
		m, err := get("http://" + admin + "/metrics")
		if err == nil && !strings.Contains(m, want) {
			err = fmt.Errorf("no %s in /metrics; log:\n%s", want, stderr)
		}
		return err
	})

	stopped = true
	if err := syscall.Kill(os.Getpid(), syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case code := <-done:
		if code != 0 {
			t.Fatalf("serve exited %d after SIGTERM: %s", code, stderr)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("serve did not stop after SIGTERM")
	}
}
