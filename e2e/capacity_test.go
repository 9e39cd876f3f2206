package e2e

import (
	"encoding/json"
	"fmt"
	"math"
	"strings"
	"testing"

	"github.com/knhk/knhk/internal/harness"
	"github.com/knhk/knhk/pkg/capacity"
	"github.com/knhk/knhk/pkg/config"
)

// TestClassesAndCapacityThroughEnvoy: rules and the trusted header pick the
// class upstream; the capacity sketches see the traffic; knhk capacity
// prints them.
func TestClassesAndCapacityThroughEnvoy(t *testing.T) {
	s := startStack(t, harness.StackOptions{Weight: 20, Configure: func(c *config.Config) {
		c.Admission.Rules = []config.ClassRule{{Class: "R1", PathPrefix: "/r1"}, {Class: "C1", PathRegex: "^/batch/"}}
		c.Admission.TrustedHeader = "x-knhk-slo-class"
	}})
	cases := []struct {
		path, header, want string
	}{
		{"/r1/x", "", "R1"}, {"/batch/1", "", "C1"}, {"/other", "", "W1"},
		{"/other", "C1", "C1"}, // the trusted header chooses
		{"/r1/x", "bogus", "R1"},
	}
	for _, c := range cases {
		h := map[string]string{"x-user-id": "u1"}
		if c.header != "" {
			h["x-knhk-slo-class"] = c.header
		}
		r, err := get(s.URL+c.path, h)
		if err != nil {
			t.Fatal(err)
		}
		if saw := r.header.Get("x-upstream-saw-class"); saw != c.want {
			t.Fatalf("%s with class header %q: upstream saw %q, want %q", c.path, c.header, saw, c.want)
		}
	}

	const distinct = 3000
	err := parallel(distinct+2000, 32, func(i int) error {
		path := "/hot"
		if i < distinct {
			path = fmt.Sprintf("/item/%d", i)
		}
		_, err := get(s.URL+path, map[string]string{"x-user-id": "u"})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	resp, err := client.Get(s.Knhk.AdminURL() + "/v1/capacity")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var rep capacity.Report
	if err := json.NewDecoder(resp.Body).Decode(&rep); err != nil {
		t.Fatal(err)
	}
	// 3,000 items + /hot + the 3 class paths above.
	if e := math.Abs(float64(rep.DistinctKeys)-(distinct+4)) / distinct; e > 0.03 {
		t.Fatalf("distinct keys %d, want about %d", rep.DistinctKeys, distinct+4)
	}
	if len(rep.HotKeys) == 0 || rep.HotKeys[0].Key != "/hot" {
		t.Fatalf("hot keys %+v, want /hot first", rep.HotKeys)
	}
	out, err := runCmd(binDir+"/knhk", "capacity", "--admin", s.Knhk.AdminURL())
	if err != nil || !strings.Contains(out, "distinct keys") || !strings.Contains(out, "/hot") || !strings.Contains(out, "recommendations") {
		t.Fatalf("knhk capacity: %v\n%s", err, out)
	}
}
