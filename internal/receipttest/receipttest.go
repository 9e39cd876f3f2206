// Package receipttest opens real receipt services for tests in other
// packages: a local key and a log in a fresh directory.
package receipttest

import (
	"context"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/knhk/knhk/pkg/kms"
	"github.com/knhk/knhk/pkg/receipt"
)

// Open returns a receipt service signing with a local key under a fresh
// directory, checkpointing every interval; it is closed at cleanup. It
// returns the directory too.
func Open(t *testing.T, interval time.Duration) (*receipt.Service, string) {
	t.Helper()
	dir := t.TempDir()
	signer, err := kms.OpenLocal(filepath.Join(dir, "kms.key"))
	if err != nil {
		t.Fatal(err)
	}
	rs, err := receipt.OpenService(context.Background(), filepath.Join(dir, "receipts"), receipt.ServiceConfig{Origin: "test/log",
		Region: "r", Instance: "i", Delegation: time.Hour, CheckpointInterval: interval, BatchMaxAge: time.Millisecond},
		signer, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = rs.Close(context.Background()) })
	return rs, dir
}
