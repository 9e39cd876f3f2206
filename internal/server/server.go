// Package server wires knhk's listeners together: the gRPC listener
// (ext_proc + health), the xDS listener, the admin HTTP listener, the
// rollout loop, config reload, readiness and the SIGTERM drain.
package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/knhk/knhk/extproc"
	"github.com/knhk/knhk/pkg/admission"
	"github.com/knhk/knhk/pkg/canary"
	"github.com/knhk/knhk/pkg/capacity"
	"github.com/knhk/knhk/pkg/config"
	"github.com/knhk/knhk/pkg/holds"
	"github.com/knhk/knhk/pkg/identity"
	"github.com/knhk/knhk/pkg/kms"
	"github.com/knhk/knhk/pkg/promotion"
	"github.com/knhk/knhk/pkg/receipt"
	"github.com/knhk/knhk/xds"
)

// Server is a running knhk.
type Server struct {
	log      *slog.Logger
	reg      *prometheus.Registry
	extproc  *extproc.Server
	xds      *xds.Server
	rollout  *promotion.Rollout
	store    *promotion.BoltStore
	webhooks *promotion.Webhooks
	health   *health.Server
	grpc     *grpc.Server
	xdsGRPC  *grpc.Server
	admin    *http.Server
	grpcLis  net.Listener
	xdsLis   net.Listener
	adminLis net.Listener
	ready    atomic.Bool
	ctx      context.Context
	cancel   context.CancelFunc

	// cfg is the config in force, replaced whole on reload. Only the
	// rollout's owner goroutine replaces it (inside Reconfigure), so that a
	// reload and a weight change are applied one after the other.
	cfg atomic.Pointer[config.Config]

	m metrics

	tracker  *capacity.Tracker
	limiters [3]*admission.Limiter // by canary.Version; kept across reloads
	receipts *receipt.Service      // nil unless receipts.enabled
	identity identity.Source       // nil unless identity.trust_domain
	region   *regionParts          // nil unless listen.region
	// regionPolicy is set while opening receipts, before region exists.
	regionPolicy []byte
	regionClient *http.Client   // reaches the peers (pinned mTLS under identity)
	holds        *holds.Manager // with receipts on
}

// openIdentity opens the SVID source and exports its expiry.
func (s *Server) openIdentity(cfg *config.Config) error {
	src, err := identity.Open(s.ctx, identity.Options{
		TrustDomain: spiffeid.RequireTrustDomainFromString(cfg.Identity.TrustDomain), Socket: cfg.Identity.Socket,
		CertFile: cfg.Identity.Files.Cert, KeyFile: cfg.Identity.Files.Key, Bundle: cfg.Identity.Files.Bundle,
	}, s.log)
	if err != nil {
		return err
	}
	s.identity = src
	margin := time.Duration(cfg.Identity.ExpiryWarning)
	if margin == 0 {
		margin = 10 * time.Minute
	}
	go identity.WatchExpiry(s.ctx, src, margin, time.Second, s.log)
	s.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "knhk_svid_expiry_seconds", Help: "Seconds until knhk's current X.509-SVID expires.",
	}, func() float64 {
		svid, err := src.GetX509SVID()
		if err != nil || len(svid.Certificates) == 0 {
			return 0
		}
		return time.Until(svid.Certificates[0].NotAfter).Seconds()
	}))
	return nil
}

