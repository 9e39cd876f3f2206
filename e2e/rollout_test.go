package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/knhk/knhk/internal/harness"
	"github.com/knhk/knhk/internal/server"
	"github.com/knhk/knhk/pkg/config"
)

func rolloutView(t *testing.T, s *harness.Stack) server.RolloutView {
	t.Helper()
	resp, err := client.Get(s.Knhk.AdminURL() + "/v1/rollout")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var v server.RolloutView
	if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
		t.Fatal(err)
	}
	return v
}

func rolloutAction(t *testing.T, s *harness.Stack, action string) (int, string) {
	t.Helper()
	resp, err := client.Post(s.Knhk.AdminURL()+"/v1/rollout/"+action, "application/json", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func mustAction(t *testing.T, s *harness.Stack, action string) {
	t.Helper()
	if code, body := rolloutAction(t, s, action); code != http.StatusOK {
		t.Fatalf("%s: %d %s", action, code, body)
	}
}

// waitPhase polls /v1/rollout until the phase is reached.
func waitPhase(t *testing.T, s *harness.Stack, phase string, timeout time.Duration) server.RolloutView {
	t.Helper()
	var v server.RolloutView
	err := harness.Poll(timeout, 100*time.Millisecond, func() error {
		v = rolloutView(t, s)
		if string(v.Phase) != phase {
			return fmt.Errorf("phase %s at weight %v", v.Phase, v.Weight)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("waiting for %s: %v; decisions: %s", phase, err, decisionLog(v))
	}
	return v
}

func decisionLog(v server.RolloutView) string {
	var b strings.Builder
	for _, d := range v.Decisions {
		fmt.Fprintf(&b, "\n  %s %s %v%% %s: %s", d.Time.Format("15:04:05.000"), d.Decision, d.Weight, d.Reason, d.Detail)
	}
	return b.String()
}

func fastRollout(steps []float64, interval time.Duration) func(*config.Config) {
	return func(c *config.Config) {
		c.Rollout.Steps = steps
		c.Rollout.Interval = config.Duration(interval)
		c.Rollout.MinRequests = 20
		c.Rollout.ConfirmAfter = config.Duration(500 * time.Millisecond)
	}
}

// TestHealthyRolloutPromotesAndShareFollowsWeight: every step is taken and
// the canary share at the upstreams matches each step's weight ± 2 points.
func TestHealthyRolloutPromotesAndShareFollowsWeight(t *testing.T) {
	fast := fastRollout([]float64{1, 5, 10, 25, 50, 100}, 5*time.Second)
	s := startStack(t, harness.StackOptions{Weight: 0, Configure: func(c *config.Config) {
		fast(c)
		// Both upstreams answer at once, so a p99 here is the machine's
		// hiccups: one run rolled back on 21.9 ms against 10.9 ms, with the
		// test's 500 ms confirmation seeing the same window twice. This
		// test is about steps and shares; TestLatencyRegressionRollsBack
		// judges latency with the default ratio.
		c.Rollout.MaxP99Ratio = 5
	}})
	load := harness.StartLoad(s.URL, 1000, "healthy")
	mustAction(t, s, "start")
	v := waitPhase(t, s, "Promoted", 90*time.Second)
	promotedAt := v.Decisions[len(v.Decisions)-1].Time
	// Keep the load on long enough to measure the last step too.
	if err := harness.Poll(10*time.Second, 100*time.Millisecond, func() error {
		n := 0
		for _, x := range load.Samples() {
			if x.At.After(promotedAt.Add(300 * time.Millisecond)) {
				n++
			}
		}
		if n < 1500 {
			return fmt.Errorf("%d samples after promotion", n)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	samples := load.Stop()

	// Step boundaries from knhk's own decision log (same clock).
	type step struct {
		weight   float64
		from, to time.Time
	}
	var steps []step
	for _, d := range v.Decisions {
		if d.Decision == "start" || d.Decision == "advance" || d.Decision == "promote" {
			if n := len(steps); n > 0 {
				steps[n-1].to = d.Time
			}
			steps = append(steps, step{weight: d.Weight, from: d.Time})
		}
	}
	if len(steps) != 6 {
		t.Fatalf("went through %d steps, want 6:%s", len(steps), decisionLog(v))
	}
	steps[len(steps)-1].to = samples[len(samples)-1].At
	for _, st := range steps {
		var total, canary int
		for _, x := range samples {
			// Skip the first 300 ms of a step: requests already in flight.
			if x.At.Before(st.from.Add(300*time.Millisecond)) || !x.At.Before(st.to) {
				continue
			}
			if x.Code != http.StatusOK {
				t.Fatalf("request failed during a healthy rollout: %+v", x)
			}
			total++
			if x.Version == "canary" {
				canary++
			}
		}
		share := float64(canary) / float64(total) * 100
		t.Logf("step %5.1f%%: canary %6.2f%% of %d requests", st.weight, share, total)
		if total < 1000 || math.Abs(share-st.weight) > 2 {
			t.Errorf("step %v%%: canary share %.2f%% over %d requests, want within ±2 points", st.weight, share, total)
		}
	}
}

func TestErrorFaultRollsBack(t *testing.T) {
	s := startStack(t, harness.StackOptions{Weight: 0, Configure: fastRollout([]float64{20, 50, 100}, 2*time.Second)})
	load := harness.StartLoad(s.URL, 800, "fault")
	defer load.Stop()
	mustAction(t, s, "start")
	// Let the first step run healthy, then break the canary.
	if err := harness.Poll(10*time.Second, 50*time.Millisecond, func() error {
		if s.Canary.Count() < 200 {
			return fmt.Errorf("canary has %d requests", s.Canary.Count())
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	rateBefore := s.Canary.Count()
	onset := time.Now()
	if err := s.Canary.SetFault(0.3, 0); err != nil {
		t.Fatal(err)
	}
	gone, err := s.Canary.LastRequestBeforeQuiet(time.Second, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	reaction := gone.Sub(onset)
	v := waitPhase(t, s, "RolledBack", 5*time.Second)
	last := v.Decisions[len(v.Decisions)-1]
	t.Logf("fault onset → zero canary traffic: %s (canary had %d requests before the fault); decision: %s: %s",
		reaction.Round(time.Millisecond), rateBefore, last.Reason, last.Detail)
	if last.Decision != "rollback" || !strings.HasPrefix(last.Reason, "error_rate") {
		t.Fatalf("rolled back for %q, want an error-rate check:%s", last.Reason, decisionLog(v))
	}
	if reaction > 10*time.Second {
		t.Fatalf("rollback took %s, want ≤ 10 s", reaction)
	}
}

func TestLatencyRegressionRollsBack(t *testing.T) {
	s := startStack(t, harness.StackOptions{Weight: 0, Configure: func(c *config.Config) {
		fastRollout([]float64{30, 60, 100}, 2*time.Second)(c)
		c.Rollout.MinLatencySamples = 100
	}})
	// 3× slower, with a margin over scheduling noise on a loaded machine.
	s.Stable.SetDelay(20 * time.Millisecond)
	s.Canary.SetDelay(60 * time.Millisecond)
	load := harness.StartLoad(s.URL, 500, "slow")
	defer load.Stop()
	mustAction(t, s, "start")
	v := waitPhase(t, s, "RolledBack", 30*time.Second)
	last := v.Decisions[len(v.Decisions)-1]
	if last.Reason != "latency_ratio" {
		t.Fatalf("rolled back for %q, want latency_ratio:%s", last.Reason, decisionLog(v))
	}
	t.Logf("rollback: %s", last.Detail)
}

func TestLowTrafficHoldsWithoutFailing(t *testing.T) {
	s := startStack(t, harness.StackOptions{Weight: 0, Configure: func(c *config.Config) {
		fastRollout([]float64{20, 50, 100}, time.Second)(c)
		c.Rollout.MinRequests = 50
	}})
	load := harness.StartLoad(s.URL, 10, "trickle") // 20 % of 10 req/s: 2 canary req/s
	defer load.Stop()
	mustAction(t, s, "start")
	var v server.RolloutView
	// Wait for eight checks, each a hold.
	err := harness.Poll(30*time.Second, 200*time.Millisecond, func() error {
		v = rolloutView(t, s)
		holds := 0
		for _, d := range v.Decisions {
			if d.Decision == "hold" {
				holds++
			}
		}
		if holds < 8 {
			return fmt.Errorf("%d holds so far", holds)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if v.Phase != "Progressing" || v.Weight != 20 {
		t.Fatalf("low traffic moved the rollout to %s at %v%%:%s", v.Phase, v.Weight, decisionLog(v))
	}
	for _, d := range v.Decisions {
		if d.Decision == "hold" && d.Reason != "insufficient_traffic" {
			t.Fatalf("hold for %q, want insufficient_traffic:%s", d.Reason, decisionLog(v))
		}
		if d.Decision == "rollback" || d.Decision == "advance" {
			t.Fatalf("low traffic led to %s:%s", d.Decision, decisionLog(v))
		}
	}
	if s.Canary.Count() == 0 {
		t.Fatal("canary got no traffic at all; the test proves nothing")
	}
}

// routeWeights reads the weighted clusters from Envoy's config_dump.
func routeWeights(t *testing.T, e *harness.Envoy) map[string]float64 {
	t.Helper()
	resp, err := client.Get(e.AdminURL() + "/config_dump?resource=dynamic_route_configs")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var dump struct {
		Configs []struct {
			RouteConfig struct {
				VirtualHosts []struct {
					Routes []struct {
						Route struct {
							WeightedClusters struct {
								Clusters []struct {
									Name   string
									Weight float64
								}
							} `json:"weighted_clusters"`
						}
					}
				} `json:"virtual_hosts"`
			} `json:"route_config"`
		}
	}
	if err := json.NewDecoder(resp.Body).Decode(&dump); err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, c := range dump.Configs {
		for _, vh := range c.RouteConfig.VirtualHosts {
			for _, r := range vh.Routes {
				for _, wc := range r.Route.WeightedClusters.Clusters {
					out[wc.Name] = wc.Weight
				}
			}
		}
	}
	return out
}

func TestRestartMidRolloutKeepsWeightAndTraffic(t *testing.T) {
	s := startStack(t, harness.StackOptions{Weight: 0, FailureModeAllow: true, Configure: func(c *config.Config) {
		fastRollout([]float64{30, 60, 100}, time.Hour)(c) // no automatic step during the test
	}})
	mustAction(t, s, "start")
	if w := routeWeights(t, s.Envoy); w["knhk_canary"] != 3000 {
		// The ACK may lag the API by a moment.
		if err := harness.Poll(5*time.Second, 50*time.Millisecond, func() error {
			if w := routeWeights(t, s.Envoy); w["knhk_canary"] != 3000 {
				return fmt.Errorf("envoy weights %v", w)
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	load := harness.StartLoad(s.URL, 300, "restart")
	if err := s.Knhk.Restart(false); err != nil {
		t.Fatal(err)
	}
	s.Stable.Reset()
	s.Canary.Reset()
	afterRestart := time.Now()
	// Let traffic flow through the restarted knhk for a while.
	if err := harness.Poll(20*time.Second, 100*time.Millisecond, func() error {
		if n := s.Stable.Count() + s.Canary.Count(); n < 1500 {
			return fmt.Errorf("%d requests since restart", n)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	samples := load.Stop()
	failed := 0
	for _, x := range samples {
		if x.Code != http.StatusOK {
			failed++
		}
	}
	if failed > 0 {
		t.Fatalf("%d of %d client requests failed across the restart (failure_mode_allow: true)", failed, len(samples))
	}
	v := rolloutView(t, s)
	if v.Phase != "Progressing" || v.Weight != 30 {
		t.Fatalf("after restart: %s at %v%%, want Progressing at 30%%", v.Phase, v.Weight)
	}
	if w := routeWeights(t, s.Envoy); w["knhk_canary"] != 3000 || w["knhk_stable"] != 7000 {
		t.Fatalf("Envoy weights after restart: %v", w)
	}
	share := float64(s.Canary.Count()) / float64(s.Stable.Count()+s.Canary.Count()) * 100
	t.Logf("after restart (%s): canary share %.1f%% over %d requests", time.Since(afterRestart).Round(time.Millisecond), share, s.Stable.Count()+s.Canary.Count())
	if math.Abs(share-30) > 4 {
		t.Fatalf("canary share after restart %.1f%%, want 30 ± 4", share)
	}
}

func TestNACKIsReportedAndEnvoyKeepsLastGood(t *testing.T) {
	s := startStack(t, harness.StackOptions{Weight: 20, Configure: func(c *config.Config) { c.Envoy.XDSAPI = "sotw" }})
	good := s.Knhk.Config
	bad := good
	bad.Upstreams.Canary = []string{"10.0.0.300:8002"} // an IP Envoy cannot parse
	if err := s.Knhk.Reload(bad); err != nil {
		t.Fatal(err)
	}
	err := harness.Poll(10*time.Second, 50*time.Millisecond, func() error {
		resp, err := client.Get(s.Knhk.AdminURL() + "/readyz")
		if err != nil {
			return err
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(b), "rejected") {
			return fmt.Errorf("readyz %d %s", resp.StatusCode, b)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if n, _ := metric(s.Knhk.AdminURL(), "knhk_xds_nacks_total"); n < 1 {
		t.Fatal("NACK not counted")
	}
	v := rolloutView(t, s)
	if v.XDSNack == nil || !strings.Contains(v.XDSNack.Error, "10.0.0.300") {
		t.Fatalf("/v1/rollout does not show the NACK: %+v", v.XDSNack)
	}
	// Envoy still serves both versions with the last good clusters.
	got := userVersions(t, s, users("nack", 300), nil)
	seen := map[string]bool{}
	for _, v := range got {
		seen[v] = true
	}
	if !seen["stable"] || !seen["canary"] {
		t.Fatalf("after the NACK Envoy does not serve both versions: %v", seen)
	}
	// Fixing the config clears the NACK and readiness.
	if err := s.Knhk.Reload(good); err != nil {
		t.Fatal(err)
	}
	if err := s.Knhk.WaitReady(10 * time.Second); err != nil {
		t.Fatal(err)
	}
}

func TestRolloutAPIConflictsAndCLI(t *testing.T) {
	s := startStack(t, harness.StackOptions{Weight: 20})
	if code, body := rolloutAction(t, s, "promote"); code != http.StatusConflict || !strings.Contains(body, "Idle") {
		t.Fatalf("promote when Idle: %d %s", code, body)
	}
	if code, _ := rolloutAction(t, s, "explode"); code != http.StatusNotFound {
		t.Fatalf("unknown action: %d", code)
	}
	knhk := binDir + "/knhk"
	out, err := runCmd(knhk, "start", "--admin", s.Knhk.AdminURL())
	if err != nil || !strings.Contains(out, "Progressing at 1%") {
		t.Fatalf("knhk start: %v %s", err, out)
	}
	out, err = runCmd(knhk, "status", "--admin", s.Knhk.AdminURL())
	if err != nil || !strings.Contains(out, "Progressing") || !strings.Contains(out, "canary") || !strings.Contains(out, "manual start") {
		t.Fatalf("knhk status: %v\n%s", err, out)
	}
	out, err = runCmd(knhk, "resume", "--admin", s.Knhk.AdminURL())
	if err == nil || !strings.Contains(out, "cannot resume") {
		t.Fatalf("knhk resume while progressing should fail with the reason: %v %s", err, out)
	}
	mustAction(t, s, "abort")
	if v := rolloutView(t, s); v.Phase != "RolledBack" || v.Weight != 0 {
		t.Fatalf("abort: %s %v", v.Phase, v.Weight)
	}
}
