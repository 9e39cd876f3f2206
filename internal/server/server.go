// Package server wires knhk's listeners together: the gRPC listener
// (ext_proc + health) and the admin HTTP listener, config reload, readiness
// and the SIGTERM drain.
package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"

	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/knhk/knhk/extproc"
	"github.com/knhk/knhk/pkg/canary"
	"github.com/knhk/knhk/pkg/config"
	"github.com/knhk/knhk/xds"
)

// Server is a running knhk.
type Server struct {
	log      *slog.Logger
	reg      *prometheus.Registry
	extproc  *extproc.Server
	health   *health.Server
	grpc     *grpc.Server
	admin    *http.Server
	grpcLis  net.Listener
	adminLis net.Listener
	ready    atomic.Bool

	mu  sync.Mutex // guards cfg during reload
	cfg config.Config

	weight  prometheus.Gauge
	reloads *prometheus.CounterVec
}

// NewRouter builds the routing decision from a validated config.
func NewRouter(c *config.Config) (*canary.Router, error) {
	srcs, err := c.StickySources()
	if err != nil {
		return nil, err
	}
	return canary.NewRouter(c.Canary.Salt, c.Canary.Weight, srcs)
}

// New validates cfg, creates the data directory and binds both listeners.
// Nothing is served until Serve.
func New(cfg config.Config, log *slog.Logger) (*Server, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("data_dir %s: %w", cfg.DataDir, err)
	}
	router, err := NewRouter(&cfg)
	if err != nil {
		return nil, err
	}
	s := &Server{log: log, cfg: cfg, reg: prometheus.NewRegistry()}
	s.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	s.weight = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "knhk_canary_weight_percent", Help: "Share of sticky keys routed to the canary, in percent.",
	})
	s.reloads = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "knhk_config_reloads_total", Help: "Config reloads (SIGHUP) by result.",
	}, []string{"result"})
	s.reg.MustRegister(s.weight, s.reloads)
	s.weight.Set(cfg.Canary.Weight)

	s.extproc = extproc.NewServer(router, extproc.Clusters{Stable: xds.ClusterStable, Canary: xds.ClusterCanary},
		extproc.NewMetrics(s.reg), log)
	s.health = health.NewServer()
	s.grpc = grpc.NewServer(extproc.GRPCServerOptions()...)
	extprocv3.RegisterExternalProcessorServer(s.grpc, s.extproc)
	healthpb.RegisterHealthServer(s.grpc, s.health)

	s.grpcLis, err = net.Listen("tcp", cfg.Listen.GRPC)
	if err != nil {
		return nil, fmt.Errorf("listen.grpc %s: %w", cfg.Listen.GRPC, err)
	}
	s.adminLis, err = net.Listen("tcp", cfg.Listen.Admin)
	if err != nil {
		_ = s.grpcLis.Close()
		return nil, fmt.Errorf("listen.admin %s: %w", cfg.Listen.Admin, err)
	}
	s.admin = &http.Server{Handler: s.adminMux(), ReadHeaderTimeout: 5 * time.Second}
	return s, nil
}

// GRPCAddr and AdminAddr are the bound addresses (useful with port 0).
func (s *Server) GRPCAddr() string  { return s.grpcLis.Addr().String() }
func (s *Server) AdminAddr() string { return s.adminLis.Addr().String() }

// ExtProc returns the ext_proc service (for in-process benchmarks).
func (s *Server) ExtProc() *extproc.Server { return s.extproc }

func (s *Server) adminMux() *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !s.ready.Load() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ready\n"))
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(s.reg, promhttp.HandlerOpts{Registry: s.reg}))
	mux.HandleFunc("GET /v1/canary", s.handleCanary)
	return mux
}

// Serve runs until ctx is cancelled, then drains: it stops accepting, lets
// open streams finish for up to drain_timeout, and returns nil.
func (s *Server) Serve(ctx context.Context) error {
	errc := make(chan error, 2)
	go func() { errc <- s.grpc.Serve(s.grpcLis) }()
	go func() {
		if err := s.admin.Serve(s.adminLis); !errors.Is(err, http.ErrServerClosed) {
			errc <- err
		}
	}()
	s.health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	s.health.SetServingStatus(extprocv3.ExternalProcessor_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)
	s.ready.Store(true)
	s.log.Info("knhk serving", "grpc", s.GRPCAddr(), "admin", s.AdminAddr(),
		"canary_weight", s.cfg.Canary.Weight, "data_dir", s.cfg.DataDir)

	select {
	case <-ctx.Done():
	case err := <-errc:
		s.ready.Store(false)
		s.grpc.Stop()
		_ = s.admin.Close()
		return fmt.Errorf("listener failed: %w", err)
	}
	return s.drain()
}

func (s *Server) drain() error {
	s.mu.Lock()
	timeout := s.cfg.DrainTimeout.D()
	s.mu.Unlock()
	s.ready.Store(false)
	s.health.Shutdown()
	s.log.Info("draining", "timeout", timeout)
	done := make(chan struct{})
	go func() { s.grpc.GracefulStop(); close(done) }()
	select {
	case <-done:
	case <-time.After(timeout):
		s.log.Warn("drain timeout: closing open streams", "timeout", timeout)
		s.grpc.Stop()
		<-done
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = s.admin.Shutdown(ctx)
	s.log.Info("stopped")
	return nil
}

// Reload applies a new config. Routing keys (weight, salt, sticky keys) and
// the drain timeout take effect at once; listener or upstream changes need a
// restart and are reported, not silently ignored.
func (s *Server) Reload(next config.Config) error {
	if err := next.Validate(); err != nil {
		s.reloads.WithLabelValues("error").Inc()
		return err
	}
	router, err := NewRouter(&next)
	if err != nil {
		s.reloads.WithLabelValues("error").Inc()
		return err
	}
	s.mu.Lock()
	prev := s.cfg
	s.cfg.Canary = next.Canary
	s.cfg.DrainTimeout = next.DrainTimeout
	s.mu.Unlock()
	s.extproc.SetRouter(router)
	s.weight.Set(next.Canary.Weight)
	s.reloads.WithLabelValues("ok").Inc()
	s.log.Info("config reloaded", "canary_weight", next.Canary.Weight, "previous_weight", prev.Canary.Weight)
	if next.Listen != prev.Listen || fmt.Sprint(next.Upstreams) != fmt.Sprint(prev.Upstreams) || next.DataDir != prev.DataDir {
		s.log.Warn("config reload: listen, upstreams and data_dir changes take effect only after a restart")
	}
	return nil
}
