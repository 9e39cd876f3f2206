package identity

import (
	"bytes"
	"context"
	"crypto/x509"
	"log/slog"
	"math/big"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

type fixedSVID struct{ svid *x509svid.SVID }

func (f fixedSVID) GetX509SVID() (*x509svid.SVID, error) { return f.svid, nil }

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) { s.mu.Lock(); defer s.mu.Unlock(); return s.b.Write(p) }
func (s *syncBuf) String() string              { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

func svidExpiringIn(d time.Duration, serial int64) fixedSVID {
	return fixedSVID{&x509svid.SVID{ID: spiffeid.RequireFromString("spiffe://example.org/knhk"),
		Certificates: []*x509.Certificate{{SerialNumber: big.NewInt(serial), NotAfter: time.Now().Add(d)}}}}
}

func watch(t *testing.T, src x509svid.Source, margin time.Duration) string {
	t.Helper()
	var logs syncBuf
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		WatchExpiry(ctx, src, margin, time.Millisecond, slog.New(slog.NewJSONHandler(&logs, nil)))
		close(done)
	}()
	// Several ticks: each SVID state is reported once, not per tick.
	deadline := time.Now().Add(2 * time.Second)
	for strings.Count(logs.String(), "\n") == 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(20 * time.Millisecond) // let more ticks pass: they must not repeat the line
	cancel()
	<-done
	return logs.String()
}

func TestWatchExpiryWarnsOnceWithinMargin(t *testing.T) {
	out := watch(t, svidExpiringIn(30*time.Second, 1), time.Minute)
	if strings.Count(out, "SVID expires soon") != 1 || !strings.Contains(out, `"level":"WARN"`) {
		t.Fatalf("want one warning, got %q", out)
	}
}

func TestWatchExpiryLogsExpired(t *testing.T) {
	out := watch(t, svidExpiringIn(-time.Second, 2), time.Minute)
	if strings.Count(out, "SVID has expired") != 1 || strings.Contains(out, "expires soon") {
		t.Fatalf("want one expiry error, got %q", out)
	}
}

func TestWatchExpiryQuietOutsideMargin(t *testing.T) {
	var logs syncBuf
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	defer cancel()
	WatchExpiry(ctx, svidExpiringIn(time.Hour, 3), time.Minute, time.Millisecond, slog.New(slog.NewJSONHandler(&logs, nil)))
	if logs.String() != "" {
		t.Fatalf("want no log an hour before expiry, got %q", logs.String())
	}
}
