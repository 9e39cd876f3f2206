package config

import (
	"testing"
	"time"
)

func TestRetentionKeepBodiesFor(t *testing.T) {
	for _, c := range []struct {
		yaml string
		want time.Duration
	}{
		{"", 0}, // the default keeps bodies for ever
		{"receipts:\n  retention:\n    keep_bodies_for: 0s\n", 0},
		{"receipts:\n  retention:\n    keep_bodies_for: 720h\n", 720 * time.Hour},
		{"receipts:\n  retention: {keep_bodies_for: 1h}\n", time.Hour},
	} {
		cfg, err := Parse("r.yaml", []byte(c.yaml))
		if err != nil {
			t.Fatalf("%q: %v", c.yaml, err)
		}
		if got := cfg.Receipts.ServiceConfig("h").KeepBodiesFor; got != c.want {
			t.Errorf("%q: keep bodies for %s, want %s", c.yaml, got, c.want)
		}
	}
	expectErrors(t, "r.yaml", []errCase{
		{"receipts:\n  retention:\n    keep_bodies_for: 30m\n", "config r.yaml: receipts.retention.keep_bodies_for: 30m0s: 0 (keep for ever) or at least 1h0m0s"},
		{"receipts:\n  retention:\n    keep_bodies_for: -1h\n", "receipts.retention.keep_bodies_for: -1h0m0s: 0 (keep for ever) or at least 1h0m0s"},
		{"receipts:\n  retention:\n    keep_bodies_for: forever\n", `receipts.retention.keep_bodies_for: want a duration`},
		{"receipts:\n  retention:\n    keep_for: 1h\n", "receipts.retention.keep_for"},
	})
}
