package harness

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Upstream is an in-process HTTP server that answers with its name and
// counts what it serves, so tests measure the split where it lands.
type Upstream struct {
	Name  string
	Addr  string
	count atomic.Int64
	srv   *http.Server

	mu       sync.Mutex
	leaked   []string      // x-knhk-* headers received that a client set
	delay    time.Duration // added latency per request
	inFlight atomic.Int64
}

// StartUpstream listens on a free loopback port.
func StartUpstream(name string) (*Upstream, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	u := &Upstream{Name: name, Addr: l.Addr().String()}
	u.srv = &http.Server{Handler: http.HandlerFunc(u.serve), ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = u.srv.Serve(l) }()
	return u, nil
}

func (u *Upstream) serve(w http.ResponseWriter, r *http.Request) {
	u.inFlight.Add(1)
	defer u.inFlight.Add(-1)
	u.count.Add(1)
	for k, vs := range r.Header {
		lk := strings.ToLower(k)
		if strings.HasPrefix(lk, "x-knhk-") && lk != "x-knhk-version" {
			u.mu.Lock()
			u.leaked = append(u.leaked, lk+": "+strings.Join(vs, ","))
			u.mu.Unlock()
		}
	}
	u.mu.Lock()
	d := u.delay
	u.mu.Unlock()
	if d > 0 {
		time.Sleep(d)
	}
	w.Header().Set("x-upstream", u.Name)
	w.Header().Set("x-upstream-saw-version", r.Header.Get("x-knhk-version"))
	_, _ = fmt.Fprintln(w, u.Name)
}

// Count returns the number of requests served.
func (u *Upstream) Count() int64 { return u.count.Load() }

// Reset zeroes the counter.
func (u *Upstream) Reset() { u.count.Store(0) }

// Leaked returns x-knhk-* headers (other than the routing header) that
// reached this upstream.
func (u *Upstream) Leaked() []string {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]string(nil), u.leaked...)
}

// SetDelay adds latency to every response.
func (u *Upstream) SetDelay(d time.Duration) {
	u.mu.Lock()
	u.delay = d
	u.mu.Unlock()
}

// Close stops the server.
func (u *Upstream) Close() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_ = u.srv.Shutdown(ctx)
}
