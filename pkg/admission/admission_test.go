package admission

import (
	"math"
	"strings"
	"testing"
	"time"
)

// sim is a discrete-event model of an upstream with `servers` workers and a
// FIFO queue, each request taking `service`; the limiter gates arrivals.
type sim struct {
	l        *Limiter
	servers  int
	service  time.Duration
	now      time.Time
	busy     []time.Time // per server: busy until
	queue    []job
	inflight []job // in service, with completion time
	done     [numClasses]int
	within   [numClasses]int
	rejected [numClasses]int
	lat      [numClasses][]time.Duration
}

type job struct {
	c        Class
	arrived  time.Time
	finishes time.Time
}

func newSim(l *Limiter, servers int, service time.Duration) *sim {
	return &sim{l: l, servers: servers, service: service, now: time.Unix(0, 0), busy: make([]time.Time, servers)}
}

// run offers `rate` req/s for d with the class mix (fractions R1, W1, C1).
func (s *sim) run(d time.Duration, rate float64, mix [numClasses]float64) {
	step := time.Millisecond
	var acc float64
	var seq int
	for end := s.now.Add(d); s.now.Before(end); s.now = s.now.Add(step) {
		// completions
		kept := s.inflight[:0]
		for _, j := range s.inflight {
			if !j.finishes.After(s.now) {
				lat := j.finishes.Sub(j.arrived)
				s.l.Release(j.c, lat, s.now)
				s.done[j.c]++
				s.lat[j.c] = append(s.lat[j.c], lat)
				if lat <= DefaultBudgets[j.c] {
					s.within[j.c]++
				}
			} else {
				kept = append(kept, j)
			}
		}
		s.inflight = kept
		// arrivals
		acc += rate * step.Seconds()
		for ; acc >= 1; acc-- {
			seq++
			c := classOf(seq, mix)
			if s.l.Acquire(c, s.now) != Admit {
				s.rejected[c]++
				continue
			}
			s.queue = append(s.queue, job{c: c, arrived: s.now})
		}
		// dispatch to free servers
		for i := range s.busy {
			if len(s.queue) == 0 {
				break
			}
			if !s.busy[i].After(s.now) {
				j := s.queue[0]
				s.queue = s.queue[1:]
				j.finishes = s.now.Add(s.service)
				s.busy[i] = j.finishes
				s.inflight = append(s.inflight, j)
			}
		}
	}
}

// classOf spreads classes evenly by the mix (deterministic, interleaved).
func classOf(seq int, mix [numClasses]float64) Class {
	x := float64((seq*37)%100) / 100
	if x < mix[R1] {
		return R1
	}
	if x < mix[R1]+mix[W1] {
		return W1
	}
	return C1
}

func (s *sim) reset() {
	s.done, s.within, s.rejected = [numClasses]int{}, [numClasses]int{}, [numClasses]int{}
	s.lat = [numClasses][]time.Duration{}
}

func p99(d []time.Duration) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), d...)
	for i := 1; i < len(s); i++ { // insertion sort is fine for test sizes
		for j := i; j > 0 && s[j] < s[j-1]; j-- {
			s[j], s[j-1] = s[j-1], s[j]
		}
	}
	return s[len(s)*99/100]
}

var mix = [numClasses]float64{R1: 0.2, W1: 0.5, C1: 0.3}

func TestLimiterConvergesOnKnownCapacity(t *testing.T) {
	// 10 workers × 20 ms = 500 req/s; offer 3× that.
	l := NewLimiter(DefaultLimiterConfig())
	s := newSim(l, 10, 20*time.Millisecond)
	s.run(10*time.Second, 1500, mix) // converge
	s.reset()
	s.run(10*time.Second, 1500, mix)
	snap := l.Snapshot()
	total := s.done[R1] + s.done[W1] + s.done[C1]
	goodput := float64(s.within[R1]+s.within[W1]+s.within[C1]) / 10
	t.Logf("limit %.1f, short %v, baseline %v; throughput %.0f/s, goodput %.0f/s; R1 p99 %v; rejected %v",
		snap.Limit, snap.ShortRTT, snap.Baseline, float64(total)/10, goodput, p99(s.lat[R1]), s.rejected)
	if snap.Limit < 10 || snap.Limit > 17 {
		t.Fatalf("limit %.1f did not converge near the 10 workers", snap.Limit)
	}
	if goodput < 0.85*500 {
		t.Fatalf("goodput %.0f/s < 85%% of capacity", goodput)
	}
	if r1 := p99(s.lat[R1]); r1 > 50*time.Millisecond {
		t.Fatalf("R1 p99 %v over its 50 ms budget", r1)
	}
	if s.rejected[R1] > s.done[R1]/100 {
		t.Fatalf("R1 rejected %d of %d", s.rejected[R1], s.done[R1]+s.rejected[R1])
	}
}

