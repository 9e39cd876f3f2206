package capacity

import (
	"math"
	"math/rand/v2"
	"sort"
	"strconv"
	"testing"
	"time"

	"github.com/axiomhq/hyperloglog"
	"github.com/cespare/xxhash/v2"

	"github.com/knhk/knhk/pkg/admission"
)

func TestHyperLogLogWithinTwoPercentAtOneMillion(t *testing.T) {
	tr := NewTracker(Config{})
	now := time.Unix(1000, 0)
	const n = 1_000_000
	for i := range n {
		tr.Observe("key-"+strconv.Itoa(i), now)
	}
	got := tr.Report(now, 0, 0).DistinctKeys
	if e := math.Abs(float64(got)-n) / n; e > 0.02 {
		t.Fatalf("distinct estimate %d, error %.2f%% > 2%%", got, e*100)
	}
	_, _, tracked := tr.mrc.Stats()
	if tracked > tr.cfg.MRCKeys {
		t.Fatalf("MRC tracks %d keys, bound %d", tracked, tr.cfg.MRCKeys)
	}
	if len(tr.top.index) > tr.cfg.TopK {
		t.Fatalf("top-K holds %d keys", len(tr.top.index))
	}
}

// zipf draws keys 0..n-1 with P(k) ∝ 1/(k+1)^s (any s > 0, unlike math/rand's).
type zipf struct {
	cdf []float64
	r   *rand.Rand
}

func newZipf(n int, s float64, seed uint64) *zipf {
	z := &zipf{cdf: make([]float64, n), r: rand.New(rand.NewPCG(seed, 1))}
	sum := 0.0
	for k := range n {
		sum += 1 / math.Pow(float64(k+1), s)
		z.cdf[k] = sum
	}
	for k := range z.cdf {
		z.cdf[k] /= sum
	}
	return z
}

func (z *zipf) next() int { return sort.SearchFloat64s(z.cdf, z.r.Float64()) }

// exactHitRates simulates LRU exactly (Mattson's stack distances with a
// Fenwick tree) and returns the hit rate at each size.
func exactHitRates(trace []uint64, sizes []int) []float64 {
	last := map[uint64]int64{}
	f := newFenwick(len(trace) + 1)
	hits := make([]int, len(sizes))
	for i, k := range trace {
		t := int64(i + 1)
		if p, ok := last[k]; ok {
			d := f.sum(t-1) - f.sum(p)
			for j, s := range sizes {
				if d < int64(s) {
					hits[j]++
				}
			}
			f.add(p, -1)
		}
		last[k] = t
		f.add(t, 1)
	}
	out := make([]float64, len(sizes))
	for j := range sizes {
		out[j] = float64(hits[j]) / float64(len(trace))
	}
	return out
}

func TestMissRatioCurveMatchesExactLRU(t *testing.T) {
	t.Run("large", func(t *testing.T) {
		mrcAgainstExact(t, 100_000, 1_000_000, []int{1000, 2000, 5000, 10000, 20000, 50000, 100000})
	})
	t.Run("small working set", func(t *testing.T) { // sampled at the initial rate, no eviction
		mrcAgainstExact(t, 2_000, 300_000, []int{20, 50, 100, 200, 500, 1000, 2000})
	})
}

func mrcAgainstExact(t *testing.T, keys, refs int, sizes []int) {
	for _, s := range []float64{0.8, 1.0, 1.2} {
		z := newZipf(keys, s, uint64(s*10))
		trace := make([]uint64, refs)
		m := NewMRC(16384) // the tracker's default
		for i := range trace {
			trace[i] = xxhash.Sum64String("k" + strconv.Itoa(z.next()))
			m.Access(trace[i])
		}
		exact := exactHitRates(trace, sizes)
		worst := 0.0
		for j, size := range sizes {
			est := m.HitRate(float64(size))
			worst = math.Max(worst, math.Abs(est-exact[j]))
			if math.Abs(est-exact[j]) > 0.02 {
				t.Errorf("zipf s=%.1f, cache %d: SHARDS hit rate %.4f, exact %.4f (error %.4f > 0.02)", s, size, est, exact[j], math.Abs(est-exact[j]))
			}
		}
		_, rate, tracked := m.Stats()
		t.Logf("zipf s=%.1f: worst abs error %.4f over sizes %v (sampling rate %.3f, %d keys tracked)", s, worst, sizes, rate, tracked)
	}
}

