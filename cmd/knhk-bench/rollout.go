package main

import (
	"fmt"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/knhk/knhk/internal/harness"
	"github.com/knhk/knhk/pkg/config"
	"github.com/knhk/knhk/xds"
)

func post(admin, path string) error { return harness.PostOK(admin + path) }

func getJSON(url string, v any) error { return harness.GetJSON(url, v) }

type phaseView struct {
	Phase  string
	Weight float64
}

func waitPhase(admin string, timeout time.Duration, phases ...string) (string, error) {
	var v phaseView
	err := harness.Poll(timeout, 20*time.Millisecond, func() error {
		if err := getJSON(admin+"/v1/rollout", &v); err != nil {
			return err
		}
		if !slices.Contains(phases, v.Phase) {
			return fmt.Errorf("phase %s", v.Phase)
		}
		return nil
	})
	return v.Phase, err
}

func pct(d []time.Duration, p float64) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[min(len(s)-1, int(p*float64(len(s))))]
}

// rollbackReaction: 1,000 req/s, canary at 10 %, canary switches to 100 %
// 5xx; time from fault onset to the last canary request at the upstream.
func rollbackReaction(bin, work string, logs *harness.LogBuffer, runs int) error {
	s, err := harness.StartStack(harness.StackOptions{BinDir: bin, Dir: filepath.Join(work, "rollback"), Weight: 0,
		FailureModeAllow: true, Logs: logs, Configure: func(c *config.Config) {
			c.Rollout.Steps = []float64{10, 100}
			c.Rollout.Interval = config.Duration(time.Hour) // only the hard breach may act
		}})
	if err != nil {
		return err
	}
	defer func() { _ = s.Close() }()
	load := harness.StartLoad(s.URL, 1000, "rb")
	defer load.Stop()
	admin := s.Knhk.AdminURL()
	var reactions []time.Duration
	fmt.Printf("\nrollback reaction: 1,000 req/s, canary at 10 %%, canary → 100 %% 5xx, %d runs\n", runs)
	for run := 1; run <= runs; run++ {
		if err := post(admin, "/v1/rollout/start"); err != nil {
			return err
		}
		base := s.Canary.Count()
		if err := harness.Poll(10*time.Second, 10*time.Millisecond, func() error {
			if s.Canary.Count()-base < 200 {
				return fmt.Errorf("canary not yet at speed")
			}
			return nil
		}); err != nil {
			return err
		}
		onset := time.Now()
		if err := s.Canary.SetFault(1, 0); err != nil {
			return err
		}
		last, err := s.Canary.LastRequestBeforeQuiet(time.Second, 30*time.Second)
		if err != nil {
			return err
		}
		_ = s.Canary.SetFault(0, 0)
		if _, err := waitPhase(admin, 5*time.Second, "RolledBack"); err != nil {
			return err
		}
		r := last.Sub(onset)
		reactions = append(reactions, r)
		fmt.Printf("  run %2d: %s\n", run, r.Round(time.Millisecond))
	}
	fmt.Printf("  → p50 %s, p95 %s, max %s (target p95 ≤ 2 s; Flagger's fastest documented: interval 10 s × threshold)\n",
		pct(reactions, 0.5).Round(time.Millisecond), pct(reactions, 0.95).Round(time.Millisecond), slices.Max(reactions).Round(time.Millisecond))
	return nil
}

// falseRollbacks: healthy canary, runs to 100 %, count rollbacks.
func falseRollbacks(bin, work string, logs *harness.LogBuffer, runs int) error {
	s, err := harness.StartStack(harness.StackOptions{BinDir: bin, Dir: filepath.Join(work, "healthy"), Weight: 0,
		FailureModeAllow: true, Logs: logs, Configure: func(c *config.Config) {
			c.Rollout.Steps = []float64{5, 10, 25, 50, 100}
			c.Rollout.Interval = config.Duration(time.Second)
			c.Rollout.MinRequests = 20
		}})
	if err != nil {
		return err
	}
	defer func() { _ = s.Close() }()
	load := harness.StartLoad(s.URL, 1000, "healthy")
	defer load.Stop()
	admin := s.Knhk.AdminURL()
	fmt.Printf("\nfalse rollbacks: healthy canary, 1,000 req/s, steps 5→10→25→50→100 every 1 s (min_requests 20, other thresholds default), %d runs\n", runs)
	rollbacks := 0
	var took []time.Duration
	for run := 1; run <= runs; run++ {
		t0 := time.Now()
		if err := post(admin, "/v1/rollout/start"); err != nil {
			return err
		}
		phase, err := waitPhase(admin, 60*time.Second, "Promoted", "RolledBack")
		if err != nil {
			return err
		}
		took = append(took, time.Since(t0))
		if phase == "RolledBack" {
			rollbacks++
			var v struct {
				Decisions []struct{ Reason, Detail string }
			}
			_ = getJSON(admin+"/v1/rollout", &v)
			d := v.Decisions[len(v.Decisions)-1]
			fmt.Printf("  run %2d: ROLLED BACK (%s: %s)\n", run, d.Reason, d.Detail)
		}
	}
	fmt.Printf("  → %d false rollbacks in %d runs to 100 %% (target 0); median run %s\n", rollbacks, runs, pct(took, 0.5).Round(time.Millisecond))
	return nil
}

// xdsPropagation: 100 state changes, each waited for; knhk measures the time
// from the change to Envoy's ACK of the route table carrying it.
func xdsPropagation(bin, work string, logs *harness.LogBuffer, changes int) error {
	s, err := harness.StartStack(harness.StackOptions{BinDir: bin, Dir: filepath.Join(work, "xds"), Weight: 0,
		FailureModeAllow: true, Logs: logs, Configure: func(c *config.Config) {
			c.Rollout.Interval = config.Duration(time.Hour)
		}})
	if err != nil {
		return err
	}
	defer func() { _ = s.Close() }()
	admin := s.Knhk.AdminURL()
	var st xds.Status
	if err := getJSON(admin+"/v1/xds", &st); err != nil {
		return err
	}
	before := st.Propagations
	for i := range changes {
		action := "/v1/rollout/start"
		if i%2 == 1 {
			action = "/v1/rollout/abort"
		}
		if err := post(admin, action); err != nil {
			return err
		}
		if err := harness.Poll(5*time.Second, 2*time.Millisecond, func() error {
			if err := getJSON(admin+"/v1/xds", &st); err != nil {
				return err
			}
			if st.AckedVersion < st.Version {
				return fmt.Errorf("version %d acked %d", st.Version, st.AckedVersion)
			}
			return nil
		}); err != nil {
			return err
		}
	}
	fmt.Printf("\nxDS propagation (state change → Envoy ACK of the route table, delta ADS), %d changes: p50 %.2f ms, p99 %.2f ms (target p99 ≤ 100 ms)\n",
		st.Propagations-before, st.PropagationP50, st.PropagationP99)
	return nil
}

// promValue reads one unlabelled sample from a /metrics page.
func promValue(adminURL, name string) (float64, error) {
	lines, err := scrape(adminURL, name+" ")
	if err != nil {
		return 0, err
	}
	if len(lines) == 0 {
		return 0, fmt.Errorf("%s not in /metrics", name)
	}
	return strconv.ParseFloat(strings.TrimSpace(lines[0]), 64)
}
