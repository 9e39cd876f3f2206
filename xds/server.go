package xds

import (
	"context"
	"fmt"
	"log/slog"
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
// table, whatever the node id. ACKs and NACKs are still tracked per node.
type allNodes struct{}

func (allNodes) ID(*corev3.Node) string { return "knhk" }

// Server is the embedded ADS server (SotW and delta on the same port).
type Server struct {
	log   *slog.Logger
	cache cache.SnapshotCache
	ads   serverv3.Server

	// updateMu serialises Update so snapshots reach the cache in version
	// order. Lock order: updateMu, then mu; go-control-plane's callbacks
	// take only mu.
	updateMu sync.Mutex

	// mu guards everything below. It is held only for map and counter
	// updates: nothing is logged and no other code is called under it.
	mu         sync.Mutex
	version    uint64
	sentAt     map[uint64]time.Time // snapshot version → when it was set
	streams    map[streamKey]*stream
	envoys     map[string]*envoy // by node id; an entry lives while it has a stream
	maxStreams int
	recent     [1024]time.Duration // last propagation times, a ring
	recentN    uint64

	snapshots prometheus.Counter
	nacks     prometheus.Counter
	acks      prometheus.Counter
	propagate prometheus.Histogram
	versionG  prometheus.Gauge
}

// NewServer creates the server; metrics register on reg.
func NewServer(ctx context.Context, log *slog.Logger, reg prometheus.Registerer) *Server {
	s := &Server{
		log:        log,
		sentAt:     map[uint64]time.Time{},
		streams:    map[streamKey]*stream{},
		envoys:     map[string]*envoy{},
		maxStreams: defaultMaxStreams,
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
			Help:    "Time from a state change to an Envoy's ACK of the route table carrying it (one sample per connected Envoy).",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
		}),
		versionG: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "knhk_xds_snapshot_version", Help: "Version of the latest xDS snapshot.",
		}),
	}
	reg.MustRegister(s.snapshots, s.nacks, s.acks, s.propagate, s.versionG)
	s.cache = cache.NewSnapshotCache(true, allNodes{}, goControlPlaneLogger{log})
	// SotW and delta number their streams independently, hence the key's mode.
	s.ads = serverv3.NewServer(ctx, s.cache, serverv3.CallbackFuncs{
		StreamOpenFunc:      func(_ context.Context, id int64, _ string) error { return s.openStream(streamKey{id: id}) },
		StreamClosedFunc:    func(id int64, _ *corev3.Node) { s.closeStream(streamKey{id: id}) },
		DeltaStreamOpenFunc: func(_ context.Context, id int64, _ string) error { return s.openStream(streamKey{delta: true, id: id}) },
		DeltaStreamClosedFunc: func(id int64, _ *corev3.Node) {
			s.closeStream(streamKey{delta: true, id: id})
		},
		StreamResponseFunc: func(_ context.Context, id int64, _ *discoverygrpc.DiscoveryRequest, r *discoverygrpc.DiscoveryResponse) {
			s.sent(streamKey{id: id}, r.GetNonce(), r.GetVersionInfo())
		},
		StreamDeltaResponseFunc: func(id int64, _ *discoverygrpc.DeltaDiscoveryRequest, r *discoverygrpc.DeltaDiscoveryResponse) {
			s.sent(streamKey{delta: true, id: id}, r.GetNonce(), r.GetSystemVersionInfo())
		},
		StreamRequestFunc: func(id int64, r *discoverygrpc.DiscoveryRequest) error {
			rejected, err := s.received(streamKey{id: id}, request{node: r.GetNode(), typeURL: r.GetTypeUrl(),
				nonce: r.GetResponseNonce(), version: r.GetVersionInfo(), nack: r.GetErrorDetail()})
			if rejected != "" {
				// A SotW NACK carries the last good version, so the cache would
				// resend the rejected one at once, and Envoy reject it again, in
				// a loop. Marking it seen makes the cache wait for a newer one.
				r.VersionInfo = rejected
			}
			return err
		},
		StreamDeltaRequestFunc: func(id int64, r *discoverygrpc.DeltaDiscoveryRequest) error {
			_, err := s.received(streamKey{delta: true, id: id}, request{node: r.GetNode(), typeURL: r.GetTypeUrl(),
				nonce: r.GetResponseNonce(), nack: r.GetErrorDetail()})
			return err
		},
	})
	return s
}

// Register adds ADS to a gRPC server.
func (s *Server) Register(g *grpc.Server) {
	discoverygrpc.RegisterAggregatedDiscoveryServiceServer(g, s.ads)
}

// Update publishes a new snapshot for st, shared by every Envoy; every call
// is a new version.
func (s *Server) Update(st State) (string, error) {
	clusters, err := UpstreamClusters(st.Upstreams)
	if err != nil {
		return "", err
	}
	s.updateMu.Lock()
	defer s.updateMu.Unlock()
	s.mu.Lock()
	next := s.version + 1
	s.mu.Unlock()
	v := strconv.FormatUint(next, 10)
	snap, err := cache.NewSnapshot(v, map[resource.Type][]types.Resource{
		resource.ClusterType: {clusters[0], clusters[1]},
		resource.RouteType:   {RouteConfiguration(st.CanaryBuckets, st.RouteTimeout)},
	})
	if err != nil {
		return "", err
	}
	now := time.Now()
	s.mu.Lock()
	s.version = next
	s.sentAt[next] = now // before SetSnapshot: an ACK can arrive before it returns
	for k, t := range s.sentAt {
		if now.Sub(t) > time.Minute { // bound the map if Envoy never ACKs
			delete(s.sentAt, k)
		}
	}
	s.mu.Unlock()
	if err := s.cache.SetSnapshot(context.Background(), "knhk", snap); err != nil {
		s.mu.Lock()
		s.version = next - 1 // nothing was published; updateMu kept others out
		delete(s.sentAt, next)
		s.mu.Unlock()
		return "", fmt.Errorf("xds snapshot %s: %w", v, err)
	}
	s.snapshots.Inc()
	s.versionG.Set(float64(next))
	s.log.Debug("xds snapshot", "version", v, "canary_buckets", st.CanaryBuckets)
	return v, nil
}

// goControlPlaneLogger routes go-control-plane's logs to slog at debug
// level (its info logs fire on every request).
type goControlPlaneLogger struct{ l *slog.Logger }

func (g goControlPlaneLogger) Debugf(f string, a ...any) { g.l.Debug(fmt.Sprintf(f, a...)) }
func (g goControlPlaneLogger) Infof(f string, a ...any)  { g.l.Debug(fmt.Sprintf(f, a...)) }
func (g goControlPlaneLogger) Warnf(f string, a ...any)  { g.l.Warn(fmt.Sprintf(f, a...)) }
func (g goControlPlaneLogger) Errorf(f string, a ...any) { g.l.Error(fmt.Sprintf(f, a...)) }
