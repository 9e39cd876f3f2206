package promotion

import (
	"context"
	"encoding/json"
	"errors"
	"math/rand/v2"
	"sync"
	"sync/atomic"
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

var ctx = context.Background()

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

// clock is a test clock; the owner goroutine reads it while the test moves it.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// memStore is a Store in memory.
type memStore struct {
	mu    sync.Mutex
	st    State
	saved bool
	err   error
}

func (m *memStore) Load() (State, bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.st, m.saved, nil
}

func (m *memStore) Save(st State) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.err != nil {
		return m.err
	}
	m.st, m.saved = st, true
	return nil
}

// run starts the owner goroutine for the test's lifetime.
func run(t *testing.T, r *Rollout) {
	ctx, cancel := context.WithCancel(context.Background())
	go r.Run(ctx)
	t.Cleanup(func() { cancel(); <-r.stopped })
}

// checkNow runs a check on the owner goroutine and waits for it.
func checkNow(r *Rollout, force bool) {
	_ = r.do(context.Background(), func() error { r.check(force); return nil })
}

// due reads the schedule the owner goroutine last published.
func (r *Rollout) due() time.Time { return r.snap.Load().nextCheck }

func testConfig() Config {
	return Config{Steps: []float64{1, 5, 10, 25, 50, 100}, Interval: 5 * time.Second, Window: 5 * time.Second,
		FailureThreshold: 2, ConfirmAfter: time.Second, Thresholds: defaults(),
		HardErrorRate: 0.5, HardMinRequests: 20, HardWindow: 5 * time.Second, MaxDecisions: 50}
}

func newRollout(t *testing.T, store Store, onDecision ...func(Decision)) (*Rollout, *clock, *[]float64) {
	c := &clock{t: time.Unix(10000, 0)}
	r, err := New(testConfig(), store, 20, c.now)
	if err != nil {
		t.Fatal(err)
	}
	var weights []float64
	r.OnWeight(func(w float64) { weights = append(weights, w) })
	for _, f := range onDecision {
		r.OnDecision(f)
	}
	r.manual = true
	run(t, r)
	return r, c, &weights
}

// traffic feeds canaryN canary requests and 800 healthy stable ones. The
// canary's failures are spread evenly, so a rate below HardErrorRate never
// makes a hard-breach run.
func traffic(r *Rollout, canaryN int, canaryErr float64, canaryLat time.Duration) {
	const stableN = 800
	for i := range canaryN {
		r.Observe(canary.Canary, int(float64(i+1)*canaryErr) > int(float64(i)*canaryErr), canaryLat)
	}
	for range stableN {
		r.Observe(canary.Stable, false, 10*time.Millisecond)
	}
}

