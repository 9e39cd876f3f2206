package e2e

import (
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	vegeta "github.com/tsenart/vegeta/v12/lib"

	"github.com/knhk/knhk/internal/harness"
	"github.com/knhk/knhk/pkg/config"
)

// classTally is what one class got during an overload run.
type classTally struct {
	sent, ok, withinBudget, shed429, retryAfter, shed503, other int
	lat                                                         []time.Duration
}

func (c *classTally) p99() time.Duration {
	if len(c.lat) == 0 {
		return 0
	}
	s := slices.Clone(c.lat)
	slices.Sort(s)
	return s[len(s)*99/100]
}

var budgets = map[string]time.Duration{"R1": 50 * time.Millisecond, "W1": 500 * time.Millisecond, "C1": 24 * time.Hour}

// overload offers rate req/s for d, 20 % R1 (/r1), 50 % W1 (/w1), 30 % C1
// (/c1), open loop, and tallies per class after a warm-up.
func overload(url string, rate int, warm, d time.Duration) map[string]*classTally {
	var n atomic.Uint64
	paths := []string{"/r1", "/r1", "/w1", "/w1", "/w1", "/w1", "/w1", "/c1", "/c1", "/c1"}
	targeter := func(t *vegeta.Target) error {
		i := n.Add(1)
		t.Method = http.MethodGet
		t.URL = url + paths[(i*7)%10] + "?n=" + fmt.Sprint(i)
		t.Header = http.Header{"X-User-Id": []string{fmt.Sprint("u", i%1000)}}
		return nil
	}
	atk := vegeta.NewAttacker(vegeta.Timeout(10*time.Second), vegeta.KeepAlive(true), vegeta.Workers(64), vegeta.MaxBody(256))
	tally := map[string]*classTally{"R1": {}, "W1": {}, "C1": {}}
	start := time.Now()
	for r := range atk.Attack(targeter, vegeta.Rate{Freq: rate, Per: time.Second}, warm+d, "overload") {
		if r.Timestamp.Sub(start) < warm {
			continue
		}
		class := map[string]string{"/r1": "R1", "/w1": "W1", "/c1": "C1"}[r.URL[len(url):len(url)+3]]
		c := tally[class]
		c.sent++
		switch {
		case r.Code == http.StatusOK:
			c.ok++
			c.lat = append(c.lat, r.Latency)
			if r.Latency <= budgets[class] {
				c.withinBudget++
			}
		case r.Code == http.StatusTooManyRequests:
			c.shed429++
			if r.Headers.Get("Retry-After") != "" {
				c.retryAfter++
			}
		case r.Code == http.StatusServiceUnavailable && r.Headers.Get("x-knhk-shed") == class:
			c.shed503++
		default:
			c.other++ // timeouts, Envoy 503/504, transport errors
		}
	}
	return tally
}

func admissionStack(t *testing.T, enabled bool, lg *harness.LogBuffer) *harness.Stack {
	s := startStack(t, harness.StackOptions{Weight: 0, FailureModeAllow: true, Logs: lg, Configure: func(c *config.Config) {
		c.Admission.Enabled = enabled
		c.Admission.Rules = []config.ClassRule{{Class: "R1", PathPrefix: "/r1"}, {Class: "C1", PathPrefix: "/c1"}}
		c.Envoy.RouteTimeout = config.Duration(2 * time.Second)
		c.Envoy.MessageTimeout = config.Duration(time.Second)
	}})
	s.Stable.SetCapacity(10, 20*time.Millisecond) // 500 req/s
	return s
}

// TestOverloadShedsByClass: an upstream of fixed capacity (10 in flight ×
// 20 ms = 500 req/s) offered 3× its capacity, through real Envoy; first with
// knhk's admission, then without it, in the same test.
func TestOverloadShedsByClass(t *testing.T) {
	const capacity, rate = 500.0, 1500
	measure := 8 * time.Second
	lg := logs(t)

	on := admissionStack(t, true, lg)
	with := overload(on.URL, rate, 4*time.Second, measure)
	report(t, "admission on", with, measure)
	_ = on.Close()

	off := admissionStack(t, false, lg)
	without := overload(off.URL, rate, 4*time.Second, measure)
	report(t, "admission off", without, measure)

	r1 := with["R1"]
	if float64(r1.ok) < 0.99*float64(r1.sent) {
		t.Errorf("admission on: R1 succeeded %d of %d (< 99%%)", r1.ok, r1.sent)
	}
	if p := r1.p99(); p > budgets["R1"] {
		t.Errorf("admission on: R1 p99 %v over its 50 ms budget", p)
	}
	goodput := float64(with["R1"].withinBudget+with["W1"].withinBudget+with["C1"].withinBudget) / measure.Seconds()
	if goodput < 0.85*capacity {
		t.Errorf("admission on: goodput %.0f req/s < 85%% of capacity %.0f", goodput, capacity)
	}
	c1 := with["C1"]
	if c1.other > 0 || c1.shed503 > 0 {
		t.Errorf("admission on: C1 got %d timeouts/errors and %d 503s; it must only be deferred (429)", c1.other, c1.shed503)
	}
	if c1.shed429 == 0 || c1.retryAfter != c1.shed429 {
		t.Errorf("admission on: C1 got %d 429s, %d with Retry-After", c1.shed429, c1.retryAfter)
	}
	// Without admission every class misses its budget.
	for _, class := range []string{"R1", "W1", "C1"} {
		c := without[class]
		missed := c.sent - c.withinBudget
		if float64(missed) < 0.2*float64(c.sent) {
			t.Errorf("admission off: %s missed its budget on only %d of %d: no collapse shown", class, missed, c.sent)
		}
	}
}

func report(t *testing.T, name string, tally map[string]*classTally, d time.Duration) {
	var b strings.Builder
	total := 0
	for _, class := range []string{"R1", "W1", "C1"} {
		c := tally[class]
		total += c.withinBudget
		fmt.Fprintf(&b, "\n  %s: sent %5d, ok %5d (within budget %5d, p99 %8s), 429 %5d (Retry-After %5d), 503 shed %5d, other %5d",
			class, c.sent, c.ok, c.withinBudget, c.p99().Round(100*time.Microsecond), c.shed429, c.retryAfter, c.shed503, c.other)
	}
	t.Logf("%s: goodput %.0f req/s%s", name, float64(total)/d.Seconds(), b.String())
}
