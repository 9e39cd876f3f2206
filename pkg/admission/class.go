// Package admission decides, per request, whether an upstream has room for
// it: requests are classed R1 (hot path), W1 (interactive) or C1
// (batch/cold), an adaptive concurrency limit is learned from measured
// latency per upstream cluster, and the limit is partitioned by class so the
// most critical class keeps its latency budget under overload.
package admission

import (
	"fmt"
	"regexp"
	"slices"
	"strings"
	"time"
)

// Class is an SLO class.
type Class uint8

const (
	R1 Class = iota // hot path: tightest budget
	W1              // interactive
	C1              // batch / cold: deferred, never failed for load
	numClasses
)

// Classes lists every class in priority order.
var Classes = []Class{R1, W1, C1}

func (c Class) String() string {
	switch c {
	case R1:
		return "R1"
	case W1:
		return "W1"
	case C1:
		return "C1"
	}
	return "?"
}

// ParseClass parses "R1", "W1" or "C1" (case-insensitive).
func ParseClass(s string) (Class, error) {
	switch strings.ToUpper(strings.TrimSpace(s)) {
	case "R1":
		return R1, nil
	case "W1":
		return W1, nil
	case "C1":
		return C1, nil
	}
	return 0, fmt.Errorf("unknown class %q: want R1, W1 or C1", s)
}

// Rule maps requests to a class; every set field must match. The first
// matching rule wins.
type Rule struct {
	Class      Class
	PathPrefix string
	PathRegex  string
	Methods    []string // upper case
	Authority  string
	Route      string // Envoy route name (ext_proc request attribute)
	SpiffeID   string // downstream caller (mTLS)

	re *regexp.Regexp
}

// Request is what classification looks at.
type Request struct {
	Method, Path, Authority, Route, SpiffeID string
	// TrustedClass is the value of the trusted class header, if the config
	// declares one and the client sent it.
	TrustedClass string
}

// Classifier applies rules in order.
type Classifier struct {
	rules        []Rule
	defaultClass Class
	trusted      bool
}

// NewClassifier validates the rules: regexes compile, and no rule is
// shadowed by an earlier one (it could never match).
func NewClassifier(rules []Rule, defaultClass Class, trustedHeader bool) (*Classifier, error) {
	c := &Classifier{defaultClass: defaultClass, trusted: trustedHeader}
	for i, r := range rules {
		if r.PathRegex != "" {
			re, err := regexp.Compile(r.PathRegex)
			if err != nil {
				return nil, fmt.Errorf("rules[%d].path_regex: %w", i, err)
			}
			r.re = re
		}
		if r.PathPrefix != "" && !strings.HasPrefix(r.PathPrefix, "/") {
			return nil, fmt.Errorf("rules[%d].path_prefix %q: must start with /", i, r.PathPrefix)
		}
		for j, m := range r.Methods {
			r.Methods[j] = strings.ToUpper(m)
		}
		if r.empty() {
			return nil, fmt.Errorf("rules[%d]: matches everything; set default_class instead", i)
		}
		for j := range c.rules {
			if c.rules[j].covers(&r) {
				verb := "can never match"
				if c.rules[j].Class != r.Class {
					verb = fmt.Sprintf("can never match (it says %s, the earlier rule says %s)", r.Class, c.rules[j].Class)
				}
				return nil, fmt.Errorf("rules[%d] %s: rules[%d] matches every request it does; put the narrower rule first", i, verb, j)
			}
		}
		c.rules = append(c.rules, r)
	}
	return c, nil
}

func (r *Rule) empty() bool {
	return r.PathPrefix == "" && r.PathRegex == "" && len(r.Methods) == 0 && r.Authority == "" && r.Route == "" && r.SpiffeID == ""
}

// covers reports whether every request b matches also matches r. It is
// conservative: a regex on r is treated as not covering anything else.
func (r *Rule) covers(b *Rule) bool {
	if r.PathRegex != "" && r.PathRegex != b.PathRegex {
		return false
	}
	if r.PathPrefix != "" && (b.PathPrefix == "" || !strings.HasPrefix(b.PathPrefix, r.PathPrefix)) {
		return false
	}
	if len(r.Methods) > 0 {
		if len(b.Methods) == 0 {
			return false
		}
		for _, m := range b.Methods {
			if !slices.Contains(r.Methods, m) {
				return false
			}
		}
	}
	eq := func(a, b string) bool { return a == "" || a == b }
	return eq(r.Authority, b.Authority) && eq(r.Route, b.Route) && eq(r.SpiffeID, b.SpiffeID)
}

func (r *Rule) matches(q *Request) bool {
	if r.PathPrefix != "" && !strings.HasPrefix(q.Path, r.PathPrefix) {
		return false
	}
	if r.re != nil && !r.re.MatchString(pathOnly(q.Path)) {
		return false
	}
	if len(r.Methods) > 0 && !slices.Contains(r.Methods, q.Method) {
		return false
	}
	return (r.Authority == "" || r.Authority == q.Authority) &&
		(r.Route == "" || r.Route == q.Route) &&
		(r.SpiffeID == "" || r.SpiffeID == q.SpiffeID)
}

func pathOnly(p string) string {
	if i := strings.IndexByte(p, '?'); i >= 0 {
		return p[:i]
	}
	return p
}

// Classify returns the request's class: the trusted header when declared
// and valid, else the first matching rule, else the default.
func (c *Classifier) Classify(q *Request) Class {
	if c.trusted && q.TrustedClass != "" {
		if cl, err := ParseClass(q.TrustedClass); err == nil {
			return cl
		}
	}
	for i := range c.rules {
		if c.rules[i].matches(q) {
			return c.rules[i].Class
		}
	}
	return c.defaultClass
}

// Budgets are the latency budgets per class.
type Budgets [numClasses]time.Duration

// DefaultBudgets: R1 50 ms, W1 500 ms, C1 24 h.
var DefaultBudgets = Budgets{R1: 50 * time.Millisecond, W1: 500 * time.Millisecond, C1: 24 * time.Hour}
