// Package canary implements the sticky, hash-based split between the stable
// and canary versions: bucket = xxhash64(salt ‖ key) mod 10000, and a key is
// on the canary iff bucket < weight × 100. Because the bucket of a key never
// changes for a given salt, raising the weight only ever moves keys from
// stable to canary, never back.
package canary

import (
	"fmt"
	"math"
	"sync/atomic"

	"github.com/cespare/xxhash/v2"
)

// Version is the version a request is routed to.
type Version uint8

const (
	// None means no sticky key was present: no routing header is set and
	// Envoy's weighted clusters decide.
	None Version = iota
	Stable
	Canary
)

// String returns the value used in the x-knhk-version header and in metrics.
func (v Version) String() string {
	switch v {
	case Stable:
		return "stable"
	case Canary:
		return "canary"
	default:
		return "none"
	}
}

// Buckets is the number of hash buckets; one bucket is 0.01 % of keys.
const Buckets = 10000

// WeightToBuckets converts a percentage (0..100, decimals allowed) to the
// number of buckets on the canary, rounding to the nearest 0.01 %.
func WeightToBuckets(weight float64) (uint32, error) {
	if math.IsNaN(weight) || weight < 0 || weight > 100 {
		return 0, fmt.Errorf("weight must be between 0 and 100, got %v", weight)
	}
	return uint32(math.Round(weight * 100)), nil
}

// Splitter decides the version for a sticky key. It is safe for concurrent
// use; the weight can be changed while requests are being decided.
type Splitter struct {
	seed    xxhash.Digest // state after hashing the salt; copied per decision
	buckets atomic.Uint32 // canary buckets, 0..Buckets
}

// NewSplitter returns a splitter for the salt at the given weight (percent).
func NewSplitter(salt string, weight float64) (*Splitter, error) {
	b, err := WeightToBuckets(weight)
	if err != nil {
		return nil, err
	}
	s := &Splitter{}
	s.seed.Reset()
	_, _ = s.seed.WriteString(salt)
	s.buckets.Store(b)
	return s, nil
}

// Bucket returns the key's bucket in [0, Buckets).
func (s *Splitter) Bucket(key string) uint32 {
	d := s.seed // copy: hashing continues from the salted state
	_, _ = d.WriteString(key)
	return uint32(d.Sum64() % Buckets)
}

// Decide returns Canary or Stable for a key.
func (s *Splitter) Decide(key string) Version {
	if s.Bucket(key) < s.buckets.Load() {
		return Canary
	}
	return Stable
}

// SetWeight changes the canary share (percent).
func (s *Splitter) SetWeight(weight float64) error {
	b, err := WeightToBuckets(weight)
	if err != nil {
		return err
	}
	s.buckets.Store(b)
	return nil
}

// Weight returns the current canary share in percent.
func (s *Splitter) Weight() float64 { return float64(s.buckets.Load()) / 100 }

// CanaryBuckets returns the current number of canary buckets (weight × 100).
func (s *Splitter) CanaryBuckets() uint32 { return s.buckets.Load() }
