package kms

import (
	"context"
	"crypto"
	"sync/atomic"
)

// Counting wraps a Signer and counts its calls, so the KMS rate can be
// watched (and shown not to grow with the request rate).
type Counting struct {
	Signer
	*counters
}

type counters struct{ calls, failures atomic.Uint64 }

// NewCounting wraps s.
func NewCounting(s Signer) *Counting { return &Counting{Signer: s, counters: &counters{}} }

// Latest follows the wrapped key's rotation, counting on the same totals.
func (c *Counting) Latest(ctx context.Context) (Signer, error) {
	v, ok := c.Signer.(Versioned)
	if !ok {
		return c, nil
	}
	next, err := v.Latest(ctx)
	if err != nil || next == c.Signer {
		return c, err
	}
	return &Counting{Signer: next, counters: c.counters}, nil
}

// Sign counts and delegates.
func (c *Counting) Sign(ctx context.Context, msg []byte) ([]byte, error) {
	c.calls.Add(1)
	sig, err := c.Signer.Sign(ctx, msg)
	if err != nil {
		c.failures.Add(1)
	}
	return sig, err
}

// Public delegates.
func (c *Counting) Public() crypto.PublicKey { return c.Signer.Public() }

// Calls and Failures are the totals so far.
func (c *Counting) Calls() uint64    { return c.calls.Load() }
func (c *Counting) Failures() uint64 { return c.failures.Load() }
