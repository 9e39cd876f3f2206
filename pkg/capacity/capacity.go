// Package capacity turns live traffic into capacity advice: how many
// distinct keys there are (HyperLogLog), which are hot (Space-Saving
// top-K), how big a cache must be for a hit rate (SHARDS miss-ratio
// curve), where load is heading (a trend over a sliding window), and how
// much concurrency — and so how many replicas — each SLO class needs
// (Little's law from measured latency). Memory is fixed whatever the
// number of keys.
package capacity

import (
	"fmt"
	"math"
	"sync"
	"time"

	"github.com/axiomhq/hyperloglog"
	"github.com/cespare/xxhash/v2"

	"github.com/knhk/knhk/pkg/admission"
)

const topKEvery = 4

// Config sizes the sketches.
type Config struct {
	TopK        int           // heavy hitters kept (default 50)
	MRCKeys     int           // sampled keys SHARDS tracks (default 16,384)
	LoadWindow  time.Duration // load trend window (default 10 min)
	ClassWindow time.Duration // window for per-class rates and latency (default 60 s)
}

func (c *Config) defaults() {
	if c.TopK <= 0 {
		c.TopK = 50
	}
	if c.MRCKeys <= 0 {
		c.MRCKeys = 16384
	}
	if c.LoadWindow <= 0 {
		c.LoadWindow = 10 * time.Minute
	}
	if c.ClassWindow <= 0 {
		c.ClassWindow = time.Minute
	}
}

type classSecond struct {
	unix              int64
	offered, admitted uint64
	completed         uint64
	latencySum        float64 // seconds
}

// Tracker is fed by every request. Safe for concurrent use.
type Tracker struct {
	cfg Config

	mu      sync.Mutex
	hll     *hyperloglog.Sketch
	top     *TopK
	seq     uint64 // request counter: the top-K sees every topKEvery-th
	mrc     *MRC
	load    []loadSecond
	classes [3][]classSecond
}

type loadSecond struct {
	unix  int64
	count uint64
}

// NewTracker builds a tracker.
func NewTracker(cfg Config) *Tracker {
	cfg.defaults()
	// Dense registers from the start (16 KiB at precision 14): the sparse
	// encoding saves memory for tiny sets but costs ~1 µs per insert.
	hll, _ := hyperloglog.NewSketch(14, false)
	t := &Tracker{cfg: cfg, hll: hll, top: NewTopK(cfg.TopK), mrc: NewMRC(cfg.MRCKeys),
		load: make([]loadSecond, int(cfg.LoadWindow/time.Second))}
	for i := range t.classes {
		t.classes[i] = make([]classSecond, int(cfg.ClassWindow/time.Second))
	}
	return t
}

// Observe records one request's key.
func (t *Tracker) Observe(key string, now time.Time) {
	h := xxhash.Sum64String(key)
	t.mu.Lock()
	t.hll.InsertHash(h)
	// Space-Saving on every request costs ~150 ns in a long tail (each new
	// key replaces a counter); on one in four, heavy hitters are still
	// found and their counts are scaled back up in Report.
	t.seq++
	if t.seq%topKEvery == 0 {
		t.top.Add(key)
	}
	t.mrc.Access(h)
	sec := now.Unix()
	b := &t.load[int(sec%int64(len(t.load)))]
	if b.unix != sec {
		*b = loadSecond{unix: sec}
	}
	b.count++
	t.mu.Unlock()
}

func (t *Tracker) classSlot(c admission.Class, now time.Time) *classSecond {
	ring := t.classes[c]
	sec := now.Unix()
	b := &ring[int(sec%int64(len(ring)))]
	if b.unix != sec {
		*b = classSecond{unix: sec}
	}
	return b
}

// Offered records an admission decision for class c.
func (t *Tracker) Offered(c admission.Class, admitted bool, now time.Time) {
	t.mu.Lock()
	b := t.classSlot(c, now)
	b.offered++
	if admitted {
		b.admitted++
	}
	t.mu.Unlock()
}

// Completed records an admitted request's latency.
func (t *Tracker) Completed(c admission.Class, latency time.Duration, now time.Time) {
	t.mu.Lock()
	b := t.classSlot(c, now)
	b.completed++
	b.latencySum += latency.Seconds()
	t.mu.Unlock()
}

