// Command knhk-demo is `make demo`: it starts two demo upstreams, knhk and
// Envoy (through func-e) with the committed envoy/knhk.yaml and
// envoy/envoy.yaml, sends traffic from a few hundred users and prints the
// live split until Ctrl-C, or for DEMO_SECONDS seconds.
package main

import (
	"context"
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
	fault := os.Getenv("FAULT")
	if fault != "" && fault != "errors" && fault != "latency" {
		return fmt.Errorf("FAULT=%q: want errors or latency", fault)
	}
	fmt.Printf("Envoy on %s → knhk (ext_proc %s, xDS %s, admin %s) → stable %s / canary %s\n",
		url, cfg.Listen.GRPC, cfg.Listen.XDS, knhkAdmin, cfg.Upstreams.Stable[0], cfg.Upstreams.Canary[0])
	fmt.Printf("rollout steps %v every %s; watch it with: bin/knhk status --watch\n\n", cfg.Rollout.Steps, cfg.Rollout.Interval.D())
	d := &demo{admin: knhkAdmin, canaryUpstream: "http://" + cfg.Upstreams.Canary[0], fault: fault}
	if err := d.post("/v1/rollout/start"); err != nil {
		return err
	}
	return d.traffic(ctx, url, 5000)
}

type demo struct {
	admin, canaryUpstream, fault string
	injected                     bool
}

var demoClient = &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 16}}

func (d *demo) post(path string) error {
	base := d.admin
	if strings.HasPrefix(path, "/fault") {
		base = d.canaryUpstream
	}
	return harness.PostOK(base + path)
}

type rolloutState struct {
	Phase     string
	Weight    float64
	Decisions []struct {
		Decision, Reason, Detail string
	}
}

func (d *demo) rollout() (rolloutState, error) {
	var st rolloutState
	return st, harness.GetJSON(d.admin+"/v1/rollout", &st)
}

// traffic sends requests from n users (each sticky by x-user-id) and prints
// the split and the rollout once a second. With FAULT set, the canary is
// broken once the rollout reaches 10 %.
func (d *demo) traffic(ctx context.Context, url string, users int) error {
	var stable, canary, failed, canaryFailed atomic.Int64
	for w := range 8 {
		go func() {
			r := rand.New(rand.NewPCG(uint64(w), 7)) //nolint:gosec // picks demo users, not secrets
			for ctx.Err() == nil {
				req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
				req.Header.Set("x-user-id", "user-"+strconv.Itoa(r.IntN(users)))
				resp, err := demoClient.Do(req)
				if err != nil {
					if ctx.Err() == nil {
						failed.Add(1)
					}
					continue
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				_ = resp.Body.Close()
				isCanary := resp.Header.Get("x-knhk-version") == "canary"
				switch {
				case resp.StatusCode != http.StatusOK:
					failed.Add(1)
					if isCanary {
						canaryFailed.Add(1)
					}
				case isCanary:
					canary.Add(1)
				default:
					stable.Add(1)
				}
				time.Sleep(2 * time.Millisecond) // a gentle load, leaving CPU for Envoy
			}
		}()
	}
	fmt.Printf("%6s %-12s %7s %9s %9s %8s %10s  %s\n", "time", "phase", "weight", "stable/s", "canary/s", "failed/s", "canary %", "last decision")
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	t0 := time.Now()
	var ps, pc, pf int64
	for {
		select {
		case <-ctx.Done():
			fmt.Println(strings.Repeat("-", 100))
			fmt.Println("demo finished")
			return nil
		case <-tick.C:
			s, c, f := stable.Load(), canary.Load(), failed.Load()
			ds, dc, df := s-ps, c-pc, f-pf
			ps, pc, pf = s, c, f
			share := 0.0
			if ds+dc > 0 {
				share = float64(dc) / float64(ds+dc) * 100
			}
			st, err := d.rollout()
			if err != nil {
				fmt.Println("knhk:", err)
				continue
			}
			last := ""
			if n := len(st.Decisions); n > 0 {
				last = st.Decisions[n-1].Decision + ": " + st.Decisions[n-1].Detail
			}
			fmt.Printf("%5.0fs %-12s %6.1f%% %9d %9d %8d %9.1f%%  %s\n", time.Since(t0).Seconds(), st.Phase, st.Weight, ds, dc, df, share, last)
			if d.fault != "" && !d.injected && st.Weight >= 10 && st.Phase == "Progressing" {
				q := "/fault?error_rate=0.3"
				if d.fault == "latency" {
					q = "/fault?latency=100ms"
				}
				if err := d.post(q); err != nil {
					return err
				}
				d.injected = true
				fmt.Printf("       >>> FAULT=%s injected into the canary (%s)\n", d.fault, q)
			}
		}
	}
}