func TestLimiterCutsFastAndRecovers(t *testing.T) {
	l := NewLimiter(DefaultLimiterConfig())
	s := newSim(l, 10, 20*time.Millisecond)
	s.run(10*time.Second, 1500, mix)
	before := l.Snapshot().Limit
	// The service slows to 80 ms: capacity quarters; the limit must come down.
	s.service = 80 * time.Millisecond
	s.run(5*time.Second, 1500, mix)
	slowed := l.Snapshot().Limit
	if slowed > before*0.8 {
		t.Fatalf("limit %.1f → %.1f: not cut when latency quadrupled", before, slowed)
	}
	// Back to normal: the limit grows back.
	s.service = 20 * time.Millisecond
	s.run(30*time.Second, 1500, mix)
	after := l.Snapshot().Limit
	t.Logf("limit: %.1f normal → %.1f slow → %.1f recovered", before, slowed, after)
	if after < 10 {
		t.Fatalf("limit %.1f did not recover to the 10 workers", after)
	}
	// The load drops to half the capacity: within 5 s nothing is shed any more.
	s.run(5*time.Second, 250, mix)
	s.reset()
	s.run(10*time.Second, 250, mix)
	if s.rejected != [numClasses]int{} {
		t.Fatalf("at half capacity requests are still shed: %v", s.rejected)
	}
	if p := p99(s.lat[W1]); p > 25*time.Millisecond {
		t.Fatalf("at half capacity W1 p99 is %v, want the 20 ms service time", p)
	}
}

// TestPartitionGuaranteesUnderEveryMix: at 3× overload, whatever the mix,
// a class gets at least its guaranteed share of the capacity (or all it
// asks for), and C1 gets only what R1 and W1 leave.
func TestPartitionGuaranteesUnderEveryMix(t *testing.T) {
	mixes := [][numClasses]float64{
		{1, 0, 0}, {0, 1, 0}, {0, 0, 1}, {0.2, 0.5, 0.3}, {0.05, 0.9, 0.05}, {0.05, 0.05, 0.9},
		{0.5, 0, 0.5}, {0.34, 0.33, 0.33}, {0.9, 0.05, 0.05}, {0, 0.5, 0.5},
	}
	const capacity = 500.0 // 10 workers × 20 ms
	for _, m := range mixes {
		l := NewLimiter(DefaultLimiterConfig())
		s := newSim(l, 10, 20*time.Millisecond)
		s.run(10*time.Second, 3*capacity, m)
		s.reset()
		s.run(10*time.Second, 3*capacity, m)
		var got [numClasses]float64
		for c := range got {
			got[c] = float64(s.done[c]) / 10
		}
		// R1 gets its 70 % share, and more when W1 leaves room; W1 gets
		// what R1 leaves (at least 30 %); C1 only what both leave.
		offered := [numClasses]float64{3 * capacity * m[R1], 3 * capacity * m[W1], 3 * capacity * m[C1]}
		r1Due := math.Min(offered[R1], math.Max(0.7*capacity, capacity-offered[W1]))
		if got[R1] < 0.9*r1Due {
			t.Errorf("mix %v: R1 served %.0f/s, want ≥ %.0f (offered %.0f)", m, got[R1], 0.9*r1Due, offered[R1])
		}
		w1Due := math.Min(offered[W1], capacity-math.Min(offered[R1], 0.7*capacity))
		if got[W1] < 0.85*w1Due {
			t.Errorf("mix %v: W1 served %.0f/s, want ≥ %.0f (offered %.0f)", m, got[W1], 0.85*w1Due, offered[W1])
		}
		total := got[R1] + got[W1] + got[C1]
		if total < 0.9*capacity {
			t.Errorf("mix %v: served %.0f/s of %.0f capacity", m, total, capacity)
		}
		// C1 runs on spare capacity: when R1 and W1 alone ask for more than
		// the capacity, C1 gets little.
		if (m[R1]+m[W1])*3*capacity > 1.5*capacity && got[C1] > 0.15*capacity {
			t.Errorf("mix %v: C1 took %.0f/s while R1+W1 were starved of capacity", m, got[C1])
		}
		if s.rejected[R1] > s.done[R1]/100 && m[R1]*3*capacity < 0.7*capacity {
			t.Errorf("mix %v: R1 within its guarantee was rejected %d times", m, s.rejected[R1])
		}
	}
}

