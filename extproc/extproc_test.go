package extproc

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/knhk/knhk/pkg/admission"
	"github.com/knhk/knhk/pkg/canary"
	"github.com/knhk/knhk/pkg/capacity"
)

var clusters = Clusters{Stable: "knhk_stable", Canary: "knhk_canary"}

func newServer(t testing.TB, weight float64) (*Server, *prometheus.Registry) {
	t.Helper()
	r, err := canary.NewRouter("salt", weight, []canary.Source{{Kind: canary.FromHeader, Name: "x-user-id"}})
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	return NewServer(r, clusters, NewMetrics(reg), slog.New(slog.DiscardHandler), nil), reg
}

// dial serves s over an in-memory gRPC connection: the same framing and
// status codes Envoy sees, without a network.
func dial(t *testing.T, s *Server) extprocv3.ExternalProcessorClient {
	t.Helper()
	lis := bufconn.Listen(1 << 20)
	g := grpc.NewServer()
	extprocv3.RegisterExternalProcessorServer(g, s)
	go func() { _ = g.Serve(lis) }()
	t.Cleanup(g.Stop)
	conn, err := grpc.NewClient("passthrough:///bufnet",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return extprocv3.NewExternalProcessorClient(conn)
}

func headers(kv ...string) *corev3.HeaderMap {
	m := &corev3.HeaderMap{}
	for i := 0; i+1 < len(kv); i += 2 {
		m.Headers = append(m.Headers, &corev3.HeaderValue{Key: kv[i], RawValue: []byte(kv[i+1])})
	}
	return m
}

func reqHeaders(kv ...string) *extprocv3.ProcessingRequest {
	return &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestHeaders{
		RequestHeaders: &extprocv3.HttpHeaders{Headers: headers(kv...)},
	}}
}

func respHeaders(cluster string) *extprocv3.ProcessingRequest {
	r := &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseHeaders{
		ResponseHeaders: &extprocv3.HttpHeaders{Headers: headers(":status", "200")},
	}}
	if cluster != "" {
		st, _ := structpb.NewStruct(map[string]any{ClusterAttribute: cluster})
		r.Attributes = map[string]*structpb.Struct{"envoy.filters.http.ext_proc": st}
	}
	return r
}

func versionSet(m *extprocv3.HeaderMutation) (string, bool) {
	for _, h := range m.GetSetHeaders() {
		if h.GetHeader().GetKey() == HeaderVersion {
			return string(h.GetHeader().GetRawValue()), true
		}
	}
	return "", false
}

// userOn finds a user id that the split sends to want.
func userOn(t *testing.T, s *Server, want canary.Version) string {
	for i := range 10000 {
		u := "u" + strconv.Itoa(i)
		if s.Router().Splitter().Decide(u) == want {
			return u
		}
	}
	t.Fatal("no user found")
	return ""
}

func TestRequestHeadersRouteAndStrip(t *testing.T) {
	s, reg := newServer(t, 50)
	c := dial(t, s)
	stableUser := userOn(t, s, canary.Stable)

	stream, err := c.Process(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(reqHeaders(":path", "/", "x-user-id", stableUser,
		"x-knhk-version", "canary", "x-knhk-flags", "admin", "x-knhk-flags", "again", "x-other", "1")); err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	common := resp.GetRequestHeaders().GetResponse()
	if !common.GetClearRouteCache() {
		t.Fatal("route cache not cleared: Envoy would keep the route picked before the header was set")
	}
	if v, ok := versionSet(common.GetHeaderMutation()); !ok || v != "stable" {
		t.Fatalf("x-knhk-version = %q (%v), want stable despite the client's canary", v, ok)
	}
	if got := common.GetHeaderMutation().GetRemoveHeaders(); len(got) != 1 || got[0] != "x-knhk-flags" {
		t.Fatalf("removed %v, want [x-knhk-flags] once (x-knhk-version is overwritten)", got)
	}

	// Response phase: the attribute names the cluster that served it.
	if err := stream.Send(respHeaders("knhk_stable")); err != nil {
		t.Fatal(err)
	}
	resp, err = stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if v, _ := versionSet(resp.GetResponseHeaders().GetResponse().GetHeaderMutation()); v != "stable" {
		t.Fatalf("response x-knhk-version = %q", v)
	}
	_ = stream.CloseSend()
	if _, err := stream.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("stream end: %v", err)
	}
	if got := testutil.ToFloat64(s.metrics.decisions[canary.Stable]); got != 1 {
		t.Fatalf("stable decisions = %v", got)
	}
	if n, _ := testutil.GatherAndCount(reg, "knhk_canary_decisions_total"); n != 3 {
		t.Fatalf("decision series = %d, want 3 (none, stable, canary)", n)
	}
}

