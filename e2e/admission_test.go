package e2e

import (
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/knhk/knhk/internal/harness"
	"github.com/knhk/knhk/pkg/config"
)

func admissionStack(t *testing.T, enabled bool, lg *harness.LogBuffer) *harness.Stack {
	s := startStack(t, harness.StackOptions{Weight: 0, FailureModeAllow: true, Logs: lg, Configure: func(c *config.Config) {
		c.Admission.Enabled = enabled
		c.Admission.Rules = []config.ClassRule{{Class: "R1", PathPrefix: "/r1"}, {Class: "C1", PathPrefix: "/c1"}}
		c.Envoy.RouteTimeout = config.Duration(2 * time.Second)
		c.Envoy.MessageTimeout = config.Duration(time.Second)
		// Admission alone: with receipts too, 2× overload through Envoy
		// starves the two cores the load, Envoy and knhk share (the
		// receipts e2e tests cover receipts under load).
		c.Receipts.Enabled = false
	}})
	s.Stable.SetCapacity(10, 20*time.Millisecond) // 500 req/s
	return s
}

// TestOverloadShedsByClass: an upstream of fixed capacity (10 in flight ×
// 20 ms = 500 req/s) offered 2× its capacity, through real Envoy; first with
// knhk's admission, then without it, in the same test. At 3× (make bench
// does that, docs/BENCHMARKS.md) the load generator, Envoy and knhk on two
// shared cores put R1's p99 at 44–56 ms, against its 50 ms budget: a
// coin toss for CI. At 2× it is 40–41 ms, with the limiter's queueing
// (≈ 1.3× the no-load latency) as by design, but a stall has put it at 58.
func TestOverloadShedsByClass(t *testing.T) {
	const capacity, rate = 500.0, 1000
	// The limiter converges within seconds; the warm-up keeps that (and the
	// I/O of the binaries just built) out of the measured window, which
	// judges the steady state.
	warm, measure := 8*time.Second, 8*time.Second
	lg := logs(t)

	on := admissionStack(t, true, lg)
	with := harness.Overload(on.URL, rate, warm, measure)
	report(t, "admission on", with, measure)
	logAdmissionMetrics(t, on)
	_ = on.Close()

	off := admissionStack(t, false, lg)
	without := harness.Overload(off.URL, rate, warm, measure)
	report(t, "admission off", without, measure)

	r1 := with["R1"]
	if float64(r1.OK) < 0.99*float64(r1.Sent) {
		t.Errorf("admission on: R1 succeeded %d of %d (< 99%%)", r1.OK, r1.Sent)
	}
	// Judged by share within budget, not by p99: on two shared cores a
	// scheduling stall of the load generator alone has put R1's p99 at 58
	// ms (CI), while without admission R1 misses on 20%+ (below).
	if float64(r1.WithinBudget) < 0.95*float64(r1.Sent) {
		t.Errorf("admission on: R1 within its 50 ms budget on %d of %d (< 95%%; p99 %v)", r1.WithinBudget, r1.Sent, r1.P99())
	}
	goodput := float64(with["R1"].WithinBudget+with["W1"].WithinBudget+with["C1"].WithinBudget) / measure.Seconds()
	if goodput < 0.85*capacity {
		t.Errorf("admission on: goodput %.0f req/s < 85%% of capacity %.0f", goodput, capacity)
	}
	c1 := with["C1"]
	if c1.Other > 0 || c1.Shed503 > 0 {
		t.Errorf("admission on: C1 got %d timeouts/errors and %d 503s; it must only be deferred (429)", c1.Other, c1.Shed503)
	}
	if c1.Shed429 == 0 || c1.RetryAfter != c1.Shed429 {
		t.Errorf("admission on: C1 got %d 429s, %d with Retry-After", c1.Shed429, c1.RetryAfter)
	}
	// Without admission every class misses its budget.
	for _, class := range []string{"R1", "W1", "C1"} {
		c := without[class]
		missed := c.Sent - c.WithinBudget
		if float64(missed) < 0.2*float64(c.Sent) {
			t.Errorf("admission off: %s missed its budget on only %d of %d: no collapse shown", class, missed, c.Sent)
		}
	}
}