func TestOverBudgetRejectsAtOnce(t *testing.T) {
	l := NewLimiter(DefaultLimiterConfig())
	now := time.Unix(0, 0)
	for _, c := range []Class{R1, W1} {
		for range 20 {
			if l.Acquire(c, now) == Admit {
				l.Release(c, 120*time.Millisecond, now) // slower than R1's budget
			}
		}
	}
	// A few requests at a time still go: the probes that keep measuring.
	for i := range probes {
		if v := l.Acquire(R1, now); v != Admit {
			t.Fatalf("R1 probe %d with a 120 ms estimate: %v", i, v.Reason())
		}
	}
	if v := l.Acquire(R1, now); v != RejectOverBudget {
		t.Fatalf("R1 with a 120 ms estimate and its %d probes in flight: %v", probes, v.Reason())
	}
	if v := l.Acquire(W1, now); v != Admit {
		t.Fatalf("W1 (500 ms budget) with a 120 ms estimate: %v", v.Reason())
	}
}

// TestEstimateForgottenAfterSilence: an estimate is forgotten once its
// class has had no completion for estimateTTL, so a burst after a pause is
// judged afresh rather than by the latency of the previous one.
func TestEstimateForgottenAfterSilence(t *testing.T) {
	l := NewLimiter(DefaultLimiterConfig())
	now := time.Unix(0, 0)
	for range 20 {
		if l.Acquire(R1, now) == Admit {
			l.Release(R1, 120*time.Millisecond, now)
		}
	}
	if e := l.Estimate(R1, now); e != 120*time.Millisecond {
		t.Fatalf("R1 estimate %v after 20 completions of 120 ms", e)
	}
	now = now.Add(estimateTTL)
	if e := l.Estimate(R1, now); e != 0 {
		t.Fatalf("R1 estimate %v after %v without a completion, want 0 (unknown)", e, estimateTTL)
	}
	for i := range 5 {
		if v := l.Acquire(R1, now); v != Admit {
			t.Fatalf("request %d of a burst after a silence: %v", i, v.Reason())
		}
	}
}

// TestSlowC1DoesNotShedR1: each class's budget is judged against that
// class's own latency; batch calls taking seconds must not make R1, whose
// own requests take 5 ms, look over its 50 ms budget.
func TestSlowC1DoesNotShedR1(t *testing.T) {
	l := NewLimiter(DefaultLimiterConfig())
	now := time.Unix(0, 0)
	for i := range 2000 {
		now = now.Add(5 * time.Millisecond)
		if i%5 == 0 { // one C1 call in six, each 40× over R1's budget
			if l.Acquire(C1, now) == Admit {
				l.Release(C1, 2*time.Second, now)
			}
		}
		if v := l.Acquire(R1, now); v != Admit {
			t.Fatalf("request %d: R1 at 5 ms shed (%s) because C1 is slow", i, v.Reason())
		}
		l.Release(R1, 5*time.Millisecond, now)
	}
}

// TestSingleClassClusterRecovers: an R1-only cluster shed because its
// upstream was slower than R1's budget serves again once the upstream is
// fast, with no restart, although R1 had no other traffic to measure it.
func TestSingleClassClusterRecovers(t *testing.T) {
	r1only := [numClasses]float64{R1: 1}
	for _, rate := range []float64{20, 400} {
		l := NewLimiter(DefaultLimiterConfig())
		s := newSim(l, 20, 200*time.Millisecond) // 4× R1's budget; 100 req/s
		s.run(3*time.Second, rate, r1only)
		if s.rejected[R1] == 0 {
			t.Fatalf("%v req/s: R1 not shed while every request took 200 ms (done %d)", rate, s.done[R1])
		}
		s.service = 5 * time.Millisecond
		// One slow probe ends, then fast ones bring the estimate under
		// budget: a few hundred ms. A second is the margin.
		s.run(time.Second, rate, r1only)
		s.reset()
		s.run(5*time.Second, rate, r1only)
		if s.rejected[R1] > 0 || float64(s.done[R1]) < 0.95*5*rate {
			t.Fatalf("%v req/s: a second after the upstream recovered R1 is still shed: %d rejected, %d served",
				rate, s.rejected[R1], s.done[R1])
		}
	}
}

