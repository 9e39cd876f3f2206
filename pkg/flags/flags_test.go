package flags

import (
	"strconv"
	"strings"
	"testing"

	"github.com/knhk/knhk/pkg/canary"
)

func pct(f float64) *float64 { return &f }

func TestEnvironmentAndVersion(t *testing.T) {
	fs := []Flag{
		{Name: "new-checkout", Environments: map[string]bool{"staging": true, "production": false}, Versions: map[string]bool{"canary": true}},
		{Name: "dark-mode", Default: true},
		{Name: "beta", Environments: map[string]bool{"staging": true}},
	}
	prod, err := New("production", fs)
	if err != nil {
		t.Fatal(err)
	}
	if got := prod.Header(canary.Stable, "", false); got != "dark-mode" {
		t.Fatalf("production stable: %q", got)
	}
	if got := prod.Header(canary.Canary, "", false); got != "dark-mode,new-checkout" {
		t.Fatalf("production canary: %q", got)
	}
	staging, _ := New("staging", fs)
	if got := staging.Header(canary.Stable, "", false); got != "beta,dark-mode,new-checkout" {
		t.Fatalf("staging stable: %q", got)
	}
}

func TestPercentRolloutIsStickyAndSized(t *testing.T) {
	s, err := New("production", []Flag{{Name: "x", Default: true, Percent: pct(30)}})
	if err != nil {
		t.Fatal(err)
	}
	on := 0
	for i := range 20000 {
		k := "u" + strconv.Itoa(i)
		h := s.Header(canary.Stable, k, true)
		if h != s.Header(canary.Stable, k, true) {
			t.Fatal("not sticky")
		}
		if h == "x" {
			on++
		}
	}
	if share := float64(on) / 200; share < 28.5 || share > 31.5 {
		t.Fatalf("share %.1f%%, want 30 ± 1.5", share)
	}
	if s.Header(canary.Stable, "", false) != "" {
		t.Fatal("partial rollout enabled without a sticky key")
	}
	// The default salt is the flag name: reproducible, and unlike the canary's salt.
	split, _ := canary.NewSplitter("x", 30)
	same := 0
	for i := range 1000 {
		k := "u" + strconv.Itoa(i)
		if (split.Decide(k) == canary.Canary) == (s.Header(canary.Stable, k, true) == "x") {
			same++
		}
	}
	if same != 1000 {
		t.Fatal("default salt should be the flag name (documented); test setup wrong")
	}
}

func TestBadFlags(t *testing.T) {
	cases := map[string][]Flag{
		"environment": {{Name: "a", Environments: map[string]bool{"prod": true}}},
		"version":     {{Name: "a", Versions: map[string]bool{"blue": true}}},
		"names":       {{Name: "Bad Name"}},
		"percent":     {{Name: "a", Percent: pct(120)}},
	}
	for want, fs := range cases {
		if _, err := New("production", fs); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v", want, err)
		}
	}
	if _, err := New("qa", nil); err == nil {
		t.Fatal("unknown environment accepted")
	}
}

func BenchmarkHeaderStatic(b *testing.B) {
	s, _ := New("production", []Flag{{Name: "a", Default: true}, {Name: "b", Versions: map[string]bool{"canary": true}}})
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		_ = s.Header(canary.Canary, "k", true)
	}
}
