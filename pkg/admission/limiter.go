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
	// Budgets: a request is refused at once when its class's own latency
	// estimate already exceeds its class budget.
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

// The per-class latency estimate that class budgets are judged against.
const (
	// estimateSamples is how many recent completions of a class its
	// estimate averages (an EWMA with weight 1/estimateSamples, a plain
	// mean until it has that many), and how many it needs before it may
	// shed by budget at all: a handful of slow calls is not a trend.
	estimateSamples = 10
	// estimateTTL is how long an estimate stays valid after its class's
	// last completion; then it is forgotten (unknown: never shed by
	// budget) and the next requests measure the upstream afresh. While a
	// class has traffic its probes (see Acquire) refresh it well within
	// this; so it only expires after a silence, and an estimate from a
	// past burst never sheds the next one. 5 s is longer than any upstream
	// that is merely slow takes to answer a probe (a slower one is timing
	// out, and the concurrency limit, not the budget, bounds what is sent
	// to it), and short against the minutes a class may sit idle.
	estimateTTL = 5 * time.Second
	// probes is how many requests of a class over its budget are still
	// admitted at a time. Their completions keep the estimate measuring
	// the upstream, so the class is served again as soon as the upstream
	// is fast, though it may have no other traffic: nothing latches. One
	// probe would re-measure one sample per round trip (10 round trips to
	// recover); three recover after a stall about as fast as one estimate
	// fed by every class did (simulated), at the cost of three requests of
	// the class in flight to an upstream known to be slow.
	probes = 3
)

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
	short    float64 // mean latency of the last window over all classes, seconds
	baseline float64 // slowly rising minimum of short: the no-load latency
	batchSum float64
	batchN   int
	estimate [numClasses]estimate

	admitted, rejected [numClasses]uint64
}

// estimate is one class's recent latency, forgotten estimateTTL after the
// class's last completion.
type estimate struct {
	mean float64 // seconds
	n    int     // samples since it was last forgotten, capped at estimateSamples
	last time.Time
}

func (e *estimate) add(rtt float64, now time.Time) {
	if now.Sub(e.last) >= estimateTTL {
		*e = estimate{}
	}
	e.n = min(e.n+1, estimateSamples)
	e.mean += (rtt - e.mean) / float64(e.n)
	e.last = now
}

// value is the estimate in seconds, or false while it is unknown: fewer
// than estimateSamples samples, or none for estimateTTL.
func (e *estimate) value(now time.Time) (float64, bool) {
	if e.n < estimateSamples || now.Sub(e.last) >= estimateTTL {
		return 0, false
	}
	return e.mean, true
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
	// A class over its budget is refused, but for its probes.
	if est, ok := l.estimate[c].value(now); ok && est > l.cfg.Budgets[c].Seconds() && l.inflight[c] >= probes {
		l.rejected[c]++
		return RejectOverBudget
	}
	// Demand, admitted or not, raises the class's recent peak.
	l.peak[c] = math.Max(l.peak[c], float64(l.inflight[c]+1))
	// With nothing in flight nothing queues, so any class may go: else a
	// limit of 2 or less, where C1's spare-capacity rule leaves it no room,
	// would shut a C1-only cluster for good, as no completion would ever
	// move the limit again.
	if l.total > 0 && float64(l.total)+l.reserve(c) >= l.limit {
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

// Release ends an admitted request at now; latency is request headers →
// response headers, or negative when unknown (the stream ended without a
// response).
func (l *Limiter) Release(c Class, latency time.Duration, now time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.inflight[c]--
	l.total--
	if latency > 0 {
		l.estimate[c].add(latency.Seconds(), now)
		l.sample(latency.Seconds())
	}
}

// sample adds a latency sample; the limit moves once per window of about
// one limit's worth of completions (one round trip), so a latency rise is
// acted on once, not once per request that saw it.
func (l *Limiter) sample(rtt float64) {
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

// Estimate is class c's latency estimate at now, the one its budget is
// judged against: 0 while unknown (fewer than estimateSamples completions
// since it was last forgotten, or none for estimateTTL).
func (l *Limiter) Estimate(c Class, now time.Time) time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	est, _ := l.estimate[c].value(now)
	return time.Duration(est * float64(time.Second))
}
