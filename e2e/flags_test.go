package e2e

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/knhk/knhk/internal/harness"
	"github.com/knhk/knhk/pkg/config"
)

// TestFlagsReachUpstream: flags are evaluated per request by environment
// and version and arrive upstream as x-knhk-flags; a client cannot forge them.
func TestFlagsReachUpstream(t *testing.T) {
	pct := 100.0
	s := startStack(t, harness.StackOptions{Weight: 50, Configure: func(c *config.Config) {
		c.Environment = "staging"
		c.Flags = map[string]config.Flag{
			"new-checkout": {Environments: map[string]bool{"staging": true, "production": false}},
			"canary-only":  {Versions: map[string]bool{"canary": true}},
			"everyone":     {Default: true, Percent: &pct},
			"prod-only":    {Environments: map[string]bool{"production": true}},
		}
	}})
	for _, u := range users("flags", 40) {
		r, err := get(s.URL+"/", map[string]string{"x-user-id": u, "x-knhk-flags": "prod-only"})
		if err != nil || r.status != http.StatusOK {
			t.Fatalf("%v %+v", err, r)
		}
		want := "everyone,new-checkout"
		if r.body == "canary" {
			want = "canary-only,everyone,new-checkout"
		}
		if got := r.header.Get("x-upstream-saw-flags"); got != want {
			t.Fatalf("user %s on %s: upstream saw x-knhk-flags %q, want %q", u, r.body, got, want)
		}
	}
	resp, err := client.Get(s.Knhk.AdminURL() + "/v1/flags")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var v struct {
		Environment string
		Flags       []struct {
			Name   string
			Values map[string]bool
		}
	}
	if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
		t.Fatal(err)
	}
	if v.Environment != "staging" || len(v.Flags) != 4 {
		t.Fatalf("/v1/flags: %+v", v)
	}
	for _, f := range v.Flags {
		if f.Name == "canary-only" && (f.Values["stable"] || !f.Values["canary"]) {
			t.Fatalf("canary-only values %v", f.Values)
		}
		if strings.HasPrefix(f.Name, "prod") && (f.Values["stable"] || f.Values["canary"]) {
			t.Fatalf("prod-only is on in staging: %v", f.Values)
		}
	}
}
