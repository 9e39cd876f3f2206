package promotion

import (
	"math"
	"sync"
	"time"

	"github.com/knhk/knhk/pkg/canary"
)

// Latency histogram: log-spaced buckets from 100 µs to ~10 min, 8 % wide,
// so a p99 read from merged buckets is within 4 % of the true value.
const (
	histMin    = 100 * time.Microsecond
	histGrowth = 1.08
	histSize   = 205
)

var histLogGrowth = math.Log(histGrowth)

func histIndex(d time.Duration) int {
	if d <= histMin {
		return 0
	}
	i := int(math.Log(float64(d)/float64(histMin))/histLogGrowth) + 1
	return min(i, histSize-1)
}

// histUpper is the upper bound of bucket i, the value a percentile reports.
func histUpper(i int) time.Duration {
	return time.Duration(float64(histMin) * math.Pow(histGrowth, float64(i)))
}

// second is one second of observations for one version.
type second struct {
	unix     int64
	requests uint32
	errors   uint32
	hist     [histSize]uint32
}

// series is a ring of per-second buckets for one version.
type series struct {
	mu   sync.Mutex
	ring []second
}

func (s *series) slot(unix int64) *second {
	b := &s.ring[int(unix%int64(len(s.ring)))]
	if b.unix != unix {
		*b = second{unix: unix}
	}
	return b
}

// Window keeps the last span of observations per version, by second. Memory
// is fixed: two versions × span seconds × one histogram.
type Window struct {
	span   int
	series [3]series // indexed by canary.Version; None is not recorded
}

// NewWindow keeps span of history (at least 1 s).
func NewWindow(span time.Duration) *Window {
	n := max(1, int(span/time.Second)) + 1 // +1: the current, partial second
	w := &Window{span: n}
	for i := range w.series {
		w.series[i].ring = make([]second, n)
	}
	return w
}

// Observe records one finished request.
func (w *Window) Observe(now time.Time, v canary.Version, failed bool, latency time.Duration) {
	if v != canary.Stable && v != canary.Canary {
		return
	}
	s := &w.series[v]
	s.mu.Lock()
	b := s.slot(now.Unix())
	b.requests++
	if failed {
		b.errors++
	}
	b.hist[histIndex(latency)]++
	s.mu.Unlock()
}

// Stats are one version's figures over a window.
type Stats struct {
	Requests uint64        `json:"requests"`
	Errors   uint64        `json:"errors"`
	P99      time.Duration `json:"-"`
	P99Ms    float64       `json:"p99_ms"`
}

// ErrorRate is errors ÷ requests (0 without requests).
func (s Stats) ErrorRate() float64 {
	if s.Requests == 0 {
		return 0
	}
	return float64(s.Errors) / float64(s.Requests)
}

// Stats returns v's figures over the last d (capped at the window's span).
func (w *Window) Stats(now time.Time, v canary.Version, d time.Duration) Stats {
	if v != canary.Stable && v != canary.Canary {
		return Stats{}
	}
	secs := min(max(1, int64(d/time.Second)), int64(w.span))
	from := now.Unix() - secs + 1
	var st Stats
	var hist [histSize]uint64
	s := &w.series[v]
	s.mu.Lock()
	for i := range s.ring {
		b := &s.ring[i]
		if b.unix < from || b.unix > now.Unix() {
			continue
		}
		st.Requests += uint64(b.requests)
		st.Errors += uint64(b.errors)
		for j, c := range b.hist {
			hist[j] += uint64(c)
		}
	}
	s.mu.Unlock()
	if st.Requests > 0 {
		rank := uint64(math.Ceil(0.99 * float64(st.Requests)))
		var seen uint64
		for j, c := range hist {
			seen += c
			if seen >= rank {
				st.P99 = histUpper(j)
				break
			}
		}
		st.P99Ms = float64(st.P99) / float64(time.Millisecond)
	}
	return st
}
