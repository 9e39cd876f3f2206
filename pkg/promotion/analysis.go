package promotion

import (
	"fmt"
	"math"
	"time"
)

// Thresholds configure the canary analysis.
type Thresholds struct {
	MinRequests       uint64        // canary requests needed before any judgement
	MaxErrorRateDelta float64       // canary − stable error rate allowed (fraction)
	MaxErrorRate      float64       // absolute canary error rate allowed (fraction)
	Confidence        float64       // one-sided confidence of the two-proportion test
	MaxP99Ratio       float64       // canary p99 ÷ stable p99 allowed
	MaxP99            time.Duration // absolute canary p99 allowed (0 = off)
	MinLatencySamples uint64        // per version, before p99 is compared
	// MinP99Delta is how much slower than stable the canary's p99 must also
	// be to fail the ratio check, so sub-millisecond jitter is not a regression.
	MinP99Delta time.Duration
}

// Verdict is the outcome of one check.
type Verdict int

const (
	Pass Verdict = iota
	Hold
	Fail
)

func (v Verdict) String() string {
	return [...]string{"pass", "hold", "fail"}[v]
}

// Judgement is a verdict with the check that decided it and its figures.
type Judgement struct {
	Verdict Verdict            `json:"-"`
	Result  string             `json:"result"`
	Check   string             `json:"check"`  // low-cardinality reason, used as a metric label
	Detail  string             `json:"detail"` // human sentence with the values
	Values  map[string]float64 `json:"values,omitempty"`
}

// Judge compares the canary with stable over the same window. It never
// fails the canary for lack of data: too little traffic is a hold.
func Judge(t Thresholds, canary, stable Stats) Judgement {
	vals := map[string]float64{
		"canary_requests": float64(canary.Requests), "stable_requests": float64(stable.Requests),
		"canary_error_rate": canary.ErrorRate(), "stable_error_rate": stable.ErrorRate(),
		"canary_p99_ms": canary.P99Ms, "stable_p99_ms": stable.P99Ms,
	}
	j := func(v Verdict, check, format string, args ...any) Judgement {
		finite(vals)
		return Judgement{Verdict: v, Result: v.String(), Check: check, Detail: fmt.Sprintf(format, args...), Values: vals}
	}
	if canary.Requests < t.MinRequests {
		return j(Hold, "insufficient_traffic", "insufficient traffic: %d canary requests in the window, need %d",
			canary.Requests, t.MinRequests)
	}
	cr, sr := canary.ErrorRate(), stable.ErrorRate()
	if t.MaxErrorRate > 0 && cr > t.MaxErrorRate {
		return j(Fail, "error_rate_absolute", "canary error rate %.2f%% > max_error_rate %.2f%% (%d/%d)",
			cr*100, t.MaxErrorRate*100, canary.Errors, canary.Requests)
	}
	if z, ok := errorRateWorse(canary, stable, t.MaxErrorRateDelta); ok {
		if zc := zScore(t.Confidence); z > zc {
			vals["z"] = z
			return j(Fail, "error_rate", "canary error rate %.2f%% exceeds stable's %.2f%% by more than %.2f points (z %.2f > %.2f at confidence %.3f)",
				cr*100, sr*100, t.MaxErrorRateDelta*100, z, zc, t.Confidence)
		}
	}
	if canary.Requests >= t.MinLatencySamples && stable.Requests >= t.MinLatencySamples {
		if t.MaxP99 > 0 && canary.P99 > t.MaxP99 {
			return j(Fail, "latency_absolute", "canary p99 %.1f ms > max_p99 %.1f ms", canary.P99Ms, ms(t.MaxP99))
		}
		if stable.P99 > 0 && t.MaxP99Ratio > 0 && float64(canary.P99) > t.MaxP99Ratio*float64(stable.P99) &&
			canary.P99-stable.P99 > t.MinP99Delta {
			return j(Fail, "latency_ratio", "canary p99 %.1f ms > %.2f × stable p99 %.1f ms",
				canary.P99Ms, t.MaxP99Ratio, stable.P99Ms)
		}
		return j(Pass, "healthy", "canary healthy: error rate %.2f%% vs stable %.2f%%, p99 %.1f ms vs %.1f ms",
			cr*100, sr*100, canary.P99Ms, stable.P99Ms)
	}
	// Too few samples for a p99: judge on errors alone rather than hold a
	// low-traffic step forever.
	return j(Pass, "healthy", "canary healthy: error rate %.2f%% vs stable %.2f%% (p99 not compared: %d canary, %d stable requests, need %d each)",
		cr*100, sr*100, canary.Requests, stable.Requests, t.MinLatencySamples)
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// errorRateWorse returns the z statistic of H0: p_canary − p_stable ≤ delta
// against H1: greater (unpooled standard error, as the null is not equality).
// The standard error uses Agresti–Caffo's adjusted proportions (one success
// and one failure added to each side), so it is never zero: a 100 %-failing
// canary against a clean stable gets a large, finite z rather than +Inf,
// which JSON (the state store, the API, webhooks) cannot encode.
func errorRateWorse(c, s Stats, delta float64) (float64, bool) {
	if c.Requests == 0 || s.Requests == 0 {
		return 0, false
	}
	diff := c.ErrorRate() - s.ErrorRate() - delta
	adj := func(st Stats) float64 {
		n := float64(st.Requests) + 2
		p := (float64(st.Errors) + 1) / n
		return p * (1 - p) / n
	}
	return diff / math.Sqrt(adj(c)+adj(s)), true
}

// finite drops non-finite figures: a judgement is persisted and served as
// JSON, and one NaN or Inf would make every later save and read fail.
func finite(vals map[string]float64) {
	for k, v := range vals {
		if math.IsNaN(v) || math.IsInf(v, 0) {
			delete(vals, k)
		}
	}
}

// zScore is the one-sided critical value for a confidence level, e.g.
// 0.99 → 2.326: the inverse of the standard normal CDF.
func zScore(confidence float64) float64 {
	return math.Sqrt2 * math.Erfinv(2*confidence-1)
}
