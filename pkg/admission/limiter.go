package admission

import (
	"math"
	"sync"
	"time"
)

// LimiterConfig tunes the adaptive limit of one upstream cluster.
type LimiterConfig struct {
	Initial, Min, Max int
	// Tolerance: the short-window latency may exceed the no-load baseline
	// by this factor before the limit is cut (1.2 = 20 % queueing allowed).
	Tolerance float64
	// Slack is queueing delay always tolerated on top of Tolerance: for a
	// sub-millisecond service, scheduling jitter alone exceeds 20 %.
	Slack time.Duration
	// Shares are the fractions of the limit kept for each class against
	// less critical ones; a class may use more when it leaves the unused
	// shares of more critical classes free. C1's share is 0: it runs on
	// spare capacity.
	Shares [numClasses]float64
	// Budgets: a request is refused at once when the latency estimate
	// already exceeds its class budget.
	Budgets Budgets
}

// DefaultLimiterConfig: R1 70 %, W1 30 %, C1 spare only.
func DefaultLimiterConfig() LimiterConfig {
	return LimiterConfig{Initial: 20, Min: 10, Max: 1000, Tolerance: 1.2, Slack: 2 * time.Millisecond,
		Shares: [numClasses]float64{R1: 0.7, W1: 0.3, C1: 0}, Budgets: DefaultBudgets}
}

// Verdict of an admission attempt.
type Verdict uint8

const (
	Admit Verdict = iota
	RejectNoRoom
	RejectOverBudget
)

// Reason is a short machine-readable reason (metrics label, log field).
func (v Verdict) Reason() string {
	return [...]string{"admitted", "no_room", "over_budget"}[v]
}

// Limiter is an adaptive concurrency limit, gradient style: the limit moves
// by the ratio of the no-load latency baseline to the short-window
// latency, cut fast when latency rises and recovered slowly, and is
// partitioned by class. Safe for concurrent use.
type Limiter struct {
	cfg LimiterConfig

	mu       sync.Mutex
	limit    float64
	inflight [numClasses]int
	total    int
	peak     [numClasses]float64 // decaying recent peak demand (in flight + 1) per class
	peakAt   time.Time
	short    float64 // mean latency of the last window, seconds
	baseline float64 // slowly rising minimum of short: the no-load latency
	samples  uint64
	batchSum float64
	batchN   int

	admitted, rejected [numClasses]uint64
}

// NewLimiter returns a limiter at cfg.Initial.
func NewLimiter(cfg LimiterConfig) *Limiter {
	return &Limiter{cfg: cfg, limit: float64(cfg.Initial)}
}

// Acquire admits or rejects a request of class c. On Admit the caller must
// call Release exactly once when the request ends.
func (l *Limiter) Acquire(c Class, now time.Time) Verdict {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.decay(now)
	if l.short > 0 && l.samples >= 10 && time.Duration(l.short*float64(time.Second)) > l.cfg.Budgets[c] {
		l.rejected[c]++
		return RejectOverBudget
	}
	// Demand, admitted or not, raises the class's recent peak.
	l.peak[c] = math.Max(l.peak[c], float64(l.inflight[c]+1))
	if float64(l.total)+l.reserve(c) >= l.limit {
		l.rejected[c]++
		return RejectNoRoom
	}
	l.inflight[c]++
	l.total++
	l.admitted[c]++
	return Admit
}

// reserve is the capacity class c, once past its own share, must leave
// free for the others, as far as their recent peak demand (with 50 %
// headroom) would use it: every class keeps its share (R1 70 %, W1 30 %)
// against the others, and C1, which has none, must leave R1 and W1 all
// they demand, so it only ever runs on spare capacity. A class within its
// own share only needs a free slot.
func (l *Limiter) reserve(c Class) float64 {
	if float64(l.inflight[c]) < l.guaranteed(c) {
		return 0
	}
	r := 0.0
	for _, k := range Classes {
		want := 1.5*l.peak[k] + 1
		switch {
		case k == c:
			continue
		case k > c || l.cfg.Shares[c] > 0:
			// Less critical classes keep their shares; a class with a
			// share of its own only yields the more critical ones theirs.
			want = math.Min(l.guaranteed(k), want)
		}
		r += math.Max(0, want-float64(l.inflight[k]))
	}
	return r
}

// decay lets peaks fade with a 2 s half-life, so a class that has gone
// quiet stops holding capacity back within seconds.
func (l *Limiter) decay(now time.Time) {
	if l.peakAt.IsZero() {
		l.peakAt = now
		return
	}
	if dt := now.Sub(l.peakAt); dt >= 100*time.Millisecond {
		f := math.Pow(0.5, dt.Seconds()/2)
		for i := range l.peak {
			l.peak[i] = math.Max(l.peak[i]*f, float64(l.inflight[i]))
		}
		l.peakAt = now
	}
}

func (l *Limiter) guaranteed(c Class) float64 { return l.limit * l.cfg.Shares[c] }

// Release ends an admitted request; latency is request headers → response
// headers, or negative when unknown (the stream ended without a response).
func (l *Limiter) Release(c Class, latency time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.inflight[c]--
	l.total--
	if latency > 0 {
		l.sample(latency.Seconds())
	}
}

// sample adds a latency sample; the limit moves once per window of about
// one limit's worth of completions (one round trip), so a latency rise is
// acted on once, not once per request that saw it.
func (l *Limiter) sample(rtt float64) {
	l.samples++
	l.batchSum += rtt
	l.batchN++
	if l.short == 0 {
		l.short, l.baseline = rtt, rtt
	}
	if l.batchN < max(10, int(l.limit)) {
		return
	}
	l.short = l.batchSum / float64(l.batchN)
	l.batchSum, l.batchN = 0, 0
	// The baseline follows decreases at once and drifts up slowly, so it
	// tracks the no-load latency even if the service itself slows.
	if l.short < l.baseline {
		l.baseline = l.short
	} else {
		l.baseline += 0.00005 * (l.short - l.baseline)
	}
	gradient := math.Max(0.5, math.Min(1, (l.cfg.Tolerance*l.baseline+l.cfg.Slack.Seconds())/l.short))
	next := l.limit*gradient + 1
	switch {
	case next < l.limit:
		l.limit += 0.5 * (next - l.limit) // cut fast
	case float64(l.total+1) >= l.limit*0.5: // +1: the request just released
		l.limit += 0.2 * (next - l.limit) // recover slowly, and only when the limit is in use
	}
	l.limit = math.Max(float64(l.cfg.Min), math.Min(float64(l.cfg.Max), l.limit))
}

// Snapshot is the limiter's state for metrics and the API.
type Snapshot struct {
	Limit      float64
	InFlight   [numClasses]int
	Admitted   [numClasses]uint64
	Rejected   [numClasses]uint64
	ShortRTT   time.Duration
	Baseline   time.Duration
	Guaranteed [numClasses]float64
}

// Snapshot returns the current state.
func (l *Limiter) Snapshot() Snapshot {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := Snapshot{Limit: l.limit, InFlight: l.inflight, Admitted: l.admitted, Rejected: l.rejected,
		ShortRTT: time.Duration(l.short * float64(time.Second)), Baseline: time.Duration(l.baseline * float64(time.Second))}
	for c := range s.Guaranteed {
		s.Guaranteed[c] = l.guaranteed(Class(c))
	}
	return s
}

// LatencyEstimate is the short-window latency (0 before any sample).
func (l *Limiter) LatencyEstimate() time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	return time.Duration(l.short * float64(time.Second))
}