// openReceipts opens the KMS signer and the receipt service.
func (s *Server) openReceipts(cfg *config.Config) error {
	var signer kms.Signer
	var err error
	switch cfg.Receipts.KMS.Provider {
	case "aws":
		signer, err = kms.OpenAWS(s.ctx, kms.AWSConfig{KeyID: cfg.Receipts.KMS.KeyID, Region: cfg.Receipts.KMS.Region, Endpoint: cfg.Receipts.KMS.Endpoint})
	case "azure":
		signer, err = kms.OpenAzure(s.ctx, kms.AzureConfig{VaultURL: cfg.Receipts.KMS.Endpoint, Key: cfg.Receipts.KMS.KeyID})
	case "vault":
		signer, err = kms.OpenVault(s.ctx, kms.VaultConfig{Address: cfg.Receipts.KMS.Endpoint, Token: os.Getenv("VAULT_TOKEN"),
			Mount: cfg.Receipts.KMS.Mount, Key: cfg.Receipts.KMS.KeyID})
	default:
		signer, err = kms.OpenLocal(filepath.Join(cfg.DataDir, "keys", "kms-ed25519.key"))
	}
	if err != nil {
		return fmt.Errorf("receipts.kms: %w", err)
	}
	counted := kms.NewCounting(signer)
	s.reg.MustRegister(
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "knhk_kms_sign_calls_total",
			Help: "Signatures asked of the KMS key (checkpoints and delegation certificates), whatever the request rate."},
			func() float64 { return float64(counted.Calls()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "knhk_kms_sign_failures_total",
			Help: "KMS signatures that failed (outage, throttling after retries)."},
			func() float64 { return float64(counted.Failures()) }))
	signer = counted
	host, _ := os.Hostname()
	sc := cfg.Receipts.ServiceConfig(host)
	if cfg.RegionEnabled() {
		if sc.Witnessing, err = s.witnessing(cfg, signer); err != nil {
			return err
		}
	}
	s.receipts, err = receipt.OpenService(s.ctx, filepath.Join(cfg.DataDir, "receipts"), sc, signer, s.log)
	if err != nil {
		return fmt.Errorf("receipts: %w", err)
	}
	// Three quarters of Envoy's message_timeout: knhk must answer (with a
	// receipt, or a refusal) before Envoy gives up on it.
	s.extproc.SetReceipts(s.receipts, extproc.ReceiptOptions{Required: cfg.Receipts.Required, Timeout: cfg.Envoy.MessageTimeout.D() * 3 / 4})
	s.registerReceiptMetrics()
	return nil
}

// admissionSetup builds the per-request admission setup from cfg, reusing
// the learned limiters and capacity sketches.
func (s *Server) admissionSetup(cfg *config.Config) (*extproc.Admission, error) {
	cl, err := cfg.Admission.Classifier()
	if err != nil {
		return nil, err
	}
	key := extproc.CapacityKey{Kind: cfg.Capacity.Key}
	if h, ok := strings.CutPrefix(cfg.Capacity.Key, "header:"); ok {
		key = extproc.CapacityKey{Kind: "header", Header: strings.ToLower(h)}
	}
	return &extproc.Admission{
		Enabled: cfg.Admission.Enabled, Classifier: cl, Limiters: s.limiters,
		TrustedHeader: cfg.Admission.TrustedHeader,
		RetryAfter:    strconv.Itoa(int(cfg.Admission.C1RetryAfter.D().Seconds())),
		Tracker:       s.tracker, Key: key,
	}, nil
}

// NewRouter builds the routing decision from a validated config at weight.
func NewRouter(c *config.Config, weight float64) (*canary.Router, error) {
	srcs, err := c.StickySources()
	if err != nil {
		return nil, err
	}
	return canary.NewRouter(c.Canary.Salt, weight, srcs)
}