// Report is GET /v1/capacity.
type Report struct {
	DistinctKeys    uint64        `json:"distinct_keys"`
	References      uint64        `json:"references"`
	HotKeys         []Item        `json:"hot_keys"`
	CacheSizes      []CacheSize   `json:"cache_sizes"`
	MissRatioCurve  []CurvePoint  `json:"miss_ratio_curve"`
	SamplingRate    float64       `json:"mrc_sampling_rate"`
	Load            Load          `json:"load"`
	Classes         []ClassReport `json:"classes"`
	Concurrency     Concurrency   `json:"concurrency"`
	Recommendations []string      `json:"recommendations"`
}

// CacheSize is the LRU size needed for a hit rate.
type CacheSize struct {
	HitRate   float64 `json:"hit_rate"`
	Keys      float64 `json:"keys"`
	Reachable bool    `json:"reachable"`
}

// CurvePoint is one point of the hit-rate curve.
type CurvePoint struct {
	Keys    float64 `json:"keys"`
	HitRate float64 `json:"hit_rate"`
}

// Load is the request rate and where it is heading.
type Load struct {
	CurrentRPS    float64 `json:"current_rps"` // last full second
	AverageRPS    float64 `json:"average_rps"` // over the window
	TrendPerMin   float64 `json:"trend_rps_per_minute"`
	ForecastRPS1h float64 `json:"forecast_rps_in_1h"`
	WindowSeconds float64 `json:"window_seconds"`
}

// ClassReport is one class's demand over the class window.
type ClassReport struct {
	Class             string  `json:"class"`
	OfferedRPS        float64 `json:"offered_rps"`
	AdmittedRPS       float64 `json:"admitted_rps"`
	MeanLatencyMs     float64 `json:"mean_latency_ms"`
	ConcurrencyNeeded float64 `json:"concurrency_needed"`
}

// Concurrency compares what the classes need with the learned limit.
type Concurrency struct {
	Needed              float64 `json:"needed"`
	Limit               float64 `json:"limit"`
	Replicas            int     `json:"replicas"`
	RecommendedReplicas int     `json:"recommended_replicas"`
}

// Report summarises the tracker. limit is the upstream's current
// concurrency limit (0 if unknown); replicas its current endpoint count.
func (t *Tracker) Report(now time.Time, limit float64, replicas int) Report {
	t.mu.Lock()
	defer t.mu.Unlock()
	r := Report{DistinctKeys: t.hll.Estimate(), HotKeys: t.top.Top(10)}
	for i := range r.HotKeys {
		r.HotKeys[i].Count *= topKEvery
		r.HotKeys[i].Error *= topKEvery
	}
	refs, rate, _ := t.mrc.Stats()
	r.References, r.SamplingRate = uint64(refs), rate
	for _, target := range []float64{0.90, 0.95, 0.99} {
		size, ok := t.mrc.SizeFor(target)
		r.CacheSizes = append(r.CacheSizes, CacheSize{HitRate: target, Keys: size, Reachable: ok})
	}
	for size := 1.0; size <= math.Max(2, float64(r.DistinctKeys)*2); size *= 4 {
		r.MissRatioCurve = append(r.MissRatioCurve, CurvePoint{Keys: size, HitRate: t.mrc.HitRate(size)})
	}
	r.Load = t.loadTrend(now)
	r.Concurrency.Limit, r.Concurrency.Replicas = limit, replicas
	for _, c := range admission.Classes {
		cr := t.classReport(c, now)
		r.Classes = append(r.Classes, cr)
		r.Concurrency.Needed += cr.ConcurrencyNeeded
	}
	if limit > 0 && replicas > 0 {
		r.Concurrency.RecommendedReplicas = int(math.Ceil(r.Concurrency.Needed / (limit / float64(replicas))))
	}
	r.Recommendations = advice(r)
	return r
}

