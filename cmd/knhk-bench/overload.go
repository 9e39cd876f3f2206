package main

import (
	"fmt"
	"path/filepath"
	"time"

	"github.com/knhk/knhk/internal/harness"
	"github.com/knhk/knhk/pkg/config"
)

// overloadBench: an upstream of fixed capacity (10 in flight × 20 ms =
// 500 req/s) offered 3× that, 20 % R1 / 50 % W1 / 30 % C1, through real
// Envoy, side by side: no admission; Envoy's own adaptive_concurrency
// filter (class-blind); knhk's admission.
func overloadBench(bin, work string, logs *harness.LogBuffer) error {
	const capacity, rate = 500.0, 1500
	warm, measure := 5*time.Second, 10*time.Second
	mk := func(name string, enabled bool) (*harness.Stack, error) {
		s, err := harness.StartStack(harness.StackOptions{BinDir: bin, Dir: filepath.Join(work, name), Weight: 0,
			FailureModeAllow: true, Logs: logs, Configure: func(c *config.Config) {
				c.Admission.Enabled = enabled
				c.Admission.Rules = []config.ClassRule{{Class: "R1", PathPrefix: "/r1"}, {Class: "C1", PathPrefix: "/c1"}}
				c.Envoy.RouteTimeout = config.Duration(2 * time.Second)
				c.Envoy.MessageTimeout = config.Duration(time.Second)
				c.Receipts.Enabled = false // admission alone, as the baselines have no receipts
			}})
		if err != nil {
			return nil, err
		}
		s.Stable.SetCapacity(10, 20*time.Millisecond)
		return s, nil
	}
	off, err := mk("overload-off", false)
	if err != nil {
		return err
	}
	defer func() { _ = off.Close() }()
	acURL, acEnvoy, err := extraEnvoy(bin, work, "adaptive", off, off.Knhk.Config.Listen.GRPC, true, logs, "--baseline-adaptive-concurrency")
	if err != nil {
		return err
	}
	defer func() { _ = acEnvoy.Stop() }()
	on, err := mk("overload-on", true)
	if err != nil {
		return err
	}
	defer func() { _ = on.Close() }()

	fmt.Printf("\noverload: upstream 10 in flight × 20 ms = %.0f req/s, offered %d req/s (3×), 20%% R1 (50 ms) / 50%% W1 (500 ms) / 30%% C1 (24 h); %s warm-up, %s measured\n",
		capacity, rate, warm, measure)
	fmt.Printf("\n| setup | class | sent | ok within budget | goodput | p99 of successes | 429 (Retry-After) | 503 shed | timeouts/other |\n|---|---|---|---|---|---|---|---|---|\n")
	for _, st := range []struct{ name, url string }{
		{"no admission", off.URL}, {"Envoy adaptive_concurrency", acURL}, {"knhk admission", on.URL},
	} {
		tally := harness.Overload(st.url, rate, warm, measure)
		total := 0
		for _, class := range []string{"R1", "W1", "C1"} {
			c := tally[class]
			total += c.WithinBudget
			fmt.Printf("| %s | %s | %d | %d (%.1f%%) | %.0f req/s | %s | %d (%d) | %d | %d |\n", st.name, class, c.Sent, c.WithinBudget,
				100*float64(c.WithinBudget)/float64(max(1, c.Sent)), float64(c.WithinBudget)/measure.Seconds(),
				c.P99().Round(100*time.Microsecond), c.Shed429, c.RetryAfter, c.Shed503, c.Other)
		}
		fmt.Printf("| %s | all | | | **%.0f req/s (%.0f%% of capacity)** | | | | |\n", st.name, float64(total)/measure.Seconds(),
			100*float64(total)/measure.Seconds()/capacity)
		// Let queued requests time out (route timeout 2 s) before the next setup.
		_ = harness.Poll(30*time.Second, 200*time.Millisecond, func() error {
			if x := attack(st.url+"/w1", 20, time.Second); x.p99 > 100*time.Millisecond {
				return fmt.Errorf("still queued")
			}
			return nil
		})
	}
	return nil
}