func TestNoKeyStripsAndLeavesRoutingToEnvoy(t *testing.T) {
	s, _ := newServer(t, 50)
	stream, err := dial(t, s).Process(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	_ = stream.Send(reqHeaders(":path", "/", "x-knhk-version", "canary"))
	resp, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	m := resp.GetRequestHeaders().GetResponse().GetHeaderMutation()
	if _, ok := versionSet(m); ok {
		t.Fatal("routing header set without a sticky key")
	}
	if got := m.GetRemoveHeaders(); len(got) != 1 || got[0] != HeaderVersion {
		t.Fatalf("client's x-knhk-version not removed: %v", got)
	}
	// Served by the canary through weighted clusters: the response says so.
	_ = stream.Send(respHeaders("knhk_canary"))
	resp, err = stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if v, _ := versionSet(resp.GetResponseHeaders().GetResponse().GetHeaderMutation()); v != "canary" {
		t.Fatalf("response x-knhk-version = %q, want canary from the cluster attribute", v)
	}
}

func TestUnexpectedMessagesGetGRPCErrors(t *testing.T) {
	cases := map[string][]*extprocv3.ProcessingRequest{
		"empty":           {{}},
		"body":            {{Request: &extprocv3.ProcessingRequest_RequestBody{RequestBody: &extprocv3.HttpBody{Body: []byte("x")}}}},
		"trailers":        {{Request: &extprocv3.ProcessingRequest_ResponseTrailers{ResponseTrailers: &extprocv3.HttpTrailers{}}}},
		"headers twice":   {reqHeaders("x-user-id", "a"), reqHeaders("x-user-id", "a")},
		"response twice":  {respHeaders(""), respHeaders("")},
		"nil header list": {{Request: &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: &extprocv3.HttpHeaders{}}}, {Request: &extprocv3.ProcessingRequest_RequestHeaders{}}},
	}
	s, _ := newServer(t, 20)
	c := dial(t, s)
	for name, msgs := range cases {
		t.Run(name, func(t *testing.T) {
			stream, err := c.Process(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			var last error
			for _, m := range msgs {
				if err := stream.Send(m); err != nil {
					break
				}
				if _, last = stream.Recv(); last != nil {
					break
				}
			}
			if status.Code(last) != codes.InvalidArgument {
				t.Fatalf("got %v, want InvalidArgument", last)
			}
		})
	}
}

func TestObservabilityModeSendsNothing(t *testing.T) {
	s, _ := newServer(t, 20)
	st := stream{router: s.Router()}
	r := reqHeaders("x-user-id", "a")
	r.ObservabilityMode = true
	resp, err := s.handle(&st, r)
	if err != nil || resp != nil {
		t.Fatalf("observability mode answered: %v %v", resp, err)
	}
}

func TestRouterSwapKeepsInflightStreams(t *testing.T) {
	s, _ := newServer(t, 0)
	st := stream{router: s.Router()}
	r100, _ := canary.NewRouter("salt", 100, []canary.Source{{Kind: canary.FromHeader, Name: "x-user-id"}})
	s.SetRouter(r100)
	resp, _ := s.handle(&st, reqHeaders("x-user-id", "a"))
	if v, _ := versionSet(resp.GetRequestHeaders().GetResponse().GetHeaderMutation()); v != "stable" {
		t.Fatalf("in-flight stream changed router mid-request: %s", v)
	}
	st2 := stream{router: s.Router()}
	resp, _ = s.handle(&st2, reqHeaders("x-user-id", "a"))
	if v, _ := versionSet(resp.GetRequestHeaders().GetResponse().GetHeaderMutation()); v != "canary" {
		t.Fatalf("new stream did not pick up the new router: %s", v)
	}
}

// BenchmarkRequestHeaders measures the request-headers decision in process:
// strip, sticky key, split, mutation. No gRPC, no network.
func BenchmarkRequestHeaders(b *testing.B) {
	s, _ := newServer(b, 20)
	reqs := make([]*extprocv3.ProcessingRequest, 256)
	for i := range reqs {
		reqs[i] = reqHeaders(":method", "GET", ":path", "/api/cart", ":authority", "shop.example",
			"user-agent", "bench", "accept", "*/*", "x-request-id", "r-"+strconv.Itoa(i),
			"x-user-id", "user-"+strconv.Itoa(i), "x-knhk-version", "canary")
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		st := stream{router: s.Router()}
		if _, err := s.handle(&st, reqs[i&255]); err != nil {
			b.Fatal(err)
		}
	}
}

type recorder struct {
	mu  sync.Mutex
	got []obs
}

func (r *recorder) snapshot() []obs {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]obs(nil), r.got...)
}

type obs struct {
	v      canary.Version
	failed bool
}

func (r *recorder) Observe(v canary.Version, failed bool, _ time.Duration) {
	r.mu.Lock()
	r.got = append(r.got, obs{v, failed})
	r.mu.Unlock()
}

