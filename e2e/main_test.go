// Package e2e runs knhk against a real Envoy 1.40 (started through func-e's
// Go API with the binary `make tools` installs). Nothing here is skipped
// when a tool is missing: the test fails and prints how to install it.
package e2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/knhk/knhk/internal/harness"
)

var binDir string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "knhk-e2e-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	err = harness.BuildBinaries(ctx, dir)
	cancel()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binDir = dir
	code := m.Run()
	_ = os.RemoveAll(dir)
	os.Exit(code)
}

// needEnvoy fails the test (never skips) when Envoy is not installed.
func needEnvoy(t *testing.T) {
	t.Helper()
	if _, err := harness.EnvoyPath(); err != nil {
		t.Fatal(err)
	}
}

// logs returns a buffer whose content is attached to the test output if
// the test fails.
func logs(t *testing.T) *harness.LogBuffer {
	t.Helper()
	b := &harness.LogBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			// The whole output goes to a file; the test log gets its
			// summarised tail, short enough that a CI log's tail still
			// shows the assertion that failed just above it.
			path := filepath.Join(os.TempDir(), "knhk-e2e-"+strings.ReplaceAll(t.Name(), "/", "_")+".log")
			if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
				path = "not saved: " + err.Error()
			}
			t.Logf("---- the end of Envoy's and knhk's output (all of it: %s) ----\n%s", path, b.Summary(15))
		}
	})
	return b
}

// startStack starts Envoy + knhk + two upstreams and stops them at cleanup.
func startStack(t *testing.T, o harness.StackOptions) *harness.Stack {
	t.Helper()
	needEnvoy(t)
	o.BinDir = binDir
	if o.Dir == "" {
		o.Dir = t.TempDir()
	}
	if o.Logs == nil {
		o.Logs = logs(t)
	}
	s, err := harness.StartStack(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("stopping stack: %v", err)
		}
	})
	return s
}

var client = &http.Client{
	Timeout:   10 * time.Second,
	Transport: &http.Transport{MaxIdleConnsPerHost: 64, MaxConnsPerHost: 64},
}

// result is one response seen by the client.
type result struct {
	status  int
	version string // x-knhk-version on the response
	body    string // upstream name
	header  http.Header
}

func get(url string, headers map[string]string) (result, error) {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return result{}, err
	}
	for k, v := range headers {
		req.Header.Set(k, v)
	}
	resp, err := client.Do(req)
	if err != nil {
		return result{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return result{}, err
	}
	return result{status: resp.StatusCode, version: resp.Header.Get("x-knhk-version"),
		body: strings.TrimSpace(string(b)), header: resp.Header}, nil
}

// parallel runs f(0..n-1) on workers goroutines and returns the first error.
func parallel(n, workers int, f func(i int) error) error {
	var next atomic.Int64
	var once sync.Once
	var first error
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				if err := f(i); err != nil {
					once.Do(func() { first = err })
					return
				}
			}
		}()
	}
	wg.Wait()
	return first
}

// runCmd runs a command and returns its combined output.
func runCmd(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).CombinedOutput()
	return string(out), err
}
