package config

import (
	"fmt"
	"math"
	"net/url"
	"sort"
	"time"

	"github.com/knhk/knhk/pkg/flags"
	"github.com/knhk/knhk/pkg/promotion"
)

type failFunc func(key, format string, args ...any) error

func (r *Rollout) validate(fail failFunc) error {
	if len(r.Steps) == 0 {
		return fail("rollout.steps", "needs at least one step, the last being 100")
	}
	for i, s := range r.Steps {
		key := fmt.Sprintf("rollout.steps[%d]", i)
		if math.IsNaN(s) || s <= 0 || s > 100 {
			return fail(key, "%v: steps are weights in percent, above 0 and at most 100", s)
		}
		if i > 0 && s <= r.Steps[i-1] {
			return fail(key, "%v after %v: steps must be strictly increasing", s, r.Steps[i-1])
		}
	}
	if last := r.Steps[len(r.Steps)-1]; last != 100 {
		return fail("rollout.steps", "the last step is %v; it must be 100 (promotion)", last)
	}
	durations := []struct {
		key      string
		d        Duration
		positive bool
	}{
		{"rollout.interval", r.Interval, true}, {"rollout.window", r.Window, false},
		{"rollout.confirm_after", r.ConfirmAfter, false}, {"rollout.hard_window", r.HardWindow, true},
	}
	for _, d := range durations {
		if d.d < 0 || (d.positive && d.d == 0) {
			return fail(d.key, "must be %s, got %s", map[bool]string{true: "positive", false: "zero or positive"}[d.positive], d.d.D())
		}
	}
	if r.Interval.D() < 100*time.Millisecond {
		return fail("rollout.interval", "%s is too short: at least 100ms", r.Interval.D())
	}
	fractions := []struct {
		key string
		v   float64
	}{
		{"rollout.max_error_rate_delta", r.MaxErrorRateDelta}, {"rollout.max_error_rate", r.MaxErrorRate},
		{"rollout.hard_error_rate", r.HardErrorRate},
	}
	for _, f := range fractions {
		if math.IsNaN(f.v) || f.v < 0 || f.v > 1 {
			return fail(f.key, "%v: a fraction from 0 to 1 (0.01 = 1%%)", f.v)
		}
	}
	if !(r.Confidence > 0.5 && r.Confidence < 1) {
		return fail("rollout.confidence", "%v: must be above 0.5 and below 1 (e.g. 0.99)", r.Confidence)
	}
	if r.MaxP99Ratio < 0 || math.IsNaN(r.MaxP99Ratio) || (r.MaxP99Ratio > 0 && r.MaxP99Ratio < 1) {
		return fail("rollout.max_p99_ratio", "%v: 0 (off) or at least 1", r.MaxP99Ratio)
	}
	if r.MaxP99Ms < 0 || math.IsNaN(r.MaxP99Ms) {
		return fail("rollout.max_p99_ms", "%v: must not be negative", r.MaxP99Ms)
	}
	if r.MinP99DeltaMs < 0 || math.IsNaN(r.MinP99DeltaMs) {
		return fail("rollout.min_p99_delta_ms", "%v: must not be negative", r.MinP99DeltaMs)
	}
	if r.FailureThreshold < 1 {
		return fail("rollout.failure_threshold", "%d: at least 1", r.FailureThreshold)
	}
	for i, w := range r.Webhooks {
		u, err := url.Parse(w.URL)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return fail(fmt.Sprintf("rollout.webhooks[%d].url", i), "%q is not an http(s) URL", w.URL)
		}
		if w.Timeout < 0 {
			return fail(fmt.Sprintf("rollout.webhooks[%d].timeout", i), "must not be negative")
		}
	}
	return nil
}

// PromotionConfig converts the rollout section for pkg/promotion.
func (c *Config) PromotionConfig() promotion.Config {
	r := c.Rollout
	window := r.Window.D()
	if window == 0 {
		window = r.Interval.D()
	}
	return promotion.Config{
		Steps: append([]float64(nil), r.Steps...), Interval: r.Interval.D(), Window: window,
		FailureThreshold: r.FailureThreshold, ConfirmAfter: r.ConfirmAfter.D(),
		Thresholds: promotion.Thresholds{
			MinRequests: r.MinRequests, MaxErrorRateDelta: r.MaxErrorRateDelta, MaxErrorRate: r.MaxErrorRate,
			Confidence: r.Confidence, MaxP99Ratio: r.MaxP99Ratio,
			MaxP99:            time.Duration(r.MaxP99Ms * float64(time.Millisecond)),
			MinLatencySamples: r.MinLatencySamples,
			MinP99Delta:       time.Duration(r.MinP99DeltaMs * float64(time.Millisecond)),
		},
		HardErrorRate: r.HardErrorRate, HardMinRequests: r.HardMinRequests, HardWindow: r.HardWindow.D(),
		MaxDecisions: 100,
	}
}

// FlagSet compiles the flags for the configured environment.
func (c *Config) FlagSet() (*flags.Set, error) {
	names := make([]string, 0, len(c.Flags))
	for n := range c.Flags {
		names = append(names, n)
	}
	sort.Strings(names)
	fs := make([]flags.Flag, 0, len(names))
	for _, n := range names {
		f := c.Flags[n]
		fs = append(fs, flags.Flag{Name: n, Default: f.Default, Environments: f.Environments, Versions: f.Versions, Percent: f.Percent, Salt: f.Salt})
	}
	return flags.New(c.Environment, fs)
}
