package capacity

import "container/heap"

// TopK is the Space-Saving summary (Metwally et al.): k counters find the
// heavy hitters of a stream in O(k) memory; a key's count is overestimated
// by at most its Error.
type TopK struct {
	k     int
	index map[string]*counter
	h     counterHeap // min-heap by count
}

type counter struct {
	key   string
	count uint64
	err   uint64
	pos   int
}

// NewTopK keeps k counters.
func NewTopK(k int) *TopK {
	return &TopK{k: k, index: make(map[string]*counter, k)}
}

// Add counts one occurrence of key.
func (t *TopK) Add(key string) {
	if c, ok := t.index[key]; ok {
		c.count++
		t.h.down(c.pos) // counts only grow: sift towards the leaves
		return
	}
	if len(t.h) < t.k {
		c := &counter{key: key, count: 1}
		t.index[key] = c
		heap.Push(&t.h, c)
		return
	}
	// Replace the minimum: the newcomer inherits its count as error bound.
	m := t.h[0]
	delete(t.index, m.key)
	m.key, m.err = key, m.count
	m.count++
	t.index[key] = m
	t.h.down(0)
}

// Item is one heavy hitter.
type Item struct {
	Key   string `json:"key"`
	Count uint64 `json:"count"`
	Error uint64 `json:"max_overcount"`
}

// Top returns up to n items, highest count first.
func (t *TopK) Top(n int) []Item {
	items := make([]Item, 0, len(t.h))
	for _, c := range t.h {
		items = append(items, Item{Key: c.key, Count: c.count, Error: c.err})
	}
	// sort descending by count
	for i := 1; i < len(items); i++ {
		for j := i; j > 0 && items[j].Count > items[j-1].Count; j-- {
			items[j], items[j-1] = items[j-1], items[j]
		}
	}
	return items[:min(n, len(items))]
}

type counterHeap []*counter

// down restores the heap below i without interface calls: the hot path.
func (h counterHeap) down(i int) {
	n := len(h)
	for {
		l := 2*i + 1
		if l >= n {
			return
		}
		j := l
		if r := l + 1; r < n && h[r].count < h[l].count {
			j = r
		}
		if h[j].count >= h[i].count {
			return
		}
		h[i], h[j] = h[j], h[i]
		h[i].pos, h[j].pos = i, j
		i = j
	}
}

func (h counterHeap) Len() int           { return len(h) }
func (h counterHeap) Less(i, j int) bool { return h[i].count < h[j].count }
func (h counterHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].pos, h[j].pos = i, j
}
func (h *counterHeap) Push(x any) {
	c := x.(*counter)
	c.pos = len(*h)
	*h = append(*h, c)
}
func (h *counterHeap) Pop() any {
	old := *h
	c := old[len(old)-1]
	*h = old[:len(old)-1]
	return c
}