// New validates cfg, opens the state store, binds every listener and
// publishes the first xDS snapshot. Nothing is served until Serve.
func New(cfg config.Config, log *slog.Logger) (_ *Server, err error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, dataDirError(err)
	}
	s := &Server{log: log, reg: prometheus.NewRegistry()}
	s.cfg.Store(&cfg)
	s.ctx, s.cancel = context.WithCancel(context.Background())
	defer func() {
		if err != nil {
			s.close()
		}
	}()
	s.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	s.m = newMetrics(s.reg)

	if s.store, err = promotion.OpenBoltStore(cfg.DataDir); err != nil {
		return nil, dataDirError(err)
	}
	if s.rollout, err = promotion.New(cfg.PromotionConfig(), s.store, cfg.Canary.Weight, nil); err != nil {
		return nil, err
	}
	router, err := NewRouter(&cfg, s.rollout.Weight())
	if err != nil {
		return nil, err
	}
	fs, err := cfg.FlagSet()
	if err != nil {
		return nil, err
	}
	s.extproc = extproc.NewServer(router, extproc.Clusters{Stable: xds.ClusterStable, Canary: xds.ClusterCanary},
		extproc.NewMetrics(s.reg), log, s.rollout)
	s.extproc.SetFlags(fs)
	s.extproc.SetHeaderLimits(extproc.HeaderLimits(xds.HeaderLimits()))
	s.tracker = capacity.NewTracker(cfg.Capacity.CapacityConfig())
	s.limiters = [3]*admission.Limiter{}
	lc := cfg.Admission.LimiterConfig()
	s.limiters[canary.Stable] = admission.NewLimiter(lc)
	s.limiters[canary.Canary] = admission.NewLimiter(lc)
	adm, err := s.admissionSetup(&cfg)
	if err != nil {
		return nil, err
	}
	s.extproc.SetAdmission(adm)
	s.reg.MustRegister(&admissionCollector{s: s})
	// Identity first: the receipt log reaches peer regions over mTLS.
	if cfg.Identity.Enabled() {
		if err := s.openIdentity(&cfg); err != nil {
			return nil, err
		}
	}
	if cfg.Receipts.Enabled {
		if err := s.openReceipts(&cfg); err != nil {
			return nil, err
		}
		if err := s.openHolds(); err != nil {
			return nil, err
		}
	}
	s.xds = xds.NewServer(s.ctx, log, s.reg)
	s.webhooks = promotion.NewWebhooks(webhookTargets(&cfg), log)
	s.webhooks.OnResult = func(_ string, ok bool) {
		s.m.webhooks.WithLabelValues(map[bool]string{true: "ok", false: "failed"}[ok]).Inc()
	}
	s.webhooks.OnDrop = func() { s.m.webhooks.WithLabelValues("dropped").Inc() }

	// One weight, owned by the rollout, drives the hash split and Envoy's
	// weighted clusters; this listener is the only place both change.
	var first error
	s.rollout.OnWeight(func(w float64) {
		if err := s.applyWeight(w); err != nil && first == nil {
			first = err
		}
	})
	if first != nil {
		return nil, first
	}
	s.rollout.OnDecision(s.onDecision)
	s.m.setPhase(s.rollout.State().Phase)

	var extprocTLS, xdsTLS []grpc.ServerOption
	var adminTLSConfig *tls.Config
	if cfg.Identity.Enabled() {
		td := spiffeid.RequireTrustDomainFromString(cfg.Identity.TrustDomain)
		creds := func(key string, ids []string) (*tls.Config, error) {
			allowed, err := identity.ParseAllowed(key, td, ids)
			if err != nil {
				return nil, err
			}
			return identity.ServerTLS(s.identity, s.identity, allowed), nil
		}
		e, err := creds("identity.allowed.extproc", cfg.Identity.Allowed.ExtProc)
		if err != nil {
			return nil, err
		}
		x, err := creds("identity.allowed.xds", cfg.Identity.Allowed.XDS)
		if err != nil {
			return nil, err
		}
		if adminTLSConfig, err = creds("identity.allowed.admin", cfg.Identity.Allowed.Admin); err != nil {
			return nil, err
		}
		extprocTLS = []grpc.ServerOption{grpc.Creds(credentials.NewTLS(e))}
		xdsTLS = []grpc.ServerOption{grpc.Creds(credentials.NewTLS(x))}
	}
	s.health = health.NewServer()
	s.grpc = grpc.NewServer(append(extproc.GRPCServerOptions(), extprocTLS...)...)
	extprocv3.RegisterExternalProcessorServer(s.grpc, s.extproc)
	healthpb.RegisterHealthServer(s.grpc, s.health)
	s.xdsGRPC = grpc.NewServer(xdsTLS...)
	s.xds.Register(s.xdsGRPC)
	healthpb.RegisterHealthServer(s.xdsGRPC, s.health)

	if s.grpcLis, err = net.Listen("tcp", cfg.Listen.GRPC); err != nil {
		return nil, fmt.Errorf("listen.grpc %s: %w", cfg.Listen.GRPC, err)
	}
	if s.xdsLis, err = net.Listen("tcp", cfg.Listen.XDS); err != nil {
		return nil, fmt.Errorf("listen.xds %s: %w", cfg.Listen.XDS, err)
	}
	if s.adminLis, err = net.Listen("tcp", cfg.Listen.Admin); err != nil {
		return nil, fmt.Errorf("listen.admin %s: %w", cfg.Listen.Admin, err)
	}
	if adminTLSConfig != nil {
		s.adminLis = tls.NewListener(s.adminLis, adminTLSConfig)
	}
	if cfg.RegionEnabled() {
		if err := s.openRegion(&cfg); err != nil {
			return nil, err
		}
	}
	s.admin = &http.Server{Handler: s.adminMux(), ReadHeaderTimeout: 5 * time.Second}
	return s, nil
}