// TestObservations: upstream outcomes count against the version that
// served them; a reset and a local reply (Envoy answered before choosing any
// upstream) count against nobody, since any client can cause either.
func TestObservations(t *testing.T) {
	s, reg := newServer(t, 50)
	rec := &recorder{}
	s.observer = rec
	c := dial(t, s)
	canaryUser := userOn(t, s, canary.Canary)

	run := func(status, cluster string, respond bool) {
		stream, err := c.Process(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		_ = stream.Send(reqHeaders("x-user-id", canaryUser))
		if _, err := stream.Recv(); err != nil {
			t.Fatal(err)
		}
		if respond {
			r := respHeaders(cluster)
			if cluster == "" { // attributes were asked for, but Envoy chose no cluster
				st, _ := structpb.NewStruct(map[string]any{PeerURIAttribute: ""})
				r.Attributes = map[string]*structpb.Struct{"envoy.filters.http.ext_proc": st}
			}
			r.GetResponseHeaders().Headers = headers(":status", status)
			_ = stream.Send(r)
			if _, err := stream.Recv(); err != nil {
				t.Fatal(err)
			}
		}
		_ = stream.CloseSend()
		_, _ = stream.Recv()
	}
	run("200", "knhk_canary", true)
	run("503", "knhk_canary", true)
	run("", "", false)   // reset: no response headers
	run("500", "", true) // local reply: e.g. a header limit, before routing
	run("503", "knhk_canary", true)
	deadline := time.Now().Add(5 * time.Second)
	for testutil.ToFloat64(s.metrics.resets) < 1 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond) // poll: the stream's deferred accounting runs after EOF
	}
	want := []obs{{canary.Canary, false}, {canary.Canary, true}, {canary.Canary, true}}
	got := rec.snapshot()
	if len(got) != len(want) {
		t.Fatalf("observations %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("observations %v, want %v", got, want)
		}
	}
	if n := testutil.ToFloat64(s.metrics.resets); n != 1 {
		t.Errorf("unanswered requests %v, want 1", n)
	}

	if n := testutil.ToFloat64(s.metrics.localReplies); n != 1 {
		t.Errorf("local replies %v, want 1", n)
	}
	_ = reg
}

func TestStatusCode(t *testing.T) {
	for in, want := range map[string]int{"200": 200, "503": 503, "": 0, "20x": 0, "2000": 0} {
		if got := statusCode(headers(":status", in).GetHeaders()); got != want {
			t.Errorf("%q → %d, want %d", in, got, want)
		}
	}
}

func TestServedVersionFromClusterName(t *testing.T) {
	for name, want := range map[string]canary.Version{
		"knhk_stable": canary.Stable, "knhk_canary": canary.Canary,
		"outbound|8080|canary|checkout.shop.svc.cluster.local": canary.Canary,
		"outbound|8080|stable|checkout.shop.svc.cluster.local": canary.Stable,
		"outbound|8080||checkout.shop.svc.cluster.local":       canary.None,
		"inbound|8080||":  canary.None,
		"outbound|canary": canary.None,
		"":                canary.None,
	} {
		if got := clusters.version(name); got != want {
			t.Errorf("%q: %v, want %v", name, got, want)
		}
	}
}

// TestCapacitySeesClassesWithoutAdmission: with admission off, capacity
// planning still gets every class's demand and latency; its per-class
// figures once read 0 unless admission was on.
func TestCapacitySeesClassesWithoutAdmission(t *testing.T) {
	s, _ := newServer(t, 0)
	cl, err := admission.NewClassifier(nil, admission.W1, false)
	if err != nil {
		t.Fatal(err)
	}
	tr := capacity.NewTracker(capacity.Config{})
	s.SetAdmission(&Admission{Enabled: false, Classifier: cl, Tracker: tr, Key: CapacityKey{Kind: "path"}})
	c := dial(t, s)
	for range 20 {
		stream, err := c.Process(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		_ = stream.Send(reqHeaders(":method", "GET", ":path", "/a", "x-user-id", "u"))
		if _, err := stream.Recv(); err != nil {
			t.Fatal(err)
		}
		_ = stream.Send(respHeaders("knhk_stable"))
		if _, err := stream.Recv(); err != nil {
			t.Fatal(err)
		}
		_ = stream.CloseSend()
		_, _ = stream.Recv()
	}
	var w1 capacity.ClassReport
	err = pollUntil(5*time.Second, func() bool {
		for _, cr := range tr.Report(time.Now(), 10, 1).Classes {
			if cr.Class == "W1" {
				w1 = cr
			}
		}
		return w1.OfferedRPS > 0 && w1.MeanLatencyMs > 0
	})
	if err != nil {
		t.Fatalf("W1 with admission off: %+v", w1)
	}
}

func pollUntil(d time.Duration, ok func() bool) error {
	deadline := time.Now().Add(d)
	for !ok() {
		if time.Now().After(deadline) {
			return errors.New("deadline passed")
		}
		time.Sleep(5 * time.Millisecond)
	}
	return nil
}
