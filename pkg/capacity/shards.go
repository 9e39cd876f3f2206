package capacity

import (
	"container/heap"
	"math"
	"math/bits"
	"sort"
)

// MRC estimates an LRU miss-ratio curve with fixed-size SHARDS
// (Waldspurger et al., FAST '15): only keys whose hash falls under a
// threshold are tracked, their reuse distances are measured exactly among
// the sampled keys and scaled by 1/R. When more than maxKeys keys are
// sampled, the threshold drops (evicting the highest-hash key) so memory
// stays bounded whatever the number of distinct keys.
type MRC struct {
	maxKeys   int
	threshold uint64 // sample iff hash%modulus < threshold
	last      map[uint64]int64
	byHash    hashHeap // max-heap of tracked hashes, to lower the threshold
	tree      fenwick  // 1 at the last-access time of each tracked key
	clock     int64    // sampled-access counter (tree index)
	// hist, sampled and cold are stored divided by scale, so lowering the
	// rate rescales them all by changing one number.
	hist    []float64
	scale   float64
	refs    float64 // all references (sampled or not)
	sampled float64
	cold    float64
}

const (
	modulus = 1 << 24
	// Histogram of scaled reuse distance: log-linear bins (HDR style), 64
	// per power of two, so each is under 1.6 % wide; exact below 128.
	subBits = 6
	numBins = 64 << subBits
)

// NewMRC tracks at most maxKeys sampled keys, starting at sampling rate 1:
// a working set smaller than maxKeys is measured exactly; a larger one
// lowers the rate until maxKeys keys remain.
func NewMRC(maxKeys int) *MRC {
	return &MRC{maxKeys: maxKeys, threshold: modulus, last: make(map[uint64]int64, maxKeys),
		tree: newFenwick(4 * maxKeys), hist: make([]float64, numBins), scale: 1}
}

func (m *MRC) rate() float64 { return float64(m.threshold) / modulus }

// bin maps a scaled distance to its bin without a logarithm.
func bin(d float64) int {
	if d < 1<<(subBits+1) {
		return int(d) // exact for small distances
	}
	x := uint64(d)
	e := bits.Len64(x) - (subBits + 1) // shift that leaves subBits+1 bits
	return min(numBins-1, (e+1)<<subBits|int(x>>e)&(1<<subBits-1))
}

// binUpper is one past the largest scaled distance in bin i.
func binUpper(i int) float64 {
	if i < 1<<(subBits+1) {
		return float64(i + 1)
	}
	e := i>>subBits - 1
	m := uint64(i&(1<<subBits-1)) | 1<<subBits
	return float64((m + 1) << e)
}

// Access records a reference to the key with hash h.
func (m *MRC) Access(h uint64) {
	m.refs++
	r := m.rate()
	if h%modulus >= m.threshold {
		return
	}
	one := 1 / m.scale
	m.sampled += one
	if t, ok := m.last[h]; ok {
		// Distinct sampled keys touched since this key's last access.
		d := float64(m.tree.sum(m.clock) - m.tree.sum(t))
		m.hist[bin(d/r)] += one
		m.tree.add(t, -1)
	} else {
		m.cold += one
		heap.Push(&m.byHash, h)
	}
	m.clock++
	if m.clock >= int64(m.tree.size()) {
		m.compact()
	}
	m.last[h] = m.clock
	m.tree.add(m.clock, 1)
	for len(m.last) > m.maxKeys {
		m.lowerThreshold()
	}
}

// lowerThreshold evicts the highest-hash key and rescales the histogram to
// the new rate, as in fixed-size SHARDS.
func (m *MRC) lowerThreshold() {
	h := heap.Pop(&m.byHash).(uint64)
	old := m.rate()
	m.threshold = h % modulus
	if t, ok := m.last[h]; ok {
		m.tree.add(t, -1)
		delete(m.last, h)
	}
	// Evict every other tracked key at or above the new threshold too.
	for len(m.byHash) > 0 && m.byHash[0]%modulus >= m.threshold {
		x := heap.Pop(&m.byHash).(uint64)
		if t, ok := m.last[x]; ok {
			m.tree.add(t, -1)
			delete(m.last, x)
		}
	}
	m.scale *= m.rate() / old
}

// compact renumbers last-access times 1..n in order, so the Fenwick tree
// stays 4 × maxKeys long however many accesses there are.
func (m *MRC) compact() {
	type kv struct {
		h uint64
		t int64
	}
	all := make([]kv, 0, len(m.last))
	for h, t := range m.last {
		all = append(all, kv{h, t})
	}
	sort.Slice(all, func(i, j int) bool { return all[i].t < all[j].t })
	m.tree = newFenwick(m.tree.size())
	for i, x := range all {
		m.last[x.h] = int64(i + 1)
		m.tree.add(int64(i+1), 1)
	}
	m.clock = int64(len(all))
}

// HitRate estimates the LRU hit rate of a cache holding size keys.
func (m *MRC) HitRate(size float64) float64 {
	if m.sampled == 0 {
		return 0
	}
	// Every count is rescaled to the current rate R, so the trace "should"
	// hold refs × R sampled references. SHARDS-adj: attribute the gap
	// between that and what was sampled to the smallest distances.
	total := m.refs * m.rate()
	hits := total - m.sampled*m.scale
	for i := range m.hist {
		if binUpper(i) > size {
			break
		}
		hits += m.hist[i] * m.scale
	}
	return math.Max(0, math.Min(1, hits/total))
}

// SizeFor returns the smallest cache size (keys) reaching the hit rate, or
// 0 with ok false when no size does (cold misses alone exceed 1 − target).
func (m *MRC) SizeFor(target float64) (float64, bool) {
	if m.sampled == 0 {
		return 0, false
	}
	total := m.refs * m.rate()
	hits := total - m.sampled*m.scale
	for i := range m.hist {
		hits += m.hist[i] * m.scale
		if hits/total >= target {
			return math.Ceil(binUpper(i)), true
		}
	}
	return 0, false
}

// Stats reports the sampling state.
func (m *MRC) Stats() (refs float64, rate float64, tracked int) {
	return m.refs, m.rate(), len(m.last)
}

type fenwick []int32

func newFenwick(n int) fenwick { return make(fenwick, n+1) }

func (f fenwick) size() int { return len(f) - 1 }

func (f fenwick) add(i int64, v int32) {
	for ; int(i) < len(f); i += i & -i {
		f[i] += v
	}
}

func (f fenwick) sum(i int64) int64 {
	var s int64
	for ; i > 0; i -= i & -i {
		s += int64(f[i])
	}
	return s
}

type hashHeap []uint64

func (h hashHeap) Len() int           { return len(h) }
func (h hashHeap) Less(i, j int) bool { return h[i]%modulus > h[j]%modulus }
func (h hashHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *hashHeap) Push(x any)        { *h = append(*h, x.(uint64)) }
func (h *hashHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}