func (t *Tracker) classReport(c admission.Class, now time.Time) ClassReport {
	var s classSecond
	from := now.Unix() - int64(len(t.classes[c]))
	first := now.Unix()
	for _, b := range t.classes[c] {
		if b.unix > from && b.unix < now.Unix() { // full seconds only
			s.offered += b.offered
			s.admitted += b.admitted
			s.completed += b.completed
			s.latencySum += b.latencySum
			first = min(first, b.unix)
		}
	}
	// Rates over the seconds since this class was first seen in the
	// window, not the whole window: a fresh knhk is not idle for a minute.
	secs := math.Max(1, float64(now.Unix()-first))
	cr := ClassReport{Class: c.String(), OfferedRPS: float64(s.offered) / secs, AdmittedRPS: float64(s.admitted) / secs}
	if s.completed > 0 {
		mean := s.latencySum / float64(s.completed)
		cr.MeanLatencyMs = mean * 1000
		// Little's law: in-flight = arrival rate × time in system, for all
		// the demand (rejected requests included), at the measured latency.
		cr.ConcurrencyNeeded = cr.OfferedRPS * mean
	}
	return cr
}

// minTrendSeconds is the history a trend needs before it is reported: a
// start-up ramp is not growth.
const minTrendSeconds = 30

// loadTrend fits a least-squares line to the per-second counts.
func (t *Tracker) loadTrend(now time.Time) Load {
	var l Load
	var n, sx, sy, sxx, sxy float64
	cur := now.Unix()
	for _, b := range t.load {
		if b.unix >= cur || b.unix <= cur-int64(len(t.load)) {
			continue
		}
		x, y := float64(b.unix-cur), float64(b.count)
		n++
		sx, sy, sxx, sxy = sx+x, sy+y, sxx+x*x, sxy+x*y
		if b.unix == cur-1 {
			l.CurrentRPS = y
		}
	}
	if n == 0 {
		return l
	}
	l.WindowSeconds = n
	l.AverageRPS = sy / n
	if d := n*sxx - sx*sx; n >= minTrendSeconds && d != 0 {
		slope := (n*sxy - sx*sy) / d // requests/s per second
		icept := (sy - slope*sx) / n
		l.TrendPerMin = slope * 60
		l.ForecastRPS1h = math.Max(0, icept+slope*3600)
	}
	return l
}

func advice(r Report) []string {
	var out []string
	for _, c := range r.CacheSizes {
		if c.Reachable {
			out = append(out, fmt.Sprintf("An LRU cache of %.0f keys would serve %.0f%% of requests (working set ≈ %d distinct keys).",
				c.Keys, c.HitRate*100, r.DistinctKeys))
		} else {
			out = append(out, fmt.Sprintf("No cache size reaches a %.0f%% hit rate: too many keys are seen only once.", c.HitRate*100))
		}
	}
	if r.Load.TrendPerMin > 0.05*math.Max(1, r.Load.AverageRPS) {
		out = append(out, fmt.Sprintf("Load is rising %.1f req/s per minute; at this rate it reaches %.0f req/s in an hour.",
			r.Load.TrendPerMin, r.Load.ForecastRPS1h))
	}
	cn := r.Concurrency
	if cn.Limit > 0 && cn.Needed > cn.Limit {
		out = append(out, fmt.Sprintf("Demand needs %.0f requests in flight but the upstream sustains %.0f: run %d replicas instead of %d.",
			cn.Needed, cn.Limit, cn.RecommendedReplicas, cn.Replicas))
	}
	for _, c := range r.Classes {
		if c.OfferedRPS > 0 && c.AdmittedRPS < 0.99*c.OfferedRPS {
			out = append(out, fmt.Sprintf("%s: %.0f%% of requests shed (%.0f of %.0f req/s admitted).",
				c.Class, (1-c.AdmittedRPS/c.OfferedRPS)*100, c.AdmittedRPS, c.OfferedRPS))
		}
	}
	if len(r.HotKeys) > 0 && r.References > 0 {
		h := r.HotKeys[0]
		if share := float64(h.Count) / float64(r.References); share > 0.1 {
			out = append(out, fmt.Sprintf("Key %q alone is %.0f%% of traffic: a hot spot worth a dedicated cache entry.", h.Key, share*100))
		}
	}
	return out
}
