package promotion

import (
	"errors"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/knhk/knhk/pkg/canary"
)

func defaults() Thresholds {
	return Thresholds{MinRequests: 50, MaxErrorRateDelta: 0.01, MaxErrorRate: 0.2, Confidence: 0.99,
		MaxP99Ratio: 1.5, MinLatencySamples: 50}
}

func stats(req, errs uint64, p99 time.Duration) Stats {
	return Stats{Requests: req, Errors: errs, P99: p99, P99Ms: float64(p99) / 1e6}
}

func TestJudge(t *testing.T) {
	ms := time.Millisecond
	cases := []struct {
		name         string
		canary, stab Stats
		want         Verdict
		check        string
	}{
		{"no data is a hold, never a failure", stats(10, 10, 0), stats(1000, 0, 10*ms), Hold, "insufficient_traffic"},
		{"healthy", stats(500, 2, 12*ms), stats(5000, 20, 11*ms), Pass, "healthy"},
		{"30% errors", stats(500, 150, 12*ms), stats(5000, 20, 11*ms), Fail, "error_rate_absolute"},
		{"worse than stable with confidence", stats(2000, 100, 12*ms), stats(20000, 200, 11*ms), Fail, "error_rate"},
		{"worse but within noise", stats(60, 2, 12*ms), stats(600, 6, 11*ms), Pass, "healthy"},
		{"both bad equally: not the canary's fault", stats(1000, 80, 12*ms), stats(10000, 800, 11*ms), Pass, "healthy"},
		{"latency 3x stable", stats(500, 0, 90*ms), stats(5000, 0, 30*ms), Fail, "latency_ratio"},
	}
	for _, c := range cases {
		j := Judge(defaults(), c.canary, c.stab)
		if j.Verdict != c.want || j.Check != c.check {
			t.Errorf("%s: got %s/%s (%s), want %s/%s", c.name, j.Verdict, j.Check, j.Detail, c.want, c.check)
		}
	}
	th := defaults()
	th.MaxP99 = 50 * ms
	if j := Judge(th, stats(500, 0, 60*ms), stats(5000, 0, 55*ms)); j.Check != "latency_absolute" {
		t.Errorf("absolute p99: %s", j.Detail)
	}
}

func TestZScore(t *testing.T) {
	if z := zScore(0.99); z < 2.32 || z > 2.33 {
		t.Fatalf("z(0.99) = %v", z)
	}
	if z := zScore(0.95); z < 1.64 || z > 1.65 {
		t.Fatalf("z(0.95) = %v", z)
	}
}

// TestFalseFailureRate simulates 1,000 windows of a healthy canary with the
// same error rate as stable: at confidence 0.99 at most 1 % may fail.
func TestFalseFailureRate(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for _, p := range []float64{0.001, 0.01, 0.05} {
		fails := 0
		for range 1000 {
			c := binomial(r, 200, p)
			s := binomial(r, 1800, p)
			th := defaults()
			th.MaxErrorRate = 0 // the relative test alone
			th.MaxP99Ratio = 0
			if Judge(th, stats(200, c, time.Millisecond), stats(1800, s, time.Millisecond)).Verdict == Fail {
				fails++
			}
		}
		if fails > 10 {
			t.Errorf("error rate %.3f: %d of 1000 healthy windows failed (> 1%%)", p, fails)
		}
		t.Logf("error rate %.3f: %d/1000 false failures", p, fails)
	}
}

func binomial(r *rand.Rand, n int, p float64) uint64 {
	var k uint64
	for range n {
		if r.Float64() < p {
			k++
		}
	}
	return k
}