// dataDirError names the key; the error itself names the file once.
func dataDirError(err error) error {
	if errors.Is(err, fs.ErrPermission) {
		return fmt.Errorf("data_dir: %w (knhk must be able to read and write this directory: fix its owner or mode, or set --data-dir)", err)
	}
	return fmt.Errorf("data_dir: %w", err)
}

func webhookTargets(c *config.Config) []promotion.WebhookTarget {
	out := make([]promotion.WebhookTarget, 0, len(c.Rollout.Webhooks))
	for _, w := range c.Rollout.Webhooks {
		out = append(out, promotion.WebhookTarget{URL: w.URL, Timeout: w.Timeout.D()})
	}
	return out
}

// applyWeight moves the split and publishes the matching xDS snapshot. It
// runs on the rollout's owner goroutine (a weight listener, or inside
// Reconfigure), so calls never interleave and the last one published
// carries both the latest weight and the latest config.
func (s *Server) applyWeight(w float64) error {
	buckets, err := canary.WeightToBuckets(w)
	if err != nil {
		return err
	}
	if err := s.extproc.Router().Splitter().SetWeight(w); err != nil {
		return err
	}
	s.m.weight.Set(w)
	cfg := s.config()
	_, err = s.xds.Update(xds.State{
		Upstreams:     xds.Upstreams{Stable: cfg.Upstreams.Stable, Canary: cfg.Upstreams.Canary},
		CanaryBuckets: buckets,
		RouteTimeout:  cfg.Envoy.RouteTimeout.D(),
	})
	if err != nil {
		s.log.Error("xds update failed", "error", err.Error())
	}
	return err
}

// config is the config in force; it must not be modified.
func (s *Server) config() *config.Config { return s.cfg.Load() }

// onDecision logs, counts and forwards every rollout decision.
func (s *Server) onDecision(d promotion.Decision) {
	s.m.decisions.WithLabelValues(d.Decision, d.Reason).Inc()
	s.m.setPhase(d.Phase)
	attrs := []any{"decision", d.Decision, "reason", d.Reason, "detail", d.Detail, "weight", d.Weight, "phase", d.Phase}
	if d.Judgment != nil {
		attrs = append(attrs, "values", d.Judgment.Values)
	}
	switch d.Decision {
	case "rollback", "error":
		s.log.Warn("rollout decision", attrs...)
	case "hold":
		s.log.Debug("rollout decision", attrs...)
	default:
		s.log.Info("rollout decision", attrs...)
	}
	s.webhooks.Enqueue(d)
}

// Addresses bound (useful with port 0).
func (s *Server) GRPCAddr() string  { return s.grpcLis.Addr().String() }
func (s *Server) XDSAddr() string   { return s.xdsLis.Addr().String() }
func (s *Server) AdminAddr() string { return s.adminLis.Addr().String() }

