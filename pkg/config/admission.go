package config

import (
	"fmt"
	"math"
	"strings"
	"time"

	"github.com/knhk/knhk/pkg/admission"
	"github.com/knhk/knhk/pkg/capacity"
)

// Admission configures SLO classes and shedding.
type Admission struct {
	Enabled       bool          `yaml:"enabled"`
	Classes       Classes       `yaml:"classes"`
	DefaultClass  string        `yaml:"default_class"`
	Rules         []ClassRule   `yaml:"rules"`
	TrustedHeader string        `yaml:"trusted_class_header"` // a client may pick its class only through this header
	Limiter       LimiterConfig `yaml:"limiter"`
	C1RetryAfter  Duration      `yaml:"c1_retry_after"`
}

// Classes holds each class's settings; a struct, not a map, so setting one
// field of one class keeps the defaults of the rest.
type Classes struct {
	R1 ClassConfig `yaml:"R1"`
	W1 ClassConfig `yaml:"W1"`
	C1 ClassConfig `yaml:"C1"`
}

func (c *Classes) byClass() map[admission.Class]ClassConfig {
	return map[admission.Class]ClassConfig{admission.R1: c.R1, admission.W1: c.W1, admission.C1: c.C1}
}

// ClassConfig is one class's budget and guaranteed share.
type ClassConfig struct {
	Budget Duration `yaml:"budget"`
	Share  float64  `yaml:"share"` // guaranteed fraction of the limit
}

// ClassRule maps requests to a class.
type ClassRule struct {
	Class      string   `yaml:"class"`
	PathPrefix string   `yaml:"path_prefix"`
	PathRegex  string   `yaml:"path_regex"`
	Methods    []string `yaml:"methods"`
	Authority  string   `yaml:"authority"`
	Route      string   `yaml:"route"`
	SpiffeID   string   `yaml:"spiffe_id"`
}

// LimiterConfig bounds the adaptive limit.
type LimiterConfig struct {
	Initial   int      `yaml:"initial"`
	Min       int      `yaml:"min"`
	Max       int      `yaml:"max"`
	Tolerance float64  `yaml:"tolerance"`
	Slack     Duration `yaml:"slack"`
}

// Capacity configures the capacity sketches.
type Capacity struct {
	Key     string `yaml:"key"` // "path", "route" or "header:NAME"
	TopK    int    `yaml:"top_k"`
	MRCKeys int    `yaml:"mrc_keys"`
}

func defaultAdmission() Admission {
	d := admission.DefaultLimiterConfig()
	return Admission{
		Classes: Classes{
			R1: ClassConfig{Budget: Duration(d.Budgets[admission.R1]), Share: d.Shares[admission.R1]},
			W1: ClassConfig{Budget: Duration(d.Budgets[admission.W1]), Share: d.Shares[admission.W1]},
			C1: ClassConfig{Budget: Duration(d.Budgets[admission.C1]), Share: d.Shares[admission.C1]},
		},
		DefaultClass: "W1",
		Limiter:      LimiterConfig{Initial: d.Initial, Min: d.Min, Max: d.Max, Tolerance: d.Tolerance, Slack: Duration(d.Slack)},
		C1RetryAfter: Duration(10 * time.Second),
	}
}

func (a *Admission) validate(fail failFunc) error {
	for cl, c := range a.Classes.byClass() {
		name := cl.String()
		if c.Budget <= 0 {
			return fail("admission.classes."+name+".budget", "must be positive, got %s", c.Budget.D())
		}
		if math.IsNaN(c.Share) || c.Share < 0 || c.Share > 1 {
			return fail("admission.classes."+name+".share", "%v: a fraction from 0 to 1", c.Share)
		}
	}
	sum := 0.0
	for _, c := range a.Classes.byClass() {
		sum += c.Share
	}
	if sum > 1.0001 {
		return fail("admission.classes", "shares add up to %.2f; they are fractions of one limit and must not exceed 1", sum)
	}
	if _, err := admission.ParseClass(a.DefaultClass); err != nil {
		return fail("admission.default_class", "%v", err)
	}
	if h := a.TrustedHeader; h != "" && (strings.ToLower(h) != h || strings.ContainsAny(h, " :")) {
		return fail("admission.trusted_class_header", "%q: a lower-case header name", h)
	}
	l := a.Limiter
	if l.Min < 1 || l.Max < l.Min || l.Initial < l.Min || l.Initial > l.Max {
		return fail("admission.limiter", "need 1 ≤ min ≤ initial ≤ max, got min %d, initial %d, max %d", l.Min, l.Initial, l.Max)
	}
	if l.Slack < 0 {
		return fail("admission.limiter.slack", "must not be negative")
	}
	if math.IsNaN(l.Tolerance) || l.Tolerance < 1 {
		return fail("admission.limiter.tolerance", "%v: at least 1 (1.2 = 20 %% queueing allowed)", l.Tolerance)
	}
	if a.C1RetryAfter.D() < time.Second {
		return fail("admission.c1_retry_after", "%s: at least 1s (Retry-After is in whole seconds)", a.C1RetryAfter.D())
	}
	if _, err := a.Classifier(); err != nil {
		return fail("admission", "%v", err)
	}
	return nil
}

// Classifier builds the rule classifier.
func (a *Admission) Classifier() (*admission.Classifier, error) {
	rules := make([]admission.Rule, 0, len(a.Rules))
	for i, r := range a.Rules {
		c, err := admission.ParseClass(r.Class)
		if err != nil {
			return nil, fmt.Errorf("rules[%d].class: %w", i, err)
		}
		rules = append(rules, admission.Rule{Class: c, PathPrefix: r.PathPrefix, PathRegex: r.PathRegex,
			Methods: append([]string(nil), r.Methods...), Authority: r.Authority, Route: r.Route, SpiffeID: r.SpiffeID})
	}
	def, err := admission.ParseClass(a.DefaultClass)
	if err != nil {
		return nil, err
	}
	return admission.NewClassifier(rules, def, a.TrustedHeader != "")
}

// LimiterConfig converts to pkg/admission's.
func (a *Admission) LimiterConfig() admission.LimiterConfig {
	cfg := admission.LimiterConfig{Initial: a.Limiter.Initial, Min: a.Limiter.Min, Max: a.Limiter.Max,
		Tolerance: a.Limiter.Tolerance, Slack: a.Limiter.Slack.D()}
	for cl, c := range a.Classes.byClass() {
		cfg.Budgets[cl] = c.Budget.D()
		cfg.Shares[cl] = c.Share
	}
	return cfg
}

func (c *Capacity) validate(fail failFunc) error {
	switch {
	case c.Key == "path", c.Key == "route":
	case strings.HasPrefix(c.Key, "header:") && len(c.Key) > len("header:"):
	default:
		return fail("capacity.key", "%q: want path, route or header:NAME", c.Key)
	}
	if c.TopK < 1 || c.TopK > 10000 {
		return fail("capacity.top_k", "%d: 1..10000", c.TopK)
	}
	if c.MRCKeys < 256 || c.MRCKeys > 1<<22 {
		return fail("capacity.mrc_keys", "%d: 256..4194304", c.MRCKeys)
	}
	return nil
}

// CapacityConfig converts to pkg/capacity's.
func (c *Capacity) CapacityConfig() capacity.Config {
	return capacity.Config{TopK: c.TopK, MRCKeys: c.MRCKeys}
}
