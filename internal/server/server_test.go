package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/knhk/knhk/internal/harness"
	"github.com/knhk/knhk/pkg/canary"
	"github.com/knhk/knhk/pkg/config"
	"github.com/knhk/knhk/pkg/promotion"
)

func testConfig(t *testing.T) config.Config {
	c := config.Default()
	c.Listen.GRPC, c.Listen.Admin, c.Listen.XDS = "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"
	c.DataDir = filepath.Join(t.TempDir(), "data")
	return c
}

func TestServeReadyReloadDrain(t *testing.T) {
	s, err := New(testConfig(t), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	base := "http://" + s.AdminAddr()
	if err := harness.Poll(5*time.Second, 10*time.Millisecond, func() error { return harness.HTTPOK(base + "/readyz") }); err != nil {
		t.Fatal(err)
	}

	next := testConfig(t)
	next.Canary.Weight = 55
	if err := s.ReloadFrom(func() (config.Config, error) { return next, nil }); err != nil {
		t.Fatal(err)
	}
	resp, err := http.Get(base + "/v1/canary")
	if err != nil {
		t.Fatal(err)
	}
	var v canaryView
	_ = json.NewDecoder(resp.Body).Decode(&v)
	_ = resp.Body.Close()
	if v.Weight != 55 || s.extproc.Router().Splitter().Weight() != 55 {
		t.Fatalf("reload not applied: api %v, router %v", v.Weight, s.extproc.Router().Splitter().Weight())
	}
	bad := next
	bad.Canary.Weight = 500
	if err := s.ReloadFrom(func() (config.Config, error) { return bad, nil }); err == nil || s.extproc.Router().Splitter().Weight() != 55 {
		t.Fatal("invalid reload accepted or applied")
	}

	resp, err = http.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	for _, m := range []string{"knhk_rollout_weight 55", `knhk_config_reloads_total{result="error"} 1`, "knhk_canary_decisions_total"} {
		if !strings.Contains(string(body), m) {
			t.Errorf("/metrics lacks %q", m)
		}
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("drain did not finish")
	}
}

func TestNewRejectsTakenPort(t *testing.T) {
	a, err := New(testConfig(t), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	c := testConfig(t)
	c.Listen.GRPC = a.GRPCAddr()
	if _, err := New(c, slog.New(slog.DiscardHandler)); err == nil || !strings.Contains(err.Error(), "listen.grpc") {
		t.Fatalf("taken port: %v", err)
	}
}

// serve starts s and stops it at cleanup; it returns the admin base URL.
func serve(t *testing.T, s *Server) string {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			t.Error("server did not stop")
		}
	})
	base := "http://" + s.AdminAddr()
	if err := harness.Poll(5*time.Second, 10*time.Millisecond, func() error { return harness.HTTPOK(base + "/readyz") }); err != nil {
		t.Fatal(err)
	}
	return base
}

