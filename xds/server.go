package xds

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"sync"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
)

// State is what the xDS resources are built from.
type State struct {
	Upstreams     Upstreams
	CanaryBuckets uint32        // weight × 100
	RouteTimeout  time.Duration // 0: Envoy's default
}

// allNodes makes every Envoy share one snapshot: knhk serves one route
// table, whatever the node id.
type allNodes struct{}

func (allNodes) ID(*corev3.Node) string { return "knhk" }

// Server is the embedded ADS server (SotW and delta on the same port).
type Server struct {
	log   *slog.Logger
	cache cache.SnapshotCache
	ads   serverv3.Server

	mu      sync.Mutex
	version uint64
	state   State
	sentAt  map[string]time.Time // version → when the snapshot was set
	nonces  map[string]string    // delta nonce → version it carried
	nack    map[string]*NACK     // by type URL: rejections not yet superseded by an ACK

	snapshots  prometheus.Counter
	nacks      prometheus.Counter
	acks       prometheus.Counter
	propagate  prometheus.Histogram
	versionG   prometheus.Gauge
	ackWaiters []chan struct{}
	acked      uint64
	recent     [1024]time.Duration // last propagation times, a ring
	recentN    uint64
}

// NACK describes a config Envoy rejected.
type NACK struct {
	Version string    `json:"version"`
	TypeURL string    `json:"type_url"`
	Error   string    `json:"error"`
	Time    time.Time `json:"time"`
}

// NewServer creates the server; metrics register on reg.
func NewServer(ctx context.Context, log *slog.Logger, reg prometheus.Registerer) *Server {
	s := &Server{
		log:    log,
		sentAt: map[string]time.Time{},
		nonces: map[string]string{},
		nack:   map[string]*NACK{},
		snapshots: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "knhk_xds_snapshots_total", Help: "xDS snapshots published (one per state change).",
		}),
		nacks: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "knhk_xds_nacks_total", Help: "xDS responses Envoy rejected (NACK).",
		}),
		acks: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "knhk_xds_acks_total", Help: "xDS responses Envoy accepted (ACK).",
		}),
		propagate: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "knhk_xds_propagation_seconds",
			Help:    "Time from a state change to Envoy's ACK of the route table carrying it.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
		}),
		versionG: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "knhk_xds_snapshot_version", Help: "Version of the latest xDS snapshot.",
		}),
	}
	reg.MustRegister(s.snapshots, s.nacks, s.acks, s.propagate, s.versionG)
	logger := goControlPlaneLogger{log}
	s.cache = cache.NewSnapshotCache(true, allNodes{}, logger)
	s.ads = serverv3.NewServer(ctx, s.cache, serverv3.CallbackFuncs{
		StreamRequestFunc: func(_ int64, r *discoverygrpc.DiscoveryRequest) error {
			s.onRequest(r.GetTypeUrl(), r.GetVersionInfo(), r.GetResponseNonce(), r.GetErrorDetail().GetMessage(), r.GetErrorDetail() != nil)
			return nil
		},
		StreamDeltaRequestFunc: func(_ int64, r *discoverygrpc.DeltaDiscoveryRequest) error {
			s.mu.Lock()
			v := s.nonces[r.GetResponseNonce()]
			delete(s.nonces, r.GetResponseNonce())
			s.mu.Unlock()
			s.onRequest(r.GetTypeUrl(), v, r.GetResponseNonce(), r.GetErrorDetail().GetMessage(), r.GetErrorDetail() != nil)
			return nil
		},
		StreamDeltaResponseFunc: func(_ int64, _ *discoverygrpc.DeltaDiscoveryRequest, resp *discoverygrpc.DeltaDiscoveryResponse) {
			s.mu.Lock()
			if len(s.nonces) > 4096 { // streams that closed before answering
				clear(s.nonces)
			}
			s.nonces[resp.GetNonce()] = resp.GetSystemVersionInfo()
			s.mu.Unlock()
		},
	})
	return s
}

// Register adds ADS to a gRPC server.
func (s *Server) Register(g *grpc.Server) {
	discoverygrpc.RegisterAggregatedDiscoveryServiceServer(g, s.ads)
}

