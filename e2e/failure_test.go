package e2e

import (
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/knhk/knhk/internal/harness"
	"github.com/knhk/knhk/xds"
)

// TestKnhkDownFailureMode runs two Envoys against one knhk — one failing
// open, one failing closed — and stops knhk.
func TestKnhkDownFailureMode(t *testing.T) {
	lg := logs(t)
	s := startStack(t, harness.StackOptions{Weight: 20, FailureModeAllow: true, Logs: lg})
	ports, err := harness.FreePorts(2)
	if err != nil {
		t.Fatal(err)
	}
	closedURL := "http://127.0.0.1:" + strconv.Itoa(ports[0])
	closed, err := harness.StartEnvoyFor(binDir, s.Opts.Dir, "envoy-closed", s.Knhk.ConfigPath, ports[1], lg,
		"--failure-mode-allow=false", "--listener-port", strconv.Itoa(ports[0]), "--admin-port", strconv.Itoa(ports[1]))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = closed.Stop() })

	for _, url := range []string{s.URL, closedURL} {
		r, err := get(url+"/", map[string]string{"x-user-id": "u1"})
		if err != nil || r.status != http.StatusOK || r.version == "" {
			t.Fatalf("%s before stop: %+v %v", url, r, err)
		}
	}
	// knhk's xDS view lists both Envoys, by node id, each on the latest routes.
	err = harness.Poll(10*time.Second, 50*time.Millisecond, func() error {
		var st xds.Status
		if err := harness.GetJSON(s.Knhk.AdminURL()+"/v1/xds", &st); err != nil {
			return err
		}
		var nodes []string
		for _, e := range st.Envoys {
			if e.AckedRouteVersion != st.Version || len(e.NACKs) > 0 {
				return fmt.Errorf("envoy %s: %+v, version %d", e.Node, e, st.Version)
			}
			nodes = append(nodes, e.Node)
		}
		if !slices.Equal(nodes, []string{"envoy", "envoy-closed"}) || st.AckedVersion != st.Version {
			return fmt.Errorf("/v1/xds: %+v", st)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}

	if err := s.Knhk.Stop(10 * time.Second); err != nil {
		t.Fatalf("knhk did not exit 0 on SIGTERM: %v", err)
	}

	for i := range 50 {
		user := map[string]string{"x-user-id": "u" + strconv.Itoa(i)}
		r, err := get(s.URL+"/", user)
		if err != nil {
			t.Fatal(err)
		}
		if r.status != http.StatusOK {
			t.Fatalf("failure_mode_allow: true, knhk down: status %d, want 200", r.status)
		}
		if r.body != "stable" && r.body != "canary" {
			t.Fatalf("fail-open response not from an upstream: %q", r.body)
		}
		r, err = get(closedURL+"/", user)
		if err != nil {
			t.Fatal(err)
		}
		if r.status < 500 {
			t.Fatalf("failure_mode_allow: false, knhk down: status %d, want 5xx", r.status)
		}
	}
}

// TestFailOpenIgnoresAForgedVersionHeader: with knhk down and Envoy failing
// open, a client that hashes to stable and sends x-knhk-version: canary is
// not sent to the canary by that header: the bootstrap's header_mutation
// filter strips it before ext_proc, so the request takes weighted_clusters
// like any other fail-open request. (Without knhk, Envoy cannot hash the
// sticky key, so such a user lands on the canary with the rollout's weight,
// never because of the header.)
func TestFailOpenIgnoresAForgedVersionHeader(t *testing.T) {
	s := startStack(t, harness.StackOptions{Weight: 20, FailureModeAllow: true})
	var stableUsers []string
	for u, v := range userVersions(t, s, users("forge-open", 1000), nil) {
		if v == "stable" {
			stableUsers = append(stableUsers, u)
		}
	}
	if len(stableUsers) < 400 {
		t.Fatalf("only %d of 1000 users hash to stable at 20%%", len(stableUsers))
	}
	stableUsers = stableUsers[:400]
	if err := s.Knhk.Stop(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	canary := 0
	for _, u := range stableUsers {
		r, err := get(s.URL+"/", map[string]string{"x-user-id": u, "x-knhk-version": "canary"})
		if err != nil {
			t.Fatal(err)
		}
		if r.status != http.StatusOK {
			t.Fatalf("knhk down, failing open: status %d, want 200", r.status)
		}
		if saw := r.header.Get("x-upstream-saw-version"); saw != "" {
			t.Fatalf("user %s: the client's x-knhk-version %q reached %s", u, saw, r.body)
		}
		if r.body == "canary" {
			canary++
		}
	}
	// All 400 would be canary if the header routed them; weighted_clusters
	// at 20 % gives 80 ± 8 (σ); 40 % is far from both.
	share := float64(canary) / float64(len(stableUsers)) * 100
	t.Logf("stable users with a forged canary header, knhk down: %.1f%% on canary", share)
	if share > 40 {
		t.Fatalf("%.1f%% of stable users with x-knhk-version: canary reached the canary; want the weighted split (20%%)", share)
	}
}
