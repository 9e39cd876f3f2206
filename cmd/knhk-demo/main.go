// Command knhk-demo is `make demo`: it starts two demo upstreams, knhk and
// Envoy (through func-e) with the committed envoy/knhk.yaml and
// envoy/envoy.yaml, sends traffic from a few hundred users and prints the
// live split until Ctrl-C, or for DEMO_SECONDS seconds.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/knhk/knhk/internal/harness"
	"github.com/knhk/knhk/pkg/config"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func run() error {
	root, err := harness.RepoRoot()
	if err != nil {
		return err
	}
	bin := filepath.Join(root, "bin")
	cfgPath := filepath.Join(root, "envoy", "knhk.yaml")
	cfg, err := config.Load(cfgPath)
	if err != nil {
		return err
	}
	for _, a := range []string{cfg.Listen.GRPC, cfg.Listen.Admin, cfg.Upstreams.Stable[0], cfg.Upstreams.Canary[0],
		net.JoinHostPort("127.0.0.1", strconv.Itoa(cfg.Envoy.ListenerPort)), net.JoinHostPort("127.0.0.1", strconv.Itoa(cfg.Envoy.AdminPort))} {
		if l, err := net.Listen("tcp", a); err != nil {
			return fmt.Errorf("port %s is taken (is another demo running?): %w", a, err)
		} else {
			_ = l.Close()
		}
	}
	work, err := os.MkdirTemp("", "knhk-demo")
	if err != nil {
		return err
	}
	defer func() { _ = os.RemoveAll(work) }()
	logPath := filepath.Join(work, "demo.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return err
	}
	defer func() { _ = logFile.Close() }()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if s := os.Getenv("DEMO_SECONDS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n <= 0 {
			return fmt.Errorf("DEMO_SECONDS=%q: want a positive whole number of seconds", s)
		}
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, time.Duration(n)*time.Second)
		defer cancel()
	}

	var procs []*exec.Cmd
	defer func() {
		for _, p := range procs {
			_ = p.Process.Signal(syscall.SIGTERM)
			_ = p.Wait()
		}
	}()
	start := func(name string, args ...string) error {
		cmd := exec.Command(filepath.Join(bin, name), args...)
		cmd.Stdout, cmd.Stderr = logFile, logFile
		if err := cmd.Start(); err != nil {
			return fmt.Errorf("start %s (run `make build`): %w", name, err)
		}
		procs = append(procs, cmd)
		return nil
	}
	if err := start("knhk-demo-upstream", "--name", "stable", "--addr", cfg.Upstreams.Stable[0]); err != nil {
		return err
	}
	if err := start("knhk-demo-upstream", "--name", "canary", "--addr", cfg.Upstreams.Canary[0]); err != nil {
		return err
	}
	if err := start("knhk", "serve", "--config", cfgPath, "--data-dir", filepath.Join(work, "data")); err != nil {
		return err
	}
	knhkAdmin := "http://" + cfg.Listen.Admin
	if err := harness.Poll(20*time.Second, 50*time.Millisecond, func() error { return harness.HTTPOK(knhkAdmin + "/readyz") }); err != nil {
		return fmt.Errorf("knhk not ready (log: %s): %w", logPath, err)
	}
	envoy, err := harness.StartEnvoy(filepath.Join(root, "envoy", "envoy.yaml"), cfg.Envoy.AdminPort, work, logFile)
	if err != nil {
		return err
	}
	defer func() { _ = envoy.Stop() }()
	if err := envoy.WaitReady(30 * time.Second); err != nil {
		return fmt.Errorf("envoy not ready (log: %s): %w", logPath, err)
	}

	url := fmt.Sprintf("http://127.0.0.1:%d/", cfg.Envoy.ListenerPort)
	fmt.Printf("Envoy on %s → knhk (ext_proc %s, admin %s) → stable %s / canary %s\n",
		url, cfg.Listen.GRPC, knhkAdmin, cfg.Upstreams.Stable[0], cfg.Upstreams.Canary[0])
	fmt.Printf("canary weight %.2f%%, salt %q; 300 users; try: curl -i -H 'x-user-id: alice' %s\n\n", cfg.Canary.Weight, cfg.Canary.Salt, url)
	return traffic(ctx, url, 300)
}

// traffic sends requests from n users (each sticky by x-user-id) and prints
// the split once a second.
func traffic(ctx context.Context, url string, users int) error {
	var stable, canary, failed atomic.Int64
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 16}}
	for w := range 8 {
		go func() {
			r := rand.New(rand.NewPCG(uint64(w), 7)) //nolint:gosec // picks demo users, not secrets
			for ctx.Err() == nil {
				req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
				req.Header.Set("x-user-id", "user-"+strconv.Itoa(r.IntN(users)))
				resp, err := client.Do(req)
				if err != nil {
					if !errors.Is(ctx.Err(), context.Canceled) && ctx.Err() == nil {
						failed.Add(1)
					}
					continue
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				_ = resp.Body.Close()
				switch {
				case resp.StatusCode != http.StatusOK:
					failed.Add(1)
				case resp.Header.Get("x-knhk-version") == "canary":
					canary.Add(1)
				default:
					stable.Add(1)
				}
				time.Sleep(5 * time.Millisecond) // a gentle ~1,500 req/s, leaving CPU for Envoy
			}
		}()
	}
	fmt.Printf("%8s %10s %10s %8s %14s\n", "time", "stable", "canary", "failed", "canary share")
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	t0 := time.Now()
	for {
		select {
		case <-ctx.Done():
			fmt.Println(strings.Repeat("-", 54))
			fmt.Println("demo finished")
			return nil
		case <-tick.C:
			s, c, f := stable.Load(), canary.Load(), failed.Load()
			share := 0.0
			if s+c > 0 {
				share = float64(c) / float64(s+c) * 100
			}
			fmt.Printf("%7.0fs %10d %10d %8d %13.2f%%\n", time.Since(t0).Seconds(), s, c, f, share)
		}
	}
}
