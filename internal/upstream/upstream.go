// Package upstream is the demo and test upstream: it answers with its name,
// counts what it serves, and injects faults (an error rate and added
// latency) set at start or at runtime through POST /fault.
package upstream

import (
	"fmt"
	"math"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Server is an http.Handler.
type Server struct {
	Name string

	served atomic.Int64
	failed atomic.Int64
	seq    atomic.Uint64

	mu      sync.Mutex
	errRate float64
	latency time.Duration
	leaked  []string
	workers chan struct{} // nil: unlimited; else a fixed-capacity server
}

// SetCapacity makes the upstream a server of fixed capacity: `workers`
// requests at a time, each taking `service`; the rest wait in an unbounded
// queue, as in a real server's accept backlog. workers 0 removes the limit.
func (s *Server) SetCapacity(workers int, service time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.latency = service
	if workers <= 0 {
		s.workers = nil
		return
	}
	s.workers = make(chan struct{}, workers)
}

// New returns a healthy upstream named name.
func New(name string) *Server { return &Server{Name: name} }

// SetFault sets the share of requests answered 503 and the added latency.
func (s *Server) SetFault(errRate float64, latency time.Duration) error {
	if errRate < 0 || errRate > 1 {
		return fmt.Errorf("error_rate %v: want a fraction from 0 to 1", errRate)
	}
	if latency < 0 {
		return fmt.Errorf("latency %v: must not be negative", latency)
	}
	s.mu.Lock()
	s.errRate, s.latency = errRate, latency
	s.mu.Unlock()
	return nil
}

// Count is the number of requests served (any status).
func (s *Server) Count() int64 { return s.served.Load() }

// Failed is the number answered 503 by the fault.
func (s *Server) Failed() int64 { return s.failed.Load() }

// Reset zeroes the counters.
func (s *Server) Reset() { s.served.Store(0); s.failed.Store(0) }

// Leaked returns client x-knhk-* headers (other than the routing, flags and
// class headers knhk sets) that reached this upstream.
func (s *Server) Leaked() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.leaked...)
}

// ServeHTTP answers requests and the /fault control endpoint.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/fault" && r.Method == http.MethodPost {
		s.serveFault(w, r)
		return
	}
	s.served.Add(1)
	for k, vs := range r.Header {
		lk := strings.ToLower(k)
		if strings.HasPrefix(lk, "x-knhk-") && lk != "x-knhk-version" && lk != "x-knhk-flags" && lk != "x-knhk-slo-class" {
			s.mu.Lock()
			s.leaked = append(s.leaked, lk+": "+strings.Join(vs, ","))
			s.mu.Unlock()
		}
	}
	s.mu.Lock()
	errRate, latency, workers := s.errRate, s.latency, s.workers
	s.mu.Unlock()
	if workers != nil {
		select {
		case workers <- struct{}{}:
		case <-r.Context().Done(): // the client (Envoy) gave up while queued
			return
		}
		defer func() { <-workers }()
	}
	if latency > 0 {
		time.Sleep(latency)
	}
	w.Header().Set("x-upstream", s.Name)
	w.Header().Set("x-upstream-saw-version", r.Header.Get("x-knhk-version"))
	w.Header().Set("x-upstream-saw-flags", r.Header.Get("x-knhk-flags"))
	w.Header().Set("x-upstream-saw-class", strings.Join(r.Header.Values("x-knhk-slo-class"), ","))
	// Evenly spaced failures: request n fails when ⌊n·rate⌋ steps up, so the
	// error rate is exact over any stretch rather than sampled.
	if errRate > 0 {
		n := float64(s.seq.Add(1))
		if math.Floor(n*errRate) != math.Floor((n-1)*errRate) {
			s.failed.Add(1)
			http.Error(w, s.Name+": injected fault", http.StatusServiceUnavailable)
			return
		}
	}
	_, _ = fmt.Fprintln(w, s.Name)
}

func (s *Server) serveFault(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	rate, latency := 0.0, time.Duration(0)
	var err error
	if v := q.Get("error_rate"); v != "" {
		if rate, err = strconv.ParseFloat(v, 64); err != nil {
			http.Error(w, "error_rate: "+err.Error(), http.StatusBadRequest)
			return
		}
	}
	if v := q.Get("latency"); v != "" {
		if latency, err = time.ParseDuration(v); err != nil {
			http.Error(w, "latency: "+err.Error(), http.StatusBadRequest)
			return
		}
	}
	if err := s.SetFault(rate, latency); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	_, _ = fmt.Fprintf(w, "%s: error_rate %v, latency %v\n", s.Name, rate, latency) //nolint:gosec // plain text, numbers and the operator's own name
}
