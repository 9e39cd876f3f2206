package canary

// Router combines the ordered sticky-key sources with a splitter: it is the
// whole routing decision for one request. A Router is immutable except for
// its weight; a config reload that changes salt or sources builds a new one.
type Router struct {
	sources []Source
	split   *Splitter
}

// NewRouter builds a router. sources must be non-empty.
func NewRouter(salt string, weight float64, sources []Source) (*Router, error) {
	s, err := NewSplitter(salt, weight)
	if err != nil {
		return nil, err
	}
	return &Router{sources: append([]Source(nil), sources...), split: s}, nil
}

// Route returns the version for a request, or None when it carries no key,
// and the sticky key it used.
func Route[H Headers](r *Router, h H) (Version, string) {
	key, ok := StickyKey(r.sources, h)
	if !ok {
		return None, ""
	}
	return r.split.Decide(key), key
}

// Splitter returns the router's splitter (to read or change the weight).
func (r *Router) Splitter() *Splitter { return r.split }