func TestHealthyRolloutPromotes(t *testing.T) {
	r, c, weights := newRollout(t, &memStore{})
	if r.Weight() != 20 {
		t.Fatalf("idle weight %v, want the config's 20", r.Weight())
	}
	if err := r.Start(ctx); err != nil {
		t.Fatal(err)
	}
	for i := 0; r.State().Phase == Progressing; i++ {
		if i > 20 {
			t.Fatal("never promoted")
		}
		c.add(5 * time.Second)
		traffic(r, 200, 0, 10*time.Millisecond)
		checkNow(r, false)
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
	r, c, _ := newRollout(t, &memStore{})
	_ = r.Start(ctx)
	c.add(5 * time.Second)
	traffic(r, 200, 0.3, 10*time.Millisecond) // 30 %: below the hard breach
	checkNow(r, false)
	if st := r.State(); st.Phase != Progressing || st.Failures != 1 {
		t.Fatalf("after one failed check: %+v", st)
	}
	if due := r.due().Sub(c.now()); due != time.Second {
		t.Fatalf("failed check re-checked in %v, want ConfirmAfter (1s)", due)
	}
	c.add(time.Second)
	traffic(r, 200, 0.3, 10*time.Millisecond)
	checkNow(r, false)
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
	r, c, _ := newRollout(t, &memStore{})
	_ = r.Start(ctx)
	for range 50 {
		c.add(5 * time.Second)
		traffic(r, 10, 0.3, 10*time.Millisecond) // 2 req/s, even failing ones
		checkNow(r, false)
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
	r, _, _ := newRollout(t, &memStore{})
	_ = r.Start(ctx)
	for range 25 {
		r.Observe(canary.Canary, true, time.Millisecond)
	}
	// The owner goroutine reacts to the breach signal on its own.
	deadline := time.Now().Add(10 * time.Second)
	for r.State().Phase != RolledBack {
		if time.Now().After(deadline) {
			t.Fatalf("no rollback after a hard breach: %+v", r.State())
		}
		time.Sleep(time.Millisecond)
	}
	if st := r.State(); st.Decisions[len(st.Decisions)-1].Reason != "hard_breach" {
		t.Fatalf("%+v", st)
	}
}

func TestManualActionsAndConflicts(t *testing.T) {
	r, _, _ := newRollout(t, &memStore{})
	for name, f := range map[string]func(context.Context) error{"promote": r.Promote, "pause": r.Pause, "resume": r.Resume, "abort": r.Abort} {
		if err := f(ctx); !errors.Is(err, ErrConflict) {
			t.Errorf("%s when Idle: %v, want conflict", name, err)
		}
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(r.Start(ctx))
	must(r.Pause(ctx))
	checkNow(r, true)
	if r.State().Phase != Paused {
		t.Fatal("paused rollout was checked")
	}
	must(r.Resume(ctx))
	must(r.Abort(ctx))
	if st := r.State(); st.Phase != RolledBack || st.Weight != 0 {
		t.Fatalf("%+v", st)
	}
	must(r.Start(ctx))
	must(r.Promote(ctx))
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
	_ = r.Start(ctx)
	for range 3 {
		c.add(5 * time.Second)
		traffic(r, 200, 0, 10*time.Millisecond)
		checkNow(r, false)
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
	var got []Decision
	r, _, _ := newRollout(t, &memStore{err: errors.New("disk full")}, func(d Decision) { got = append(got, d) })
	_ = r.Start(ctx)
	if len(got) != 2 || got[0].Decision != "error" || got[0].Reason != "state_store" {
		t.Fatalf("store failure not reported: %+v", got)
	}
}

func TestSlowCanaryRollsBackForLatency(t *testing.T) {
	r, c, _ := newRollout(t, &memStore{})
	_ = r.Start(ctx)
	for range 2 {
		c.add(5 * time.Second)
		traffic(r, 200, 0, 40*time.Millisecond) // stable answers in 10 ms
		checkNow(r, true)
	}
	st := r.State()
	if st.Phase != RolledBack || st.Decisions[len(st.Decisions)-1].Reason != "latency_ratio" {
		t.Fatalf("%+v", st.Decisions[len(st.Decisions)-1])
	}
}

// TestAllFailingCanaryWithNoAbsoluteLimitSavesItsRollback: with
// max_error_rate 0 the relative test decides, and a canary failing every
// request against a clean stable has no variance on either side. The z
// statistic once came out +Inf, which JSON cannot encode, so the rollback
// was never saved and the API could not serve the state.
func TestAllFailingCanaryWithNoAbsoluteLimitSavesItsRollback(t *testing.T) {
	j := Judge(Thresholds{MinRequests: 50, MaxErrorRateDelta: 0.01, Confidence: 0.99}, stats(200, 200, 0), stats(2000, 0, 0))
	if j.Verdict != Fail || j.Check != "error_rate" {
		t.Fatalf("got %s/%s (%s), want fail/error_rate", j.Verdict, j.Check, j.Detail)
	}
	if _, err := json.Marshal(j); err != nil {
		t.Fatalf("judgement does not encode: %v (%v)", err, j.Values)
	}

	dir := t.TempDir()
	s, err := OpenBoltStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	cfg := testConfig()
	cfg.Thresholds.MaxErrorRate = 0
	cfg.HardMinRequests = 0 // the analysis, not the hard breach, must decide
	c := &clock{t: time.Unix(10000, 0)}
	r, err := New(cfg, s, 0, c.now)
	if err != nil {
		t.Fatal(err)
	}
	var errs []Decision
	r.OnDecision(func(d Decision) {
		if d.Decision == "error" {
			errs = append(errs, d)
		}
	})
	r.manual = true
	run(t, r)
	if err := r.Start(ctx); err != nil {
		t.Fatal(err)
	}
	for range cfg.FailureThreshold {
		c.add(5 * time.Second)
		traffic(r, 200, 1, 10*time.Millisecond)
		checkNow(r, false)
	}
	st := r.State()
	if st.Phase != RolledBack || st.Decisions[len(st.Decisions)-1].Reason != "error_rate" {
		t.Fatalf("not rolled back for its error rate: %+v", st.Decisions[len(st.Decisions)-1])
	}
	if len(errs) > 0 {
		t.Fatalf("state not saved: %+v", errs)
	}
	if _, err := json.Marshal(st); err != nil {
		t.Fatalf("state does not encode: %v", err)
	}
	_ = s.Close()
	s2, err := OpenBoltStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	saved, ok, err := s2.Load()
	if err != nil || !ok || saved.Phase != RolledBack {
		t.Fatalf("saved state: %+v %v %v", saved.Phase, ok, err)
	}
}

// TestConcurrentActionsReadsAndReloadsNeverWedge runs what users do at once:
// actions, reloads, reads and traffic, with a weight listener that reads
// the rollout back (as the server's does). A lock cycle between the
// listeners and the state once wedged every reader for good.
func TestConcurrentActionsReadsAndReloadsNeverWedge(t *testing.T) {
	s := &memStore{}
	r, err := New(testConfig(), s, 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	var applied atomic.Int64
	r.OnWeight(func(w float64) {
		_ = r.State()
		if r.Weight() != w {
			t.Errorf("listener saw weight %v while the snapshot says %v", w, r.Weight())
		}
		applied.Add(1)
	})
	run(t, r)
	actions := []func(context.Context) error{r.Start, r.Promote, r.Abort, r.Pause, r.Resume, r.Start}
	var wg sync.WaitGroup
	stop := time.Now().Add(2 * time.Second)
	for g := range 4 {
		wg.Go(func() {
			for i := g; time.Now().Before(stop); i++ {
				switch g {
				case 0, 1:
					if err := actions[i%len(actions)](ctx); err != nil && !errors.Is(err, ErrConflict) {
						t.Errorf("action: %v", err)
					}
				case 2:
					if err := r.Reconfigure(ctx, float64(i%3), func(float64) error { _ = r.State(); return nil }); err != nil {
						t.Errorf("reconfigure: %v", err)
					}
				default:
					_, _ = r.State(), r.Weight()
					r.Observe(canary.Canary, i%2 == 0, time.Millisecond)
				}
			}
		})
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("wedged: actions, reloads and reads did not finish")
	}
	if applied.Load() < 10 {
		t.Fatalf("only %d weights applied", applied.Load())
	}
}

// TestScheduledChecksRunUnderAStreamOfActions: a client retrying an action
// in a tight loop (each one refused) once re-armed the check timer before it
// could fire, so a failing canary was never judged.
func TestScheduledChecksRunUnderAStreamOfActions(t *testing.T) {
	cfg := testConfig()
	cfg.Interval = 50 * time.Millisecond
	r, err := New(cfg, &memStore{}, 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	run(t, r)
	if err := r.Start(ctx); err != nil {
		t.Fatal(err)
	}
	stop := time.Now().Add(time.Second)
	for time.Now().Before(stop) {
		if err := r.Resume(ctx); !errors.Is(err, ErrConflict) {
			t.Fatalf("resume while progressing: %v", err)
		}
	}
	checks := 0
	for _, d := range r.State().Decisions {
		if d.Reason == "insufficient_traffic" {
			checks++
		}
	}
	// 20 are due in the second; a starved schedule ran none.
	if checks < 3 {
		t.Fatalf("%d scheduled checks ran in 1 s at a 50 ms interval under a stream of actions", checks)
	}
}