// onRequest handles ACKs and NACKs. An initial request (no nonce) is neither.
// A NACK is cleared when Envoy ACKs the same resource type at a version at
// least as new as the rejected one.
func (s *Server) onRequest(typeURL, version, nonce, errMsg string, isNACK bool) {
	if nonce == "" {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if isNACK {
		s.nacks.Inc()
		n := &NACK{Version: strconv.FormatUint(s.version, 10), TypeURL: typeURL, Error: errMsg, Time: time.Now()}
		s.nack[typeURL] = n
		s.log.Error("Envoy rejected xDS config (NACK); it keeps serving the last good one",
			"type_url", typeURL, "rejected_version", n.Version, "error", errMsg)
		return
	}
	s.acks.Inc()
	v, err := strconv.ParseUint(version, 10, 64)
	if err != nil {
		return
	}
	if n := s.nack[typeURL]; n != nil {
		if nv, _ := strconv.ParseUint(n.Version, 10, 64); v >= nv {
			s.log.Info("xDS config accepted again", "type_url", typeURL, "version", version)
			delete(s.nack, typeURL)
		}
	}
	if typeURL != resource.RouteType {
		return
	}
	if t, ok := s.sentAt[version]; ok {
		d := time.Since(t)
		s.propagate.Observe(d.Seconds())
		s.recent[s.recentN%uint64(len(s.recent))] = d
		s.recentN++
		delete(s.sentAt, version)
	}
	if v > s.acked {
		s.acked = v
		for _, c := range s.ackWaiters {
			close(c)
		}
		s.ackWaiters = nil
	}
}

// Update publishes a new snapshot for st; every call is a new version.
func (s *Server) Update(st State) (string, error) {
	clusters, err := UpstreamClusters(st.Upstreams)
	if err != nil {
		return "", err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.version++
	v := strconv.FormatUint(s.version, 10)
	res := map[resource.Type][]types.Resource{
		resource.ClusterType: {clusters[0], clusters[1]},
		resource.RouteType:   {RouteConfiguration(st.CanaryBuckets, st.RouteTimeout)},
	}
	snap, err := cache.NewSnapshot(v, res)
	if err != nil {
		return "", err
	}
	s.sentAt[v] = time.Now()
	for k, t := range s.sentAt { // bound the map if Envoy never ACKs
		if time.Since(t) > time.Minute {
			delete(s.sentAt, k)
		}
	}
	if err := s.cache.SetSnapshot(context.Background(), "knhk", snap); err != nil {
		return "", fmt.Errorf("xds snapshot %s: %w", v, err)
	}
	s.state = st
	s.snapshots.Inc()
	s.versionG.Set(float64(s.version))
	s.log.Debug("xds snapshot", "version", v, "canary_buckets", st.CanaryBuckets)
	return v, nil
}

// Healthy is nil unless Envoy has rejected a config it has not since
// accepted a newer version of.
func (s *Server) Healthy() error {
	if n := s.LastNACK(); n != nil {
		return fmt.Errorf("envoy rejected xDS version %s (%s): %s", n.Version, n.TypeURL, n.Error)
	}
	return nil
}

// LastNACK returns an outstanding NACK, if any.
func (s *Server) LastNACK() *NACK {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, n := range s.nack {
		c := *n
		return &c
	}
	return nil
}

// WaitACK blocks until Envoy has ACKed a route table at version ≥ v, or ctx ends.
func (s *Server) WaitACK(ctx context.Context, v string) error {
	want, err := strconv.ParseUint(v, 10, 64)
	if err != nil {
		return err
	}
	for {
		s.mu.Lock()
		if s.acked >= want {
			s.mu.Unlock()
			return nil
		}
		c := make(chan struct{})
		s.ackWaiters = append(s.ackWaiters, c)
		s.mu.Unlock()
		select {
		case <-c:
		case <-ctx.Done():
			return errors.Join(ctx.Err(), fmt.Errorf("no ACK for xDS version %s", v))
		}
	}
}

// goControlPlaneLogger routes go-control-plane's logs to slog at debug
// level (its info logs fire on every request).
type goControlPlaneLogger struct{ l *slog.Logger }

func (g goControlPlaneLogger) Debugf(f string, a ...any) { g.l.Debug(fmt.Sprintf(f, a...)) }
func (g goControlPlaneLogger) Infof(f string, a ...any)  { g.l.Debug(fmt.Sprintf(f, a...)) }
func (g goControlPlaneLogger) Warnf(f string, a ...any)  { g.l.Warn(fmt.Sprintf(f, a...)) }
func (g goControlPlaneLogger) Errorf(f string, a ...any) { g.l.Error(fmt.Sprintf(f, a...)) }

// Status is the xDS view for GET /v1/xds.
type Status struct {
	Version        uint64  `json:"version"`
	AckedVersion   uint64  `json:"acked_route_version"`
	NACK           *NACK   `json:"nack,omitempty"`
	Propagations   int     `json:"propagation_samples"`
	PropagationP50 float64 `json:"propagation_p50_ms"`
	PropagationP99 float64 `json:"propagation_p99_ms"`
}

// Status reports versions, any NACK and propagation percentiles over the
// last 1,024 changes (state change → Envoy's ACK of the route table).
func (s *Server) Status() Status {
	n := s.LastNACK()
	s.mu.Lock()
	defer s.mu.Unlock()
	cnt := int(min(s.recentN, uint64(len(s.recent))))
	d := append([]time.Duration(nil), s.recent[:cnt]...)
	slices.Sort(d)
	q := func(p float64) float64 {
		if cnt == 0 {
			return 0
		}
		return float64(d[min(cnt-1, int(p*float64(cnt)))]) / float64(time.Millisecond)
	}
	return Status{Version: s.version, AckedVersion: s.acked, NACK: n, Propagations: cnt,
		PropagationP50: q(0.5), PropagationP99: q(0.99)}
}