// TestIdleClusterAdmitsAnyClass: a cluster with nothing in flight admits
// any class, even at a limit too small for C1's spare-capacity rule, so a
// C1-only cluster whose limit was cut to the minimum cannot stay shut.
func TestIdleClusterAdmitsAnyClass(t *testing.T) {
	cfg := DefaultLimiterConfig()
	cfg.Initial, cfg.Min = 2, 2
	l := NewLimiter(cfg)
	now := time.Unix(0, 0)
	for i := range 100 {
		now = now.Add(time.Second)
		if v := l.Acquire(C1, now); v != Admit {
			t.Fatalf("request %d: C1 on an idle cluster at limit %.1f: %s", i, l.Snapshot().Limit, v.Reason())
		}
		l.Release(C1, 20*time.Millisecond, now)
	}
}

func TestClassifier(t *testing.T) {
	rules := []Rule{
		{Class: R1, PathPrefix: "/api/cart", Methods: []string{"get"}},
		{Class: C1, PathRegex: `^/batch/`},
		{Class: R1, Route: "checkout"},
		{Class: W1, SpiffeID: "spiffe://example.org/frontend", Authority: "shop.example"},
		{Class: C1, PathPrefix: "/api"},
	}
	c, err := NewClassifier(rules, W1, false)
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		q    Request
		want Class
	}{
		{Request{Method: "GET", Path: "/api/cart/42"}, R1},
		{Request{Method: "POST", Path: "/api/cart/42"}, C1},
		{Request{Method: "GET", Path: "/batch/nightly?x=1"}, C1},
		{Request{Method: "GET", Path: "/pay", Route: "checkout"}, R1},
		{Request{Method: "GET", Path: "/x", Authority: "shop.example", SpiffeID: "spiffe://example.org/frontend"}, W1},
		{Request{Method: "GET", Path: "/other"}, W1},
		{Request{Method: "GET", Path: "/other", TrustedClass: "R1"}, W1}, // header not trusted
	}
	for _, k := range cases {
		if got := c.Classify(&k.q); got != k.want {
			t.Errorf("%+v → %s, want %s", k.q, got, k.want)
		}
	}
	trusting, _ := NewClassifier(rules, W1, true)
	if got := trusting.Classify(&Request{Path: "/other", TrustedClass: "c1"}); got != C1 {
		t.Fatalf("trusted header ignored: %s", got)
	}
	if got := trusting.Classify(&Request{Path: "/other", TrustedClass: "X9"}); got != W1 {
		t.Fatalf("invalid trusted value not ignored: %s", got)
	}
}

func TestClassifierRejectsBadRules(t *testing.T) {
	cases := map[string][]Rule{
		"path_regex":         {{Class: R1, PathRegex: "("}},
		"must start with /":  {{Class: R1, PathPrefix: "api"}},
		"matches everything": {{Class: R1}},
		"rules[1] can never match (it says R1, the earlier rule says C1)": {{Class: C1, PathPrefix: "/api"}, {Class: R1, PathPrefix: "/api/cart"}},
		"rules[1] can never match: rules[0]":                              {{Class: R1, Methods: []string{"GET", "POST"}}, {Class: R1, Methods: []string{"GET"}, Authority: "a"}},
	}
	for want, rules := range cases {
		if _, err := NewClassifier(rules, W1, false); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v", want, err)
		}
	}
	// Not overlapping: narrower first, or disjoint.
	if _, err := NewClassifier([]Rule{{Class: R1, PathPrefix: "/api/cart"}, {Class: C1, PathPrefix: "/api"}}, W1, false); err != nil {
		t.Fatal(err)
	}
}

func BenchmarkAcquireRelease(b *testing.B) {
	l := NewLimiter(DefaultLimiterConfig())
	now := time.Unix(0, 0)
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		if l.Acquire(R1, now) == Admit {
			l.Release(R1, 20*time.Millisecond, now)
		}
	}
}

// TestFastServiceJitterDoesNotCollapseTheLimit: a sub-millisecond service
// whose latency jitters by a few hundred per cent, in bursts of 15
// concurrent requests, must not be throttled: the limit's slack absorbs
// scheduling noise that is far above 20 % of such a small baseline.
func TestFastServiceJitterDoesNotCollapseTheLimit(t *testing.T) {
	l := NewLimiter(DefaultLimiterConfig())
	now := time.Unix(0, 0)
	for round := range 2000 {
		for i := range 15 {
			if l.Acquire(W1, now) != Admit {
				t.Fatalf("round %d: request %d of a burst of 15 shed (limit %.1f)", round, i, l.Snapshot().Limit)
			}
		}
		lat := 400 * time.Microsecond // most rounds fast, some slow
		if round%4 < 2 {
			lat = 2500 * time.Microsecond
		}
		for range 15 {
			l.Release(W1, lat, now)
		}
		now = now.Add(10 * time.Millisecond)
	}
}
