package receipt

import (
	"io"
	"log/slog"
	"os"
	"testing"
)

func TestMain(m *testing.M) {
	routeKlog(slog.New(slog.DiscardHandler)) // tessera's klog output, once for the whole binary
	os.Exit(m.Run())
}

// testLogger writes text records to w.
func testLogger(w io.Writer) *slog.Logger { return slog.New(slog.NewTextHandler(w, nil)) }