func TestWindowP99(t *testing.T) {
	w := NewWindow(10 * time.Second)
	now := time.Unix(1000, 0)
	for i := 1; i <= 1000; i++ {
		w.Observe(now, canary.Canary, i%10 == 0, time.Duration(i)*time.Millisecond/10) // 0.1..100 ms
	}
	s := w.Stats(now, canary.Canary, 10*time.Second)
	if s.Requests != 1000 || s.Errors != 100 {
		t.Fatalf("%+v", s)
	}
	if s.P99 < 99*time.Millisecond || s.P99 > 104*time.Millisecond {
		t.Fatalf("p99 %v, want 99 ms within the 4 %% bucket error", s.P99)
	}
	// Old seconds fall out of the window.
	if s := w.Stats(now.Add(11*time.Second), canary.Canary, 10*time.Second); s.Requests != 0 {
		t.Fatalf("stale observations counted: %+v", s)
	}
	if s := w.Stats(now, canary.Stable, 10*time.Second); s.Requests != 0 {
		t.Fatal("versions mixed")
	}
}

type clock struct{ t time.Time }

func (c *clock) now() time.Time { return c.t }

func testConfig() Config {
	return Config{Steps: []float64{1, 5, 10, 25, 50, 100}, Interval: 5 * time.Second, Window: 5 * time.Second,
		FailureThreshold: 2, ConfirmAfter: time.Second, Thresholds: defaults(),
		HardErrorRate: 0.5, HardMinRequests: 20, HardWindow: 5 * time.Second, MaxDecisions: 50}
}

func newRollout(t *testing.T, store Store) (*Rollout, *clock, *[]float64) {
	c := &clock{t: time.Unix(10000, 0)}
	r, err := New(testConfig(), store, 20, c.now)
	if err != nil {
		t.Fatal(err)
	}
	var weights []float64
	r.OnWeight(func(w float64) { weights = append(weights, w) })
	return r, c, &weights
}

// traffic feeds canaryN canary requests and 800 healthy stable ones.
func traffic(r *Rollout, canaryN int, canaryErr float64, canaryLat time.Duration) {
	const stableN = 800
	for i := range canaryN {
		r.Observe(canary.Canary, float64(i%100) < canaryErr*100, canaryLat)
	}
	for range stableN {
		r.Observe(canary.Stable, false, 10*time.Millisecond)
	}
}

func TestHealthyRolloutPromotes(t *testing.T) {
	r, c, weights := newRollout(t, &MemStore{})
	if r.Weight() != 20 {
		t.Fatalf("idle weight %v, want the config's 20", r.Weight())
	}
	if err := r.Start(); err != nil {
		t.Fatal(err)
	}
	for i := 0; r.State().Phase == Progressing; i++ {
		if i > 20 {
			t.Fatal("never promoted")
		}
		c.t = c.t.Add(5 * time.Second)
		traffic(r, 200, 0, 10*time.Millisecond)
		r.Check(false)
	}
	if st := r.State(); st.Phase != Promoted || st.Weight != 100 {
		t.Fatalf("%+v", st)
	}
	want := []float64{20, 1, 5, 10, 25, 50, 100}
	if len(*weights) != len(want) {
		t.Fatalf("weights %v, want %v", *weights, want)
	}
	for i := range want {
		if (*weights)[i] != want[i] {
			t.Fatalf("weights %v, want %v", *weights, want)
		}
	}
}

func TestFailingCanaryRollsBackAfterConfirm(t *testing.T) {
	r, c, _ := newRollout(t, &MemStore{})
	_ = r.Start()
	c.t = c.t.Add(5 * time.Second)
	traffic(r, 200, 0.3, 10*time.Millisecond) // 30 %: below the hard breach
	r.Check(false)
	if st := r.State(); st.Phase != Progressing || st.Failures != 1 {
		t.Fatalf("after one failed check: %+v", st)
	}
	if due := r.Due().Sub(c.t); due != time.Second {
		t.Fatalf("failed check re-checked in %v, want ConfirmAfter (1s)", due)
	}
	c.t = c.t.Add(time.Second)
	traffic(r, 200, 0.3, 10*time.Millisecond)
	r.Check(false)
	st := r.State()
	if st.Phase != RolledBack || st.Weight != 0 {
		t.Fatalf("not rolled back: %+v", st)
	}
	last := st.Decisions[len(st.Decisions)-1]
	if last.Decision != "rollback" || last.Reason != "error_rate_absolute" || last.Judgment.Values["canary_error_rate"] < 0.29 {
		t.Fatalf("rollback decision lacks its check and values: %+v", last)
	}
}