// Serve runs until ctx is cancelled, then drains: it stops accepting, lets
// open streams finish for up to drain_timeout, and returns nil.
func (s *Server) Serve(ctx context.Context) error {
	errc := make(chan error, 4)
	go func() { errc <- s.grpc.Serve(s.grpcLis) }()
	go func() { errc <- s.xdsGRPC.Serve(s.xdsLis) }()
	go func() {
		if err := s.admin.Serve(s.adminLis); !errors.Is(err, http.ErrServerClosed) {
			errc <- err
		}
	}()
	if s.region != nil {
		go func() {
			if err := s.region.http.Serve(s.region.lis); !errors.Is(err, http.ErrServerClosed) {
				errc <- err
			}
		}()
	}
	go s.rollout.Run(s.ctx)
	if s.receipts != nil {
		go s.receipts.Run(s.ctx)
		if s.region != nil {
			s.region.tracked = make(chan struct{})
			go s.region.track(s.ctx, s.receipts, s.log)
			for _, p := range s.region.pushers {
				s.region.pushing.Go(func() { p.Run(s.ctx) })
			}
			if keep := s.config().Receipts.Retention.KeepBodiesFor.D(); keep > 0 {
				pruned := prometheus.NewCounter(prometheus.CounterOpts{Name: "knhk_region_mirror_pruned_total",
					Help: "Bodies of mirrored receipts replaced by tombstones under this region's receipts.retention.keep_bodies_for."})
				s.reg.MustRegister(pruned)
				s.region.pushing.Go(func() { s.region.retainMirrored(s.ctx, keep, s.log, pruned) })
			}
		}
	}
	go s.webhooks.Run(s.ctx)
	s.health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	s.health.SetServingStatus(extprocv3.ExternalProcessor_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)
	s.ready.Store(true)
	st := s.rollout.State()
	s.log.Info("knhk serving", "grpc", s.GRPCAddr(), "xds", s.XDSAddr(), "admin", s.AdminAddr(), "region", s.RegionAddr(),
		"rollout_phase", st.Phase, "canary_weight", st.Weight, "data_dir", s.config().DataDir)

	select {
	case <-ctx.Done():
	case err := <-errc:
		s.ready.Store(false)
		s.grpc.Stop()
		s.xdsGRPC.Stop()
		_ = s.admin.Close()
		if s.region != nil {
			_ = s.region.http.Close()
		}
		s.close()
		return fmt.Errorf("listener failed: %w", err)
	}
	return s.drain()
}

