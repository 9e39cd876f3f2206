package e2e

import (
	"encoding/json"
	"fmt"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/knhk/knhk/internal/harness"
)

// userVersions sends one request per user and returns the version each got,
// checking that the response header names the upstream that answered.
func userVersions(t *testing.T, s *harness.Stack, users []string, extra map[string]string) map[string]string {
	t.Helper()
	var mu sync.Mutex
	got := make(map[string]string, len(users))
	err := parallel(len(users), 32, func(i int) error {
		h := map[string]string{"x-user-id": users[i]}
		for k, v := range extra {
			h[k] = v
		}
		r, err := get(s.URL+"/", h)
		if err != nil {
			return err
		}
		if r.status != http.StatusOK {
			return fmt.Errorf("user %s: status %d", users[i], r.status)
		}
		if r.version != r.body {
			return fmt.Errorf("user %s: x-knhk-version %q but served by %q", users[i], r.version, r.body)
		}
		mu.Lock()
		got[users[i]] = r.body
		mu.Unlock()
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return got
}

func users(prefix string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("%s-%d", prefix, i)
	}
	return out
}

func TestCanaryShareThroughEnvoy(t *testing.T) {
	s := startStack(t, harness.StackOptions{Weight: 20, Salt: "checkout-v2"})
	us := users("share", 10000)
	userVersions(t, s, us, nil)
	st, ca := s.Stable.Count(), s.Canary.Count()
	if st+ca != int64(len(us)) {
		t.Fatalf("upstreams saw %d requests, sent %d", st+ca, len(us))
	}
	share := float64(ca) / float64(st+ca) * 100
	t.Logf("canary share measured at the upstreams: %.2f%% (stable %d, canary %d)", share, st, ca)
	if share < 18.5 || share > 21.5 {
		t.Fatalf("canary share %.2f%% outside 20 ± 1.5%%", share)
	}
}

func TestStickyAcrossRepeats(t *testing.T) {
	s := startStack(t, harness.StackOptions{Weight: 20})
	us := users("sticky", 500)
	first := userVersions(t, s, us, nil)
	for round := 1; round < 5; round++ {
		again := userVersions(t, s, us, nil)
		for _, u := range us {
			if again[u] != first[u] {
				t.Fatalf("round %d: user %s moved from %s to %s", round, u, first[u], again[u])
			}
		}
	}
	if s.Canary.Count() == 0 || s.Stable.Count() == 0 {
		t.Fatalf("one version got no traffic: stable %d canary %d", s.Stable.Count(), s.Canary.Count())
	}
}

func TestWeightRaiseKeepsCanaryUsers(t *testing.T) {
	s := startStack(t, harness.StackOptions{Weight: 20})
	us := users("raise", 2000)
	before := userVersions(t, s, us, nil)

	cfg := s.Knhk.Config
	cfg.Canary.Weight = 50
	if err := s.Knhk.Reload(cfg); err != nil {
		t.Fatal(err)
	}
	err := harness.Poll(10*time.Second, 25*time.Millisecond, func() error {
		resp, err := client.Get(s.Knhk.AdminURL() + "/v1/canary")
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		var v struct{ Weight float64 }
		if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
			return err
		}
		if v.Weight != 50 {
			return fmt.Errorf("weight still %v", v.Weight)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	s.Stable.Reset()
	s.Canary.Reset()
	after := userVersions(t, s, us, nil)
	for _, u := range us {
		if before[u] == "canary" && after[u] != "canary" {
			t.Fatalf("user %s was on canary at 20%% and is on %s at 50%%", u, after[u])
		}
	}
	share := float64(s.Canary.Count()) / float64(len(us)) * 100
	if share < 46 || share > 54 {
		t.Fatalf("canary share after raise %.1f%%, want about 50%%", share)
	}
}

func TestClientCannotPickVersion(t *testing.T) {
	s := startStack(t, harness.StackOptions{Weight: 20})
	us := users("forge", 200)
	honest := userVersions(t, s, us, nil)
	forged := userVersions(t, s, us, map[string]string{
		"x-knhk-version":   "canary",
		"x-knhk-flags":     "admin",
		"x-knhk-slo-class": "R1",
		"x-knhk-receipt":   "forged",
	})
	stableUsers := 0
	for _, u := range us {
		if honest[u] == "stable" {
			stableUsers++
			if forged[u] != "stable" {
				t.Fatalf("user %s hashes to stable but x-knhk-version: canary got %s", u, forged[u])
			}
		}
	}
	if stableUsers == 0 {
		t.Fatal("no user hashed to stable; the test proves nothing")
	}
	r, err := get(s.URL+"/", map[string]string{"x-user-id": "forger", "x-knhk-slo-class": "R1"})
	if err != nil {
		t.Fatal(err)
	}
	if saw := r.header.Get("x-upstream-saw-class"); saw != "W1" {
		t.Fatalf("upstream saw x-knhk-slo-class %q, want knhk's W1 (the default), not the client's R1", saw)
	}
	for _, u := range []*harness.Upstream{s.Stable, s.Canary} {
		if l := u.Leaked(); len(l) > 0 {
			t.Fatalf("client x-knhk-* headers reached %s: %v", u.Name, l)
		}
	}
}

func TestNoStickyKeyUsesWeightedClusters(t *testing.T) {
	// Without x-request-id in the list (Envoy always generates one), a
	// request with no x-user-id has no key: Envoy's weighted clusters decide.
	s := startStack(t, harness.StackOptions{Weight: 20, StickyKeys: []string{"header:x-user-id"}})
	const n = 3000
	var mu sync.Mutex
	served := map[string]int{}
	err := parallel(n, 32, func(int) error {
		r, err := get(s.URL+"/", map[string]string{"x-knhk-version": "canary"})
		if err != nil {
			return err
		}
		if r.status != http.StatusOK {
			return fmt.Errorf("status %d", r.status)
		}
		if r.version != r.body {
			return fmt.Errorf("response says %q but %q served it", r.version, r.body)
		}
		if saw := r.header.Get("x-upstream-saw-version"); saw != "" {
			return fmt.Errorf("upstream received x-knhk-version %q for a request without a sticky key", saw)
		}
		mu.Lock()
		served[r.body]++
		mu.Unlock()
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	share := float64(served["canary"]) / n * 100
	t.Logf("weighted clusters: %v (canary %.1f%%)", served, share)
	if share < 17 || share > 23 {
		t.Fatalf("weighted-cluster canary share %.1f%%, want 20 ± 3%%", share)
	}
}