func metricsPage(t *testing.T, base string) string {
	t.Helper()
	resp, err := http.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// TestRejectedReloadsAreCounted: a config file that fails to load is a
// rejected reload too, not only one that fails to apply.
func TestRejectedReloadsAreCounted(t *testing.T) {
	s, err := New(testConfig(t), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	base := serve(t, s)
	for range 2 {
		if err := s.ReloadFrom(func() (config.Config, error) { return config.Config{}, errors.New("config.yaml: line 3: bad") }); err == nil {
			t.Fatal("a config that failed to load was applied")
		}
	}
	if page := metricsPage(t, base); !strings.Contains(page, `knhk_config_reloads_total{result="error"} 2`) {
		t.Fatalf("rejected reloads not counted:\n%s", grepLines(page, "knhk_config_reloads_total"))
	}
}

func grepLines(page, prefix string) string {
	var out []string
	for _, l := range strings.Split(page, "\n") {
		if strings.HasPrefix(l, prefix) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// TestControlPlaneUnderConcurrentActionsReloadsAndReads: what operators do
// at once — actions, reloads, reads — is answered promptly, and afterwards
// the rollout, the hash split and the exported weight agree. The server's
// lock and the rollout's once formed a cycle that wedged every reader.
func TestControlPlaneUnderConcurrentActionsReloadsAndReads(t *testing.T) {
	cfg := testConfig(t)
	cfg.Rollout.Interval = config.Duration(100 * time.Millisecond)
	s, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	base := serve(t, s)
	var slowest atomic.Int64
	call := func(method, path string) {
		start := time.Now()
		req, _ := http.NewRequest(method, base+path, nil)
		c := &http.Client{Timeout: 10 * time.Second}
		resp, err := c.Do(req)
		if err != nil {
			t.Errorf("%s %s: %v", method, path, err)
			return
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		_ = resp.Body.Close()
		if d := time.Since(start); d > time.Duration(slowest.Load()) {
			slowest.Store(int64(d))
		}
	}
	stop := time.Now().Add(3 * time.Second)
	var wg sync.WaitGroup
	loops := []func(i int){
		func(i int) { call("POST", "/v1/rollout/"+[]string{"start", "promote", "abort"}[i%3]) },
		func(i int) { call("POST", "/v1/rollout/"+[]string{"pause", "resume", "start"}[i%3]) },
		func(int) { call("GET", "/v1/canary") },
		func(int) { call("GET", "/v1/rollout") },
		func(i int) {
			next := cfg
			next.Canary.Weight = float64(i % 7)
			if err := s.ReloadFrom(func() (config.Config, error) { return next, nil }); err != nil {
				t.Errorf("reload: %v", err)
			}
		},
	}
	for _, f := range loops {
		wg.Go(func() {
			for i := 0; time.Now().Before(stop); i++ {
				f(i)
			}
		})
	}
	finished := make(chan struct{})
	go func() { wg.Wait(); close(finished) }()
	select {
	case <-finished:
	case <-time.After(60 * time.Second):
		t.Fatal("control plane wedged")
	}
	if d := time.Duration(slowest.Load()); d > 2*time.Second {
		t.Errorf("slowest admin call took %v, want ≤ 2 s", d)
	}
	_ = harness.PostOK(base + "/v1/rollout/pause") // a fixed weight to compare
	w := s.rollout.Weight()
	if rw := s.extproc.Router().Splitter().Weight(); rw != w {
		t.Errorf("hash split at %v, rollout at %v", rw, w)
	}
	if page := metricsPage(t, base); !strings.Contains(page, fmt.Sprintf("knhk_rollout_weight %v\n", w)) {
		t.Errorf("exported weight disagrees with %v:\n%s", w, grepLines(page, "knhk_rollout_weight"))
	}
}

// TestRollbackWithNoAbsoluteErrorLimitIsSavedAndServed: max_error_rate 0
// and a canary failing every request against a clean stable once produced
// +Inf, after which the state store and GET /v1/rollout both failed.
func TestRollbackWithNoAbsoluteErrorLimitIsSavedAndServed(t *testing.T) {
	cfg := testConfig(t)
	cfg.Rollout.MaxErrorRate = 0
	cfg.Rollout.HardMinRequests = 1 << 20 // never fills: the analysis must decide
	cfg.Rollout.Interval = config.Duration(200 * time.Millisecond)
	cfg.Rollout.MinRequests = 20
	s, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	base := serve(t, s)
	if err := harness.PostOK(base + "/v1/rollout/start"); err != nil {
		t.Fatal(err)
	}
	var v RolloutView
	err = harness.Poll(20*time.Second, 20*time.Millisecond, func() error {
		for range 50 {
			s.rollout.Observe(canary.Canary, true, time.Millisecond)
			s.rollout.Observe(canary.Stable, false, time.Millisecond)
		}
		if err := harness.GetJSON(base+"/v1/rollout", &v); err != nil {
			return err
		}
		if v.Phase != promotion.RolledBack {
			return fmt.Errorf("phase %s", v.Phase)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	last := v.Decisions[len(v.Decisions)-1]
	if last.Decision != "rollback" || last.Reason != "error_rate" {
		t.Fatalf("last decision %+v, want a rollback for error_rate", last)
	}
	for _, d := range v.Decisions {
		if d.Decision == "error" {
			t.Fatalf("state not saved: %+v", d)
		}
	}
}

// TestPprofOnlyWhenAskedFor: profiles are served on the admin listener
// with debug.pprof, and not without it.
func TestPprofOnlyWhenAskedFor(t *testing.T) {
	for _, on := range []bool{false, true} {
		cfg := testConfig(t)
		cfg.Debug.Pprof = on
		s, err := New(cfg, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		base := serve(t, s)
		resp, err := http.Get(base + "/debug/pprof/heap?debug=1")
		if err != nil {
			t.Fatal(err)
		}
		_ = resp.Body.Close()
		if want := map[bool]int{false: http.StatusNotFound, true: http.StatusOK}[on]; resp.StatusCode != want {
			t.Errorf("debug.pprof %v: /debug/pprof/heap answered %d, want %d", on, resp.StatusCode, want)
		}
	}
}