// drain stops within drain_timeout plus a second, whatever is
// pending: open streams get drain_timeout, and the receipt log what is left
// of the rest. Every receipt with a token is already in the fsynced
// journal, so one that misses its final checkpoint here gets it at the
// next start.
func (s *Server) drain() error {
	timeout := s.config().DrainTimeout.D()
	deadline := time.Now().Add(timeout + time.Second)
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
	// xDS streams never end on their own; Envoy keeps its last config.
	s.xdsGRPC.Stop()
	ctx, cancel := context.WithTimeout(context.Background(), min(time.Second, time.Until(deadline)))
	defer cancel()
	// Side by side, so one cannot use up the other's time; what does not
	// finish in it is closed.
	servers := []*http.Server{s.admin}
	if s.region != nil {
		servers = append(servers, s.region.http)
	}
	var wg sync.WaitGroup
	for _, h := range servers {
		wg.Go(func() {
			if err := h.Shutdown(ctx); err != nil {
				_ = h.Close()
			}
		})
	}
	wg.Wait()
	s.closeBy(deadline)
	s.log.Info("stopped")
	return nil
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// close releases everything after a failed start or a failed listener.
func (s *Server) close() { s.closeBy(time.Now().Add(5 * time.Second)) }

func (s *Server) closeBy(deadline time.Time) {
	s.cancel()
	for _, l := range []net.Listener{s.grpcLis, s.xdsLis, s.adminLis} {
		if l != nil {
			_ = l.Close()
		}
	}
	if s.store != nil {
		_ = s.store.Close()
	}
	if s.region != nil {
		if s.region.lis != nil {
			_ = s.region.lis.Close()
		}
		if s.region.tracked != nil {
			<-s.region.tracked // s.cancel above ends it, and the pushers
			s.region.pushing.Wait()
		}
		if s.region.mirror != nil {
			_ = s.region.mirror.Close()
		}
		_ = s.region.witness.Close()
	}
	if s.holds != nil {
		// Before the log: a change being logged gives up (s.cancel above),
		// and is logged at the next start.
		if err := s.holds.Close(); err != nil {
			s.log.Warn("closing the legal holds", "error", err.Error())
		}
	}
	if s.receipts != nil {
		// At least a moment, so the index and the journal close cleanly.
		ctx, cancel := context.WithDeadline(context.Background(), maxTime(deadline, time.Now().Add(200*time.Millisecond)))
		if err := s.receipts.Close(ctx); err != nil {
			s.log.Warn("receipts closed before their last checkpoint; it is published at the next start", "error", err.Error())
		}
		cancel()
	}
	if s.identity != nil {
		_ = s.identity.Close()
	}
}

// ReloadFrom loads a config with load and applies it; a config that fails
// to load counts as a rejected reload like one that fails to apply.
// Routing keys, upstreams, flags and the idle weight take effect at once;
// listener, data_dir and rollout-analysis changes need a restart and are
// reported, not silently ignored.
func (s *Server) ReloadFrom(load func() (config.Config, error)) error {
	next, err := load()
	if err == nil {
		err = s.reload(next)
	}
	if err != nil {
		s.m.reloads.WithLabelValues("error").Inc()
		s.log.Error("config reload rejected; keeping the running config", "error", err.Error())
		return err
	}
	s.m.reloads.WithLabelValues("ok").Inc()
	return nil
}

func (s *Server) reload(next config.Config) error {
	if err := next.Validate(); err != nil {
		return err
	}
	// Build everything first, off the owner goroutine; the weight is set
	// on the new router there, just before it is installed.
	router, err := NewRouter(&next, 0)
	if err != nil {
		return err
	}
	fs, err := next.FlagSet()
	if err != nil {
		return err
	}
	adm, err := s.admissionSetup(&next)
	if err != nil {
		return err
	}
	// What the xDS update inside Reconfigure could refuse is refused here,
	// before anything is installed: a rejected reload changes nothing.
	if _, err := xds.UpstreamClusters(xds.Upstreams{Stable: next.Upstreams.Stable, Canary: next.Upstreams.Canary}); err != nil {
		return fmt.Errorf("upstreams: %w", err)
	}
	prev := s.config()
	merged := *prev
	merged.Canary = next.Canary
	merged.Upstreams = next.Upstreams
	merged.DrainTimeout = next.DrainTimeout
	merged.Flags, merged.Environment = next.Flags, next.Environment
	merged.Admission = next.Admission
	err = s.rollout.Reconfigure(s.ctx, next.Canary.Weight, func(w float64) error {
		if err := router.Splitter().SetWeight(w); err != nil {
			return err
		}
		s.extproc.SetRouter(router)
		s.extproc.SetFlags(fs)
		s.extproc.SetAdmission(adm)
		s.cfg.Store(&merged)
		return s.applyWeight(w)
	})
	if err != nil {
		return err
	}
	s.log.Info("config reloaded", "idle_weight", next.Canary.Weight, "weight", s.rollout.Weight())
	if next.Listen != prev.Listen || next.DataDir != prev.DataDir || fmt.Sprint(next.Rollout) != fmt.Sprint(prev.Rollout) ||
		fmt.Sprint(next.Region) != fmt.Sprint(prev.Region) {
		s.log.Warn("config reload: listen, data_dir, rollout and region changes take effect only after a restart")
	}
	return nil
}