func TestTopKFindsHeavyHitters(t *testing.T) {
	tk := NewTopK(50) // the tracker's default
	z := newZipf(10000, 1.2, 3)
	exact := map[string]uint64{}
	const n = 200000
	for range n {
		k := "k" + strconv.Itoa(z.next())
		exact[k]++
		tk.Add(k)
	}
	top := tk.Top(10)
	for i := range 3 { // the heaviest keys, in order
		if want := "k" + strconv.Itoa(i); top[i].Key != want {
			t.Fatalf("top[%d] = %s, want %s (%v)", i, top[i].Key, want, top)
		}
	}
	for _, it := range top {
		if it.Count < exact[it.Key] || it.Count-it.Error > exact[it.Key] {
			t.Fatalf("%s: count %d − %d does not bound the true %d", it.Key, it.Count, it.Error, exact[it.Key])
		}
	}
	// Space-Saving's guarantee: every key above n/k is kept.
	for k, c := range exact {
		if c > n/50 {
			if _, ok := tk.index[k]; !ok {
				t.Fatalf("%s (%d > n/k) lost", k, c)
			}
		}
	}
}

func TestLoadTrendAndLittlesLaw(t *testing.T) {
	tr := NewTracker(Config{LoadWindow: 60 * time.Second, ClassWindow: 11 * time.Second})
	base := time.Unix(10000, 0)
	// Load rising 10 req/s every second for 60 s.
	for s := range 60 {
		now := base.Add(time.Duration(s) * time.Second)
		for range 100 + 10*s {
			tr.Observe("/x", now)
		}
	}
	now := base.Add(60 * time.Second)
	// R1: 50 req/s offered, all admitted, 20 ms each → 1 in flight needed.
	for s := 49; s < 60; s++ {
		at := base.Add(time.Duration(s) * time.Second)
		for range 50 {
			tr.Offered(admission.R1, true, at)
			tr.Completed(admission.R1, 20*time.Millisecond, at)
		}
	}
	r := tr.Report(now, 4, 2)
	if math.Abs(r.Load.TrendPerMin-600) > 1 {
		t.Fatalf("trend %.1f req/s per minute, want 600", r.Load.TrendPerMin)
	}
	if math.Abs(r.Load.ForecastRPS1h-(100+10*60+36000)) > 20 {
		t.Fatalf("forecast %.0f", r.Load.ForecastRPS1h)
	}
	r1 := r.Classes[0]
	if math.Abs(r1.OfferedRPS-50) > 0.1 || math.Abs(r1.ConcurrencyNeeded-1) > 0.01 {
		t.Fatalf("R1 %+v, want 50 req/s × 20 ms = 1 in flight", r1)
	}
	if len(r.Recommendations) == 0 {
		t.Fatal("no recommendations")
	}
}

// BenchmarkObserve: the per-request sketch update. "large" is a key space
// far above the MRC's 16,384 sampled keys (SHARDS samples ~1 in 6); "small"
// is a working set the MRC tracks exactly (every request sampled).
func BenchmarkObserve(b *testing.B) {
	for _, bc := range []struct {
		name  string
		space int
	}{{"large", 1_000_000}, {"small", 4096}} {
		b.Run(bc.name, func(b *testing.B) {
			tr := NewTracker(Config{})
			z := newZipf(bc.space, 0.8, 9)
			keys := make([]string, 1<<16)
			for i := range keys {
				keys[i] = "/api/item/" + strconv.Itoa(z.next())
			}
			now := time.Unix(1, 0)
			for i := range 1 << 20 { // warm: let SHARDS settle its rate
				tr.Observe(keys[i&(1<<16-1)], now)
			}
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				tr.Observe(keys[i&(1<<16-1)], now)
			}
		})
	}
}

var _ = hyperloglog.New14

func TestFreshTrackerReportsNoTrendAndTrueRates(t *testing.T) {
	tr := NewTracker(Config{})
	base := time.Unix(20000, 0)
	for s := range 10 { // ten seconds of a ramp at start-up
		at := base.Add(time.Duration(s) * time.Second)
		for range 100 * (s + 1) {
			tr.Observe("/x", at)
			tr.Offered(admission.W1, true, at)
		}
	}
	r := tr.Report(base.Add(10*time.Second), 0, 0)
	if r.Load.TrendPerMin != 0 || r.Load.ForecastRPS1h != 0 {
		t.Fatalf("a 10 s start-up ramp reported as a trend: %+v", r.Load)
	}
	if r.Load.WindowSeconds != 10 {
		t.Fatalf("history %v s, want 10", r.Load.WindowSeconds)
	}
	// 100+200+…+1000 = 5,500 requests over 10 s, not over the 60 s window.
	if w1 := r.Classes[1].OfferedRPS; math.Abs(w1-550) > 1 {
		t.Fatalf("W1 offered %.1f/s, want 550", w1)
	}
}
