package xds

import (
	"regexp"
	"strings"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	celfilterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/filters/cel/v3"
	extprocfilterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	upstreamhttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
)

func weights(rc *routev3.RouteConfiguration) map[string]uint32 {
	out := map[string]uint32{}
	routes := rc.GetVirtualHosts()[0].GetRoutes()
	for _, c := range routes[len(routes)-1].GetRoute().GetWeightedClusters().GetClusters() {
		out[c.GetName()] = c.GetWeight().GetValue()
	}
	return out
}

func TestRouteTable(t *testing.T) {
	rc := RouteConfiguration(2050, 0) // 20.5 %
	if err := rc.ValidateAll(); err != nil {
		t.Fatal(err)
	}
	routes := rc.GetVirtualHosts()[0].GetRoutes()
	if len(routes) != 3 {
		t.Fatalf("%d routes", len(routes))
	}
	for i, want := range []struct{ value, cluster string }{{"canary", ClusterCanary}, {"stable", ClusterStable}} {
		h := routes[i].GetMatch().GetHeaders()[0]
		if h.GetName() != headerVersion || h.GetStringMatch().GetExact() != want.value || routes[i].GetRoute().GetCluster() != want.cluster {
			t.Fatalf("route %d does not send %s=%s to %s", i, headerVersion, want.value, want.cluster)
		}
	}
	if w := weights(rc); w[ClusterStable] != 7950 || w[ClusterCanary] != 2050 {
		t.Fatalf("weights %v", w)
	}
	if w := weights(RouteConfiguration(20000, 0)); w[ClusterCanary] != 10000 || w[ClusterStable] != 0 {
		t.Fatalf("weight not clamped to 100%%: %v", w)
	}
}

func TestBootstrap(t *testing.T) {
	o := BootstrapOptions{
		ListenerAddress: "127.0.0.1", ListenerPort: 10000, AdminPort: 9901, KnhkGRPC: "127.0.0.1:9002",
		KnhkXDS: "knhk.internal:18000", Delta: true, FailureModeAllow: false, MessageTimeout: 200 * time.Millisecond,
	}
	b, err := Bootstrap(o)
	if err != nil {
		t.Fatal(err)
	}
	y, err := BootstrapYAML(b)
	if err != nil {
		t.Fatal(err)
	}
	s := string(y)
	for _, want := range []string{"failure_mode_allow: false", "request_body_mode: NONE", "type: STRICT_DNS", "xds.cluster_name",
		"prefix: x-knhk-", "http2_protocol_options", "api_type: DELTA_GRPC", "route_config_name: knhk_routes", "cluster_name: knhk_xds",
		"max_headers_count: 120", "max_request_headers_kb: 64", "early_header_mutation_extensions"} {
		if !strings.Contains(s, want) {
			t.Errorf("bootstrap lacks %q", want)
		}
	}
	if strings.Contains(s, "circuit_breakers") || strings.Contains(s, "x-knhk-shed") {
		t.Error("a bound or a receipt refusal nobody asked for")
	}
	o.SkipExtProc = true
	b, _ = Bootstrap(o)
	y, _ = BootstrapYAML(b)
	if strings.Contains(string(y), "ext_proc.v3") {
		t.Fatal("baseline bootstrap still has ext_proc")
	}
	o.KnhkGRPC = "nope"
	if _, err := Bootstrap(o); err == nil {
		t.Fatal("bad knhk address accepted")
	}
}