// TestShedClusterRecoversWithoutRestart: a cluster whose traffic is all R1
// is shed over budget while its upstream is 4× slower than R1's 50 ms
// budget; once the upstream is fast again, R1 is served again, although no
// R1 request was admitted in between (the estimate must expire by itself).
func TestShedClusterRecoversWithoutRestart(t *testing.T) {
	s := startStack(t, harness.StackOptions{Weight: 0, Configure: func(c *config.Config) {
		c.Admission.Enabled = true
		c.Admission.Rules = []config.ClassRule{{Class: "R1", PathPrefix: "/r1"}}
		c.Envoy.RouteTimeout = config.Duration(5 * time.Second)
		c.Receipts.Enabled = false
	}})
	s.Stable.SetDelay(200 * time.Millisecond)

	// Slow phase: 4 clients until R1 is shed because of its latency.
	var shed atomic.Bool
	var firstErr atomic.Value
	var wg sync.WaitGroup
	deadline := time.Now().Add(30 * time.Second)
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !shed.Load() && time.Now().Before(deadline) {
				r, err := get(s.URL+"/r1/item", nil)
				if err != nil {
					firstErr.CompareAndSwap(nil, err)
					return
				}
				if r.status == http.StatusServiceUnavailable && r.header.Get("x-knhk-shed") == "R1" &&
					strings.Contains(r.body, "exceeds its budget") {
					shed.Store(true)
				}
			}
		}()
	}
	wg.Wait()
	if err, _ := firstErr.Load().(error); err != nil {
		t.Fatal(err)
	}
	if !shed.Load() {
		t.Fatal("R1 was never shed over budget while its upstream took 200 ms")
	}

	// The upstream recovers; nothing else changes.
	s.Stable.SetDelay(0)
	recovered := time.Now()
	// Recovered: 20 requests in a row served.
	err := harness.Poll(30*time.Second, 50*time.Millisecond, func() error {
		for i := range 20 {
			r, err := get(s.URL+"/r1/item", nil)
			if err != nil {
				return err
			}
			if r.status != http.StatusOK {
				return fmt.Errorf("request %d of 20: status %d, x-knhk-shed %q: %s", i, r.status, r.header.Get("x-knhk-shed"), r.body)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("R1 still shed after its upstream recovered: %v", err)
	}
	t.Logf("R1 served again %v after the upstream recovered", time.Since(recovered).Round(time.Millisecond))
	for i := range 50 {
		r, err := get(s.URL+"/r1/item", nil)
		if err != nil {
			t.Fatal(err)
		}
		if r.status != http.StatusOK {
			t.Fatalf("request %d after recovery: status %d: %s", i, r.status, r.body)
		}
	}
}

func report(t *testing.T, name string, tally map[string]*harness.ClassTally, d time.Duration) {
	var b strings.Builder
	total := 0
	for _, class := range []string{"R1", "W1", "C1"} {
		c := tally[class]
		total += c.WithinBudget
		fmt.Fprintf(&b, "\n  %s: sent %5d, ok %5d (within budget %5d, p99 %8s), 429 %5d (Retry-After %5d), 503 shed %5d, other %5d",
			class, c.Sent, c.OK, c.WithinBudget, c.P99().Round(100*time.Microsecond), c.Shed429, c.RetryAfter, c.Shed503, c.Other)
	}
	t.Logf("%s: goodput %.0f req/s%s", name, float64(total)/d.Seconds(), b.String())
}

// logAdmissionMetrics logs knhk's admission decisions and estimates (warm-up
// included), so a failed run says whether R1 was shed for room or budget.
func logAdmissionMetrics(t *testing.T, s *harness.Stack) {
	b, err := s.Knhk.Get("/metrics")
	if err != nil {
		t.Logf("metrics: %v", err)
		return
	}
	var out strings.Builder
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "knhk_admission_") {
			out.WriteString("\n  " + line)
		}
	}
	t.Logf("knhk admission metrics:%s", out.String())
}
