package xds

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/test/bufconn"
)

// testXDS is a Server behind an in-memory gRPC listener, with one snapshot.
type testXDS struct {
	srv  *Server
	conn *grpc.ClientConn
}

func newTestXDS(t *testing.T) *testXDS {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	s := NewServer(ctx, slog.New(slog.NewTextHandler(io.Discard, nil)), prometheus.NewRegistry())
	lis := bufconn.Listen(1 << 20)
	g := grpc.NewServer()
	s.Register(g)
	go func() { _ = g.Serve(lis) }()
	conn, err := grpc.NewClient("passthrough:///bufconn",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = conn.Close()
		g.Stop()
		cancel()
	})
	x := &testXDS{srv: s, conn: conn}
	x.update(t, 1000)
	return x
}

func (x *testXDS) update(t *testing.T, buckets uint32) string {
	t.Helper()
	// The canary's port moves with the weight, so clusters change too (delta
	// sends only changed resources).
	canary := fmt.Sprintf("127.0.0.1:%d", 9000+buckets/100)
	v, err := x.srv.Update(State{Upstreams: Upstreams{Stable: []string{"127.0.0.1:8001"}, Canary: []string{canary}}, CanaryBuckets: buckets})
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// fakeEnvoy speaks ADS for one resource type, SotW or delta, like Envoy:
// the node only on the first request, then an ACK or NACK per response.
type fakeEnvoy struct {
	t      *testing.T
	node   string
	typ    string
	cancel context.CancelFunc
	sotw   discoverygrpc.AggregatedDiscoveryService_StreamAggregatedResourcesClient
	delta  discoverygrpc.AggregatedDiscoveryService_DeltaAggregatedResourcesClient
	first  bool
}

// response is what the fake Envoy last received.
type response struct{ version, nonce string }

func (x *testXDS) connect(t *testing.T, node, typ string, delta bool) *fakeEnvoy {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	e := &fakeEnvoy{t: t, node: node, typ: typ, cancel: cancel, first: true}
	c := discoverygrpc.NewAggregatedDiscoveryServiceClient(x.conn)
	var err error
	if delta {
		e.delta, err = c.DeltaAggregatedResources(ctx)
	} else {
		e.sotw, err = c.StreamAggregatedResources(ctx)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.close)
	return e
}

func (e *fakeEnvoy) close() { e.cancel() }

// send sends a request: the initial one (nonce ""), an ACK of r, or, with
// nack set, a NACK of r.
func (e *fakeEnvoy) send(r response, acked string, nack string) {
	e.t.Helper()
	var node *corev3.Node
	if e.first {
		node = &corev3.Node{Id: e.node, Cluster: "edge"}
		e.first = false
	}
	var detail *status.Status
	if nack != "" {
		detail = &status.Status{Code: 3, Message: nack}
	}
	var names []string
	if e.typ == resource.RouteType {
		names = []string{RouteName}
	}
	var err error
	if e.delta != nil {
		err = e.delta.Send(&discoverygrpc.DeltaDiscoveryRequest{Node: node, TypeUrl: e.typ, ResponseNonce: r.nonce,
			ResourceNamesSubscribe: names, ErrorDetail: detail})
	} else {
		err = e.sotw.Send(&discoverygrpc.DiscoveryRequest{Node: node, TypeUrl: e.typ, VersionInfo: acked,
			ResponseNonce: r.nonce, ResourceNames: names, ErrorDetail: detail})
	}
	if err != nil {
		e.t.Fatal(err)
	}
}

func (e *fakeEnvoy) recv() response {
	e.t.Helper()
	if e.delta != nil {
		r, err := e.delta.Recv()
		if err != nil {
			e.t.Fatal(err)
		}
		return response{r.GetSystemVersionInfo(), r.GetNonce()}
	}
	r, err := e.sotw.Recv()
	if err != nil {
		e.t.Fatal(err)
	}
	return response{r.GetVersionInfo(), r.GetNonce()}
}

// subscribe sends the initial request and returns the first response.
func (e *fakeEnvoy) subscribe() response {
	e.send(response{}, "", "")
	return e.recv()
}

func (e *fakeEnvoy) ack(r response) { e.send(r, r.version, "") }

// nack rejects r; SotW carries the last accepted version, as Envoy does.
func (e *fakeEnvoy) nack(r response, lastGood, msg string) { e.send(r, lastGood, msg) }

func poll(t *testing.T, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func envoyStatus(s *Server, node string) (EnvoyStatus, bool) {
	for _, e := range s.Status().Envoys {
		if e.Node == node {
			return e, true
		}
	}
	return EnvoyStatus{}, false
}

func ackedBy(s *Server, node, typ string) uint64 {
	e, _ := envoyStatus(s, node)
	if typ == resource.RouteType {
		return e.AckedRouteVersion
	}
	return e.AckedClusterVersion
}

func modes() map[string]bool { return map[string]bool{"sotw": false, "delta": true} }

// TestNACKIsPerEnvoy: one Envoy's ACK does not clear another's NACK, the
// readiness error names the Envoy that rejected, the rejected version is
// not sent again (SotW would loop), and the NACK clears when that Envoy
// accepts a newer version.
func TestNACKIsPerEnvoy(t *testing.T) {
	for name, delta := range modes() {
		t.Run(name, func(t *testing.T) {
			x := newTestXDS(t)
			bad := x.connect(t, "envoy-bad", resource.ClusterType, delta)
			good := x.connect(t, "envoy-good", resource.ClusterType, delta)
			rb, rg := bad.subscribe(), good.subscribe()
			bad.nack(rb, "", "cluster knhk_canary: malformed IP address: 10.0.0.300")
			poll(t, "the NACK", func() bool { return x.srv.Healthy() != nil })
			good.ack(rg)
			poll(t, "the good Envoy's ACK", func() bool { return ackedBy(x.srv, "envoy-good", resource.ClusterType) == 1 })

			err := x.srv.Healthy()
			if err == nil {
				t.Fatal("envoy-good's ACK cleared envoy-bad's NACK")
			}
			if !strings.Contains(err.Error(), `"envoy-bad"`) || strings.Contains(err.Error(), "envoy-good") ||
				!strings.Contains(err.Error(), "10.0.0.300") {
				t.Fatalf("readiness error does not name the rejecting Envoy and its reason: %v", err)
			}
			st := x.srv.Status()
			if st.NACK == nil || st.NACK.Node != "envoy-bad" || st.NACK.Version != "1" {
				t.Fatalf("status nack %+v, want envoy-bad rejecting version 1", st.NACK)
			}
			if e, _ := envoyStatus(x.srv, "envoy-good"); len(e.NACKs) != 0 {
				t.Fatalf("envoy-good shows a NACK: %+v", e.NACKs)
			}
			if e, _ := envoyStatus(x.srv, "envoy-bad"); len(e.NACKs) != 1 || e.AckedClusterVersion != 0 || e.Cluster != "edge" {
				t.Fatalf("envoy-bad: %+v", e)
			}

			// A newer version, accepted by the Envoy that rejected the old one.
			v2 := x.update(t, 2000)
			r2 := bad.recv()
			if r2.version != v2 {
				t.Fatalf("pushed version %q, want %q", r2.version, v2)
			}
			bad.ack(r2)
			poll(t, "the NACK to clear", func() bool { return x.srv.Healthy() == nil })
			if got := ackedBy(x.srv, "envoy-bad", resource.ClusterType); got != 2 {
				t.Fatalf("envoy-bad acked %d, want 2", got)
			}
		})
	}
}

// TestNACKStaysUntilANewerVersion: re-ACKing an older version (SotW's
// version_info after a NACK) does not clear the rejection.
func TestNACKStaysUntilANewerVersion(t *testing.T) {
	x := newTestXDS(t)
	e := x.connect(t, "envoy-a", resource.ClusterType, false)
	r1 := e.subscribe()
	e.ack(r1)
	x.update(t, 2000)
	r2 := e.recv()
	e.nack(r2, r1.version, "rejected")
	poll(t, "the NACK", func() bool { return x.srv.Healthy() != nil })
	if n := x.srv.Status().NACK; n == nil || n.Version != r2.version {
		t.Fatalf("nack %+v, want version %s", n, r2.version)
	}
	if got := ackedBy(x.srv, "envoy-a", resource.ClusterType); got != 1 {
		t.Fatalf("acked %d after a NACK of 2, want 1", got)
	}
}

// TestStreamCloseForgetsTheEnvoy: an Envoy's state, NACK included, goes
// when its last stream closes, not before.
func TestStreamCloseForgetsTheEnvoy(t *testing.T) {
	for name, delta := range modes() {
		t.Run(name, func(t *testing.T) {
			x := newTestXDS(t)
			a := x.connect(t, "envoy-a", resource.ClusterType, delta)
			a2 := x.connect(t, "envoy-a", resource.RouteType, delta) // a second stream of the same node
			b := x.connect(t, "envoy-b", resource.ClusterType, delta)
			ra, ra2, rb := a.subscribe(), a2.subscribe(), b.subscribe()
			a.nack(ra, "", "rejected")
			a2.ack(ra2)
			b.ack(rb)
			poll(t, "both Envoys", func() bool {
				return len(x.srv.Status().Envoys) == 2 && ackedBy(x.srv, "envoy-a", resource.RouteType) == 1 &&
					ackedBy(x.srv, "envoy-b", resource.ClusterType) == 1 && x.srv.Healthy() != nil
			})
			if e, _ := envoyStatus(x.srv, "envoy-a"); e.Streams != 2 {
				t.Fatalf("envoy-a: %d streams, want 2", e.Streams)
			}
			a.close()
			poll(t, "one stream of envoy-a to close", func() bool {
				e, ok := envoyStatus(x.srv, "envoy-a")
				return ok && e.Streams == 1
			})
			if x.srv.Healthy() == nil {
				t.Fatal("envoy-a still has a stream open; its NACK must stay")
			}
			a2.close()
			poll(t, "envoy-a to be forgotten", func() bool {
				_, ok := envoyStatus(x.srv, "envoy-a")
				return !ok
			})
			if err := x.srv.Healthy(); err != nil {
				t.Fatalf("a disconnected Envoy still fails readiness: %v", err)
			}
			st := x.srv.Status()
			if len(st.Envoys) != 1 || st.Envoys[0].Node != "envoy-b" || st.NACK != nil {
				t.Fatalf("status after close: %+v", st)
			}
		})
	}
}

// TestAckedRouteVersionIsTheSlowestEnvoy: acked_route_version is the route
// version every connected Envoy has accepted, and propagation is measured.
func TestAckedRouteVersionIsTheSlowestEnvoy(t *testing.T) {
	for name, delta := range modes() {
		t.Run(name, func(t *testing.T) {
			x := newTestXDS(t)
			a := x.connect(t, "envoy-a", resource.RouteType, delta)
			b := x.connect(t, "envoy-b", resource.RouteType, delta)
			ra, rb := a.subscribe(), b.subscribe()
			a.ack(ra)
			b.ack(rb)
			poll(t, "both ACKs", func() bool { return x.srv.Status().AckedVersion == 1 })
			x.update(t, 3000)
			ra = a.recv()
			rb = b.recv()
			a.ack(ra)
			poll(t, "envoy-a's ACK", func() bool { return ackedBy(x.srv, "envoy-a", resource.RouteType) == 2 })
			if st := x.srv.Status(); st.AckedVersion != 1 || st.Version != 2 {
				t.Fatalf("one of two Envoys on version 2: acked_route_version %d (want 1), version %d", st.AckedVersion, st.Version)
			}
			b.ack(rb)
			poll(t, "envoy-b's ACK", func() bool { return x.srv.Status().AckedVersion == 2 })
			if st := x.srv.Status(); st.Propagations != 2 {
				t.Fatalf("%d propagation samples, want 2 (one change, two Envoys)", st.Propagations)
			}
		})
	}
}

// TestTrackedStreamsAreBounded: streams past the cap are refused, so a
// client cannot grow the server's memory without bound.
func TestTrackedStreamsAreBounded(t *testing.T) {
	x := newTestXDS(t)
	x.srv.maxStreams = 2
	for i := range 2 {
		x.connect(t, fmt.Sprint("envoy-", i), resource.ClusterType, i == 1).subscribe()
	}
	over := x.connect(t, "envoy-over", resource.ClusterType, false)
	// The server may close the stream before the request is written (Send
	// then says io.EOF); Recv carries the status either way.
	_ = over.sotw.Send(&discoverygrpc.DiscoveryRequest{Node: &corev3.Node{Id: "envoy-over"}, TypeUrl: resource.ClusterType})
	if _, err := over.sotw.Recv(); err == nil || !strings.Contains(err.Error(), "streams") {
		t.Fatalf("stream over the cap: %v, want a refusal", err)
	}
	if n := len(x.srv.Status().Envoys); n != 2 {
		t.Fatalf("%d Envoys tracked, want 2", n)
	}
}

// TestLongNodeIDIsRefused: a node id is stored, so its size is bounded.
func TestLongNodeIDIsRefused(t *testing.T) {
	x := newTestXDS(t)
	e := x.connect(t, strings.Repeat("n", maxNodeBytes+1), resource.ClusterType, true)
	e.send(response{}, "", "")
	if _, err := e.delta.Recv(); err == nil || !strings.Contains(err.Error(), "node id") {
		t.Fatalf("over-long node id: %v, want a refusal", err)
	}
}
