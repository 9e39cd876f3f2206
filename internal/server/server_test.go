package server

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/knhk/knhk/internal/harness"
	"github.com/knhk/knhk/pkg/config"
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
	if err := s.Reload(next); err != nil {
		t.Fatal(err)
	}
	resp, err := http.Get(base + "/v1/canary")
	if err != nil {
		t.Fatal(err)
	}
	var v canaryView
	_ = json.NewDecoder(resp.Body).Decode(&v)
	_ = resp.Body.Close()
	if v.Weight != 55 || s.ExtProc().Router().Splitter().Weight() != 55 {
		t.Fatalf("reload not applied: api %v, router %v", v.Weight, s.ExtProc().Router().Splitter().Weight())
	}
	bad := next
	bad.Canary.Weight = 500
	if err := s.Reload(bad); err == nil || s.ExtProc().Router().Splitter().Weight() != 55 {
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