func TestLowTrafficHoldsForever(t *testing.T) {
	r, c, _ := newRollout(t, &MemStore{})
	_ = r.Start()
	for range 50 {
		c.t = c.t.Add(5 * time.Second)
		traffic(r, 10, 0.5, 10*time.Millisecond) // 2 req/s, even failing ones
		r.Check(false)
	}
	st := r.State()
	if st.Phase != Progressing || st.Weight != 1 {
		t.Fatalf("low traffic moved the rollout: %+v", st)
	}
	if d := st.Decisions[len(st.Decisions)-1]; d.Decision != "hold" || d.Reason != "insufficient_traffic" {
		t.Fatalf("%+v", d)
	}
}

func TestHardBreach(t *testing.T) {
	r, c, _ := newRollout(t, &MemStore{})
	_ = r.Start()
	for range 25 {
		r.Observe(canary.Canary, true, time.Millisecond)
	}
	select {
	case <-r.Breaches():
	default:
		t.Fatal("no breach signalled")
	}
	r.HardBreach()
	if st := r.State(); st.Phase != RolledBack || st.Decisions[len(st.Decisions)-1].Reason != "hard_breach" {
		t.Fatalf("%+v", st)
	}
	_ = c
}

func TestManualActionsAndConflicts(t *testing.T) {
	r, _, _ := newRollout(t, &MemStore{})
	for name, f := range map[string]func() error{"promote": r.Promote, "pause": r.Pause, "resume": r.Resume, "abort": r.Abort} {
		if err := f(); !errors.Is(err, ErrConflict) {
			t.Errorf("%s when Idle: %v, want conflict", name, err)
		}
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(r.Start())
	must(r.Pause())
	r.Check(true)
	if r.State().Phase != Paused {
		t.Fatal("paused rollout was checked")
	}
	must(r.Resume())
	must(r.Abort())
	if st := r.State(); st.Phase != RolledBack || st.Weight != 0 {
		t.Fatalf("%+v", st)
	}
	must(r.Start())
	must(r.Promote())
	if r.Weight() != 100 {
		t.Fatal("promote did not go to 100")
	}
}

func TestResumeAtSameWeightAfterRestart(t *testing.T) {
	dir := t.TempDir()
	s, err := OpenBoltStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	r, c, _ := newRollout(t, s)
	_ = r.Start()
	for range 3 {
		c.t = c.t.Add(5 * time.Second)
		traffic(r, 200, 0, 10*time.Millisecond)
		r.Check(false)
	}
	before := r.State()
	_ = s.Close()

	s2, err := OpenBoltStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	r2, err := New(testConfig(), s2, 20, c.now)
	if err != nil {
		t.Fatal(err)
	}
	after := r2.State()
	if after.Phase != before.Phase || after.Weight != before.Weight || after.Step != before.Step || len(after.Decisions) != len(before.Decisions) {
		t.Fatalf("restart changed the rollout: before %+v after %+v", before, after)
	}
	if before.Weight != 25 {
		t.Fatalf("expected to be at 25 after three passes, at %v", before.Weight)
	}
}

func TestStoreFailureIsReported(t *testing.T) {
	r, _, _ := newRollout(t, &MemStore{Err: errors.New("disk full")})
	var got []Decision
	r.OnDecision(func(d Decision) { got = append(got, d) })
	_ = r.Start()
	if len(got) != 2 || got[0].Decision != "error" || got[0].Reason != "state_store" {
		t.Fatalf("store failure not reported: %+v", got)
	}
}

func TestSlowCanaryRollsBackForLatency(t *testing.T) {
	r, c, _ := newRollout(t, &MemStore{})
	_ = r.Start()
	for range 2 {
		c.t = c.t.Add(5 * time.Second)
		traffic(r, 200, 0, 40*time.Millisecond) // stable answers in 10 ms
		r.Check(true)
	}
	st := r.State()
	if st.Phase != RolledBack || st.Decisions[len(st.Decisions)-1].Reason != "latency_ratio" {
		t.Fatalf("%+v", st.Decisions[len(st.Decisions)-1])
	}
}