// TestBootstrapBoundsKnhk: the knhk cluster's circuit breaker bounds the
// streams Envoy opens to knhk when asked to; fail-closed, Envoy's own
// reply when knhk did not answer is a 503, with x-knhk-shed: receipt when
// receipts are required; fail-open maps nothing.
func TestBootstrapBoundsKnhk(t *testing.T) {
	o := BootstrapOptions{
		ListenerAddress: "127.0.0.1", ListenerPort: 10000, AdminPort: 9901, KnhkGRPC: "127.0.0.1:9002",
		KnhkXDS: "127.0.0.1:18000", MessageTimeout: 200 * time.Millisecond, KnhkMaxRequests: 64, ReceiptsRequired: true,
	}
	parts := func(o BootstrapOptions) (*clusterv3.Cluster, *hcmv3.HttpConnectionManager) {
		t.Helper()
		b, err := Bootstrap(o)
		if err != nil {
			t.Fatal(err)
		}
		var knhk *clusterv3.Cluster
		for _, c := range b.GetStaticResources().GetClusters() {
			if c.GetName() == ClusterKnhk {
				knhk = c
			}
		}
		var hcm hcmv3.HttpConnectionManager
		if err := b.GetStaticResources().GetListeners()[0].GetFilterChains()[0].GetFilters()[0].GetTypedConfig().UnmarshalTo(&hcm); err != nil {
			t.Fatal(err)
		}
		return knhk, &hcm
	}
	mapper := func(hcm *hcmv3.HttpConnectionManager) *hcmv3.ResponseMapper {
		t.Helper()
		m := hcm.GetLocalReplyConfig().GetMappers()
		if len(m) != 1 {
			t.Fatalf("local reply mappers = %v, want one", m)
		}
		ext := m[0].GetFilter().GetExtensionFilter()
		var cel celfilterv3.ExpressionFilter
		if err := ext.GetTypedConfig().UnmarshalTo(&cel); err != nil || ext.GetName() != "envoy.access_loggers.extension_filters.cel" ||
			cel.GetExpression() != "response.code_details.startsWith('ext_proc_error')" {
			t.Fatalf("mapper filter = %v (%v)", ext, err)
		}
		if m[0].GetStatusCode().GetValue() != 503 {
			t.Fatalf("mapper status = %v, want 503", m[0].GetStatusCode())
		}
		return m[0]
	}

	knhk, hcm := parts(o)
	th := knhk.GetCircuitBreakers().GetThresholds()
	if len(th) != 1 || th[0].GetMaxRequests().GetValue() != 64 || th[0].GetMaxPendingRequests().GetValue() != 64 {
		t.Fatalf("knhk cluster thresholds = %v, want max_requests and max_pending_requests 64", th)
	}
	if h := mapper(hcm).GetHeadersToAdd(); len(h) != 1 || h[0].GetHeader().GetKey() != "x-knhk-shed" || h[0].GetHeader().GetValue() != "receipt" {
		t.Fatalf("receipts required: headers %v, want x-knhk-shed: receipt", h)
	}
	var ext extprocfilterv3.ExternalProcessor
	if err := hcm.GetHttpFilters()[0].GetTypedConfig().UnmarshalTo(&ext); err != nil || ext.GetStatusOnError() != nil {
		t.Fatalf("status_on_error = %v (%v): Envoy's other ext_proc errors must stay 500", ext.GetStatusOnError(), err)
	}

	o.ReceiptsRequired, o.KnhkMaxRequests = false, 0
	knhk, hcm = parts(o)
	if knhk.GetCircuitBreakers() != nil {
		t.Fatal("a circuit breaker nobody asked for: Envoy's default must stay")
	}
	if h := mapper(hcm).GetHeadersToAdd(); len(h) != 0 {
		t.Fatalf("receipts not required: headers %v", h)
	}

	o.FailureModeAllow = true
	if _, hcm = parts(o); hcm.GetLocalReplyConfig() != nil {
		t.Fatal("fail-open bootstrap maps replies: it serves such requests without knhk")
	}
}

func TestUpstreamClusters(t *testing.T) {
	cs, err := UpstreamClusters(Upstreams{Stable: []string{"127.0.0.1:8001"}, Canary: []string{"canary.internal:8002"}})
	if err != nil {
		t.Fatal(err)
	}
	if cs[0].GetName() != ClusterStable || cs[0].GetType().String() != "STATIC" || cs[1].GetType().String() != "STRICT_DNS" {
		t.Fatalf("%v %v", cs[0].GetType(), cs[1].GetType())
	}
	for _, c := range cs {
		if err := c.ValidateAll(); err != nil {
			t.Fatal(err)
		}
		var p upstreamhttpv3.HttpProtocolOptions
		if err := c.GetTypedExtensionProtocolOptions()["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].UnmarshalTo(&p); err != nil {
			t.Fatal(err)
		}
		// Room for x-knhk-version and x-knhk-receipt on a response Envoy took at its defaults.
		if co := p.GetCommonHttpProtocolOptions(); co.GetMaxHeadersCount().GetValue() <= 100 || co.GetMaxResponseHeadersKb().GetValue() <= 80 ||
			p.GetExplicitHttpConfig().GetHttpProtocolOptions() == nil {
			t.Fatalf("%s: protocol options %v", c.GetName(), &p)
		}
	}
	if _, err := UpstreamClusters(Upstreams{Stable: []string{"x"}}); err == nil || !strings.Contains(err.Error(), "upstreams.stable") {
		t.Fatalf("bad endpoint: %v", err)
	}
}

func TestStripMatcherSparesOnlyTheTrustedHeader(t *testing.T) {
	m := stripMatcher("x-knhk-slo-class")
	re := regexp.MustCompile("^(?:" + m.GetSafeRegex().GetRegex() + ")$") // Envoy matches the whole name
	for name, strip := range map[string]bool{
		"x-knhk-slo-class": false, "x-knhk-version": true, "x-knhk-slo-cla": true, "x-knhk-slo-classx": true,
		"x-knhk-": true, "x-knhk-s": true, "x-knhk-flags": true, "x-user-id": false, "x-knhk-slo-cl4ss": true,
	} {
		if re.MatchString(name) != strip {
			t.Errorf("%s: stripped %v, want %v", name, !strip, strip)
		}
	}
	if p := stripMatcher("x-trusted").GetPrefix(); p != "x-knhk-" {
		t.Fatalf("a trusted header outside x-knhk-* must not change the prefix rule: %v", p)
	}
}
