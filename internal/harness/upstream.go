package harness

import (
	"context"
	"net"
	"net/http"
	"time"

	"github.com/knhk/knhk/internal/upstream"
)

// Upstream is an in-process demo upstream on a free loopback port, so tests
// measure the split and inject faults where traffic lands.
type Upstream struct {
	*upstream.Server
	Addr string
	srv  *http.Server
}

// StartUpstream listens on a free loopback port.
func StartUpstream(name string) (*Upstream, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	u := &Upstream{Server: upstream.New(name), Addr: l.Addr().String()}
	u.srv = &http.Server{Handler: u.Server, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = u.srv.Serve(l) }()
	return u, nil
}

// SetDelay adds latency to every response (no errors).
func (u *Upstream) SetDelay(d time.Duration) { _ = u.SetFault(0, d) }

// Close stops the server.
func (u *Upstream) Close() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_ = u.srv.Shutdown(ctx)
}
