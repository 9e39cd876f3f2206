package canary

import (
	"strconv"

	"github.com/cespare/xxhash/v2"
	"testing"
)

func keys(n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = "user-" + strconv.Itoa(i)
	}
	return out
}

func mustSplitter(t testing.TB, salt string, w float64) *Splitter {
	t.Helper()
	s, err := NewSplitter(salt, w)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestDeterministic(t *testing.T) {
	a := mustSplitter(t, "checkout-v2", 20)
	b := mustSplitter(t, "checkout-v2", 20)
	for _, k := range keys(10000) {
		if a.Decide(k) != b.Decide(k) || a.Bucket(k) != b.Bucket(k) {
			t.Fatalf("key %q decided differently", k)
		}
	}
}

func TestBucketIsXXHashOfSaltAndKey(t *testing.T) {
	// Pin the contract: bucket = xxhash64(salt ‖ key) mod 10000, so other
	// implementations (and Envoy-side tooling) can reproduce the split.
	s := mustSplitter(t, "salt", 0)
	got := s.Bucket("key")
	ref := uint32(xxhash.Sum64String("saltkey") % Buckets)
	if got != ref {
		t.Fatalf("salt and key are not hashed as one string: %d != %d", got, ref)
	}
}

func TestMonotonic(t *testing.T) {
	s := mustSplitter(t, "checkout-v2", 0)
	ks := keys(20000)
	onCanary := make([]bool, len(ks))
	for w := 0.0; w <= 100; w += 0.5 {
		if err := s.SetWeight(w); err != nil {
			t.Fatal(err)
		}
		for i, k := range ks {
			c := s.Decide(k) == Canary
			if onCanary[i] && !c {
				t.Fatalf("weight %v moved key %q from canary back to stable", w, k)
			}
			onCanary[i] = c
		}
	}
	for i, c := range onCanary {
		if !c {
			t.Fatalf("key %q not on canary at weight 100", ks[i])
		}
	}
}

func TestShareAndUniformity(t *testing.T) {
	ks := keys(100000)
	for _, w := range []float64{1, 5, 20, 33.33, 50, 99.5} {
		s := mustSplitter(t, "checkout-v2", w)
		n := 0
		for _, k := range ks {
			if s.Decide(k) == Canary {
				n++
			}
		}
		share := float64(n) / float64(len(ks)) * 100
		if share < w-1 || share > w+1 {
			t.Errorf("weight %v: canary share %.3f%% outside ±1%%", w, share)
		}
	}
	// Chi-square over 100 equal groups of buckets: expected 1000 keys each,
	// 99 degrees of freedom, critical value 148.23 at p = 0.001.
	s := mustSplitter(t, "checkout-v2", 0)
	var groups [100]int
	for _, k := range ks {
		groups[s.Bucket(k)/100]++
	}
	chi := 0.0
	for _, o := range groups {
		d := float64(o) - 1000
		chi += d * d / 1000
	}
	if chi > 148.23 {
		t.Fatalf("buckets not uniform: chi-square %.1f > 148.23 (df 99, p 0.001)", chi)
	}
}

func TestSaltsIndependent(t *testing.T) {
	a := mustSplitter(t, "salt-a", 50)
	b := mustSplitter(t, "salt-b", 50)
	var table [2][2]float64
	ks := keys(100000)
	for _, k := range ks {
		i, j := 0, 0
		if a.Decide(k) == Canary {
			i = 1
		}
		if b.Decide(k) == Canary {
			j = 1
		}
		table[i][j]++
	}
	// 2×2 contingency chi-square, 1 degree of freedom, critical 10.83 at p 0.001.
	n := float64(len(ks))
	chi := 0.0
	for i := 0; i < 2; i++ {
		for j := 0; j < 2; j++ {
			row := table[i][0] + table[i][1]
			col := table[0][j] + table[1][j]
			exp := row * col / n
			d := table[i][j] - exp
			chi += d * d / exp
		}
	}
	if chi > 10.83 {
		t.Fatalf("salts are correlated: chi-square %.2f > 10.83; table %v", chi, table)
	}
	same := 0
	for _, k := range ks[:1000] {
		if a.Bucket(k) == b.Bucket(k) {
			same++
		}
	}
	if same > 5 {
		t.Fatalf("%d of 1000 keys share a bucket across salts", same)
	}
}

func TestWeightBounds(t *testing.T) {
	for _, w := range []float64{-0.01, 100.01} {
		if _, err := NewSplitter("s", w); err == nil {
			t.Errorf("weight %v accepted", w)
		}
	}
	s := mustSplitter(t, "s", 12.345)
	if s.CanaryBuckets() != 1235 {
		t.Fatalf("12.345%% → %d buckets, want 1235", s.CanaryBuckets())
	}
	if err := s.SetWeight(101); err == nil || s.CanaryBuckets() != 1235 {
		t.Fatal("invalid SetWeight changed the weight or was accepted")
	}
}

func BenchmarkDecide(b *testing.B) {
	s := mustSplitter(b, "checkout-v2", 20)
	ks := keys(1024)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		_ = s.Decide(ks[i&1023])
	}
}
