package harness

import (
	"context"
	"fmt"
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

// LastRequestBeforeQuiet polls the upstream's counter every 10 ms and
// returns the time of the last request before it stayed silent for quiet,
// or an error after timeout. It measures "traffic stopped at the upstream".
func (u *Upstream) LastRequestBeforeQuiet(quiet, timeout time.Duration) (time.Time, error) {
	deadline := time.Now().Add(timeout)
	last, lastChange := u.Count(), time.Now()
	for time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond) // sampling period of the counter
		if c := u.Count(); c != last {
			last, lastChange = c, time.Now()
			continue
		}
		if time.Since(lastChange) >= quiet {
			return lastChange, nil
		}
	}
	return time.Time{}, fmt.Errorf("%s still receiving traffic after %s", u.Name, timeout)
}
