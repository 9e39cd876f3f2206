// Package flags evaluates feature flags per request: a value per
// environment and per version, optionally rolled out to a percentage of
// sticky keys with the same hash as the canary split (its own salt).
package flags

import (
	"fmt"
	"slices"
	"strings"

	"github.com/knhk/knhk/pkg/canary"
)

// Environments a knhk instance can run in.
var Environments = []string{"canary", "staging", "production"}

// Flag is one flag as configured.
type Flag struct {
	Name         string
	Default      bool
	Environments map[string]bool // environment → value
	Versions     map[string]bool // "stable"/"canary" → value (wins over environment)
	Percent      *float64        // when set, on only for this share of sticky keys
	Salt         string          // rollout salt; defaults to the flag name
}

type compiled struct {
	name    string
	byVer   [3]bool // base value per canary.Version (None uses the environment value)
	split   *canary.Splitter
	percent float64
}

// Set is an immutable, validated set of flags for one environment.
type Set struct {
	env   string
	flags []compiled
	// fixed[v] is the header for version v when no flag has a rollout.
	fixed  [3]string
	static bool
}

// New validates and compiles flags for env.
func New(env string, flags []Flag) (*Set, error) {
	if !slices.Contains(Environments, env) {
		return nil, fmt.Errorf("environment %q: want one of %s", env, strings.Join(Environments, ", "))
	}
	s := &Set{env: env, static: true}
	fs := slices.Clone(flags)
	slices.SortFunc(fs, func(a, b Flag) int { return strings.Compare(a.Name, b.Name) })
	for _, f := range fs {
		if !validName(f.Name) {
			return nil, fmt.Errorf("flag %q: names are lower-case letters, digits, '-', '_' and '.' (they travel in a header)", f.Name)
		}
		for e := range f.Environments {
			if !slices.Contains(Environments, e) {
				return nil, fmt.Errorf("flag %q: environments.%s: unknown environment, want one of %s", f.Name, e, strings.Join(Environments, ", "))
			}
		}
		for v := range f.Versions {
			if v != "stable" && v != "canary" {
				return nil, fmt.Errorf("flag %q: versions.%s: unknown version, want stable or canary", f.Name, v)
			}
		}
		c := compiled{name: f.Name}
		base := f.Default
		if v, ok := f.Environments[env]; ok {
			base = v
		}
		c.byVer[canary.None] = base
		for _, v := range []canary.Version{canary.Stable, canary.Canary} {
			c.byVer[v] = base
			if x, ok := f.Versions[v.String()]; ok {
				c.byVer[v] = x
			}
		}
		if f.Percent != nil {
			salt := f.Salt
			if salt == "" {
				salt = f.Name
			}
			sp, err := canary.NewSplitter(salt, *f.Percent)
			if err != nil {
				return nil, fmt.Errorf("flag %q: percent: %w", f.Name, err)
			}
			c.split, c.percent = sp, *f.Percent
			s.static = false
		}
		s.flags = append(s.flags, c)
	}
	for v := range s.fixed {
		s.fixed[v] = s.header(canary.Version(v), "", false)
	}
	return s, nil
}

func validName(n string) bool {
	if n == "" {
		return false
	}
	for _, c := range n {
		lower, digit := c >= 'a' && c <= 'z', c >= '0' && c <= '9'
		if !lower && !digit && c != '-' && c != '_' && c != '.' {
			return false
		}
	}
	return true
}

// Environment returns the set's environment.
func (s *Set) Environment() string { return s.env }

// Header returns the x-knhk-flags value: enabled flag names, sorted, comma
// separated. key is the request's sticky key (hasKey false when none).
func (s *Set) Header(v canary.Version, key string, hasKey bool) string {
	if s.static {
		return s.fixed[v]
	}
	return s.header(v, key, hasKey)
}

func (s *Set) header(v canary.Version, key string, hasKey bool) string {
	var b strings.Builder
	for i := range s.flags {
		if s.flags[i].on(v, key, hasKey) {
			if b.Len() > 0 {
				b.WriteByte(',')
			}
			b.WriteString(s.flags[i].name)
		}
	}
	return b.String()
}

func (c *compiled) on(v canary.Version, key string, hasKey bool) bool {
	if !c.byVer[v] {
		return false
	}
	if c.split == nil {
		return true
	}
	if !hasKey {
		return c.percent >= 100 // a partial rollout needs a key to be sticky
	}
	return c.split.Decide(key) == canary.Canary
}

// View is one flag's current values, for GET /v1/flags.
type View struct {
	Name    string          `json:"name"`
	Values  map[string]bool `json:"values"` // by version, in this environment
	Percent *float64        `json:"percent,omitempty"`
}

// List returns every flag with its value per version.
func (s *Set) List() []View {
	out := make([]View, 0, len(s.flags))
	for _, c := range s.flags {
		v := View{Name: c.name, Values: map[string]bool{"stable": c.byVer[canary.Stable], "canary": c.byVer[canary.Canary]}}
		if c.split != nil {
			p := c.percent
			v.Percent = &p
		}
		out = append(out, v)
	}
	return out
}
