package receipt

import (
	"context"
	"strings"
	"testing"
	"time"
)

// TestIndexFlushErrorIsCountedAndReported: when the index cannot be
// written, requests still get receipts (the journal and the log make them
// durable), and the failure is counted and reported as a degraded reason
// instead of being dropped.
func TestIndexFlushErrorIsCountedAndReported(t *testing.T) {
	ctx := context.Background()
	_, _, s := localTestService(t)
	defer func() { _ = s.Close(ctx) }()
	_, tok := issueOne(t, s)
	bundleWhenIntegrated(t, s, tok.ID)
	if err := s.Degraded(); err != nil || s.IndexFlushErrors() != 0 {
		t.Fatalf("healthy service: degraded %v, %d flush errors", err, s.IndexFlushErrors())
	}
	// The index file goes away under the service: every flush fails.
	if err := s.index.db.Close(); err != nil {
		t.Fatal(err)
	}
	issueOne(t, s)
	deadline := time.Now().Add(10 * time.Second)
	for s.IndexFlushErrors() == 0 || s.Degraded() == nil {
		if time.Now().After(deadline) {
			t.Fatalf("flush failure not surfaced: %d errors, degraded %v", s.IndexFlushErrors(), s.Degraded())
		}
		time.Sleep(10 * time.Millisecond) // poll period
	}
	if err := s.Degraded(); !strings.Contains(err.Error(), "receipt index") {
		t.Fatalf("degraded reason %q does not name the index", err)
	}
	// Failed flushes are retried, and each failure is counted.
	n := s.IndexFlushErrors()
	for s.IndexFlushErrors() <= n {
		if time.Now().After(deadline) {
			t.Fatal("a failed flush was not retried")
		}
		time.Sleep(10 * time.Millisecond) // poll period
	}
}
