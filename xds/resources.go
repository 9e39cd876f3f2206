// Package xds turns knhk's state into Envoy resources: the clusters of each
// version, the route table of DESIGN.md and, for `knhk envoy-config`, a
// whole bootstrap. It is the only place besides extproc/ that knows Envoy's
// protos.
package xds

import (
	"fmt"
	"net"
	"regexp"
	"strconv"
	"strings"
	"time"

	accesslogv3 "github.com/envoyproxy/go-control-plane/envoy/config/accesslog/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	mutationv3 "github.com/envoyproxy/go-control-plane/envoy/config/common/mutation_rules/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	celfilterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/filters/cel/v3"
	adaptivev3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/adaptive_concurrency/v3"
	extprocfilterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	earlymutationv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/http/early_header_mutation/header_mutation/v3"
	upstreamhttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// Resource names shared by the bootstrap, the xDS snapshot and extproc.
const (
	ClusterStable = "knhk_stable"
	ClusterCanary = "knhk_canary"
	ClusterKnhk   = "knhk_grpc"
	ClusterXDS    = "knhk_xds"
	RouteName     = "knhk_routes"
	ListenerName  = "knhk_ingress"

	headerVersion = "x-knhk-version"
	headerPrefix  = "x-knhk-"
	headerShed    = "x-knhk-shed"
	// clusterAttribute is read back by extproc to learn the serving version.
	clusterAttribute = "xds.cluster_name"
	routeAttribute   = "xds.route_name"
	bucketsTotal     = 10000
)

// Header limits. Envoy's codec takes a request at up to the HCM's limits,
// then ext_proc checks the headers after knhk's mutations against the same
// limits (a response against its cluster's) and answers 500 when they are
// exceeded: "After mutation, the total header count 105 exceeds the count
// limit 100" for 98 client header lines at the defaults: Envoy's own
// (pseudo-headers, x-forwarded-proto, x-request-id) and knhk's (x-knhk-version,
// -slo-class, -flags) added 7; on responses :status,
// x-envoy-upstream-service-time, x-knhk-version and x-knhk-receipt. So the
// limits sit above Envoy's defaults (100 headers, 60 KiB of request
// headers, 80 KiB of HTTP/1 response headers) and what Envoy accepts at its
// defaults is still served. Envoy has no separate limit for the client's
// part, so it also takes up to 120 lines from a client, and one with more
// than about 113 still fails the check.
// knhk's ext_proc answers a request that would still overflow them with
// its own 431 (and a response with 502), receipt included (HeaderLimits).
const (
	headerCountHeadroom  = 20
	headerKBHeadroom     = 4
	maxHeadersCount      = 100 + headerCountHeadroom
	maxRequestHeadersKB  = 60 + headerKBHeadroom
	maxResponseHeadersKB = 80 + headerKBHeadroom
)

// HeaderLimits are the limits the generated bootstrap gives Envoy.
func HeaderLimits() struct{ Count, RequestBytes, ResponseBytes int } {
	return struct{ Count, RequestBytes, ResponseBytes int }{maxHeadersCount, maxRequestHeadersKB * 1024, maxResponseHeadersKB * 1024}
}

// Upstreams are the endpoints of each version (host:port).
type Upstreams struct {
	Stable, Canary []string
}

// UpstreamClusters returns the stable and canary clusters (HTTP/1.1, with
// headroom for knhk's response headers).
func UpstreamClusters(u Upstreams) ([]*clusterv3.Cluster, error) {
	s, err := endpointCluster(ClusterStable, u.Stable, versionProtocol())
	if err != nil {
		return nil, fmt.Errorf("upstreams.stable: %w", err)
	}
	c, err := endpointCluster(ClusterCanary, u.Canary, versionProtocol())
	if err != nil {
		return nil, fmt.Errorf("upstreams.canary: %w", err)
	}
	return []*clusterv3.Cluster{s, c}, nil
}

// KnhkCluster is the HTTP/2 cluster Envoy uses to reach knhk's gRPC
// listener. maxRequests bounds the ext_proc streams Envoy keeps open to
// knhk at once (its circuit breaker): past it, Envoy answers a request at
// once instead of queueing it behind a saturated knhk.
func KnhkCluster(addr string, maxRequests uint32) (*clusterv3.Cluster, error) {
	c, err := endpointCluster(ClusterKnhk, []string{addr}, grpcProtocol())
	if err != nil {
		return nil, err
	}
	if maxRequests > 0 {
		c.CircuitBreakers = &clusterv3.CircuitBreakers{Thresholds: []*clusterv3.CircuitBreakers_Thresholds{{
			Priority:           corev3.RoutingPriority_DEFAULT,
			MaxRequests:        wrapperspb.UInt32(maxRequests),
			MaxPendingRequests: wrapperspb.UInt32(maxRequests),
		}}}
	}
	return c, nil
}

// grpcProtocol is HTTP/2, for knhk's gRPC listeners.
func grpcProtocol() *upstreamhttpv3.HttpProtocolOptions {
	return &upstreamhttpv3.HttpProtocolOptions{
		UpstreamProtocolOptions: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig_{
			ExplicitHttpConfig: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig{
				ProtocolConfig: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{
					Http2ProtocolOptions: &corev3.Http2ProtocolOptions{},
				},
			},
		},
	}
}

// versionProtocol is HTTP/1.1 (Envoy's default) with response header
// limits that leave room for knhk's response headers.
func versionProtocol() *upstreamhttpv3.HttpProtocolOptions {
	return &upstreamhttpv3.HttpProtocolOptions{
		CommonHttpProtocolOptions: &corev3.HttpProtocolOptions{
			MaxHeadersCount:      wrapperspb.UInt32(maxHeadersCount),
			MaxResponseHeadersKb: wrapperspb.UInt32(maxResponseHeadersKB),
		},
		UpstreamProtocolOptions: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig_{
			ExplicitHttpConfig: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig{
				ProtocolConfig: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig_HttpProtocolOptions{
					HttpProtocolOptions: &corev3.Http1ProtocolOptions{},
				},
			},
		},
	}
}

func endpointCluster(name string, addrs []string, protocol *upstreamhttpv3.HttpProtocolOptions) (*clusterv3.Cluster, error) {
	lbEndpoints := make([]*endpointv3.LbEndpoint, 0, len(addrs))
	dns := false
	for _, a := range addrs {
		host, portStr, err := net.SplitHostPort(a)
		if err != nil {
			return nil, fmt.Errorf("%q is not host:port", a)
		}
		port, err := strconv.ParseUint(portStr, 10, 16)
		if err != nil {
			return nil, fmt.Errorf("%q: bad port", a)
		}
		if !looksLikeIP(host) {
			dns = true
		}
		lbEndpoints = append(lbEndpoints, &endpointv3.LbEndpoint{
			HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{
				Address: socketAddress(host, uint32(port)),
			}},
		})
	}
	typ := clusterv3.Cluster_STATIC
	if dns {
		typ = clusterv3.Cluster_STRICT_DNS
	}
	return &clusterv3.Cluster{
		Name:                 name,
		ConnectTimeout:       durationpb.New(time.Second),
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: typ},
		LoadAssignment: &endpointv3.ClusterLoadAssignment{
			ClusterName: name,
			Endpoints:   []*endpointv3.LocalityLbEndpoints{{LbEndpoints: lbEndpoints}},
		},
		TypedExtensionProtocolOptions: map[string]*anypb.Any{
			"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": mustAny(protocol),
		},
	}, nil
}

// looksLikeIP decides STATIC versus STRICT_DNS. A dotted numeral such as
// 10.0.0.300 is meant as an IP even when it is not a valid one: Envoy
// rejects it (a NACK knhk reports) rather than knhk resolving it as a name.
func looksLikeIP(host string) bool {
	if net.ParseIP(host) != nil || strings.Contains(host, ":") {
		return true
	}
	return strings.Trim(host, "0123456789.") == ""
}

func socketAddress(host string, port uint32) *corev3.Address {
	return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
		Address:       host,
		PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port},
	}}}
}

// RouteConfiguration is the route table: the routing header picks a version;
// without it (no sticky key, or ext_proc failed open) weighted_clusters split
// at the same weight the ext_proc hash uses. canaryBuckets is weight × 100.
func RouteConfiguration(canaryBuckets uint32, timeout time.Duration) *routev3.RouteConfiguration {
	if canaryBuckets > bucketsTotal {
		canaryBuckets = bucketsTotal
	}
	byHeader := func(version, cluster string) *routev3.Route {
		return &routev3.Route{
			Name: "to_" + version,
			Match: &routev3.RouteMatch{
				PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"},
				Headers: []*routev3.HeaderMatcher{{
					Name: headerVersion,
					HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{StringMatch: &matcherv3.StringMatcher{
						MatchPattern: &matcherv3.StringMatcher_Exact{Exact: version},
					}},
				}},
			},
			Action: &routev3.Route_Route{Route: &routev3.RouteAction{
				ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: cluster},
			}},
		}
	}
	weighted := &routev3.Route{
		Name:  "weighted",
		Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
		Action: &routev3.Route_Route{Route: &routev3.RouteAction{
			ClusterSpecifier: &routev3.RouteAction_WeightedClusters{WeightedClusters: &routev3.WeightedCluster{
				Clusters: []*routev3.WeightedCluster_ClusterWeight{
					{Name: ClusterStable, Weight: wrapperspb.UInt32(bucketsTotal - canaryBuckets)},
					{Name: ClusterCanary, Weight: wrapperspb.UInt32(canaryBuckets)},
				},
			}},
		}},
	}
	routes := []*routev3.Route{byHeader("canary", ClusterCanary), byHeader("stable", ClusterStable), weighted}
	if timeout > 0 {
		for _, r := range routes {
			r.GetRoute().Timeout = durationpb.New(timeout)
		}
	}
	return &routev3.RouteConfiguration{
		Name: RouteName,
		VirtualHosts: []*routev3.VirtualHost{{
			Name:    "knhk",
			Domains: []string{"*"},
			Routes:  routes,
		}},
	}
}

// FilterOptions configure the HTTP filters knhk needs in Envoy.
type FilterOptions struct {
	FailureModeAllow bool
	MessageTimeout   time.Duration
	SkipExtProc      bool // baseline only: no header strip, no ext_proc
	// TrustedHeader is the one client header allowed to pick an SLO class;
	// when it is an x-knhk-* name the strip filter spares it.
	TrustedHeader string
	// RouteAttribute asks Envoy for the matched route's name (for
	// classification rules on routes).
	RouteAttribute bool
	// PeerAttribute asks Envoy for the downstream peer certificate's URI
	// SAN (the caller's SPIFFE ID under mTLS), for rules on spiffe_id.
	PeerAttribute bool
	// AdaptiveConcurrency puts Envoy's own (class-blind) adaptive
	// concurrency filter in front of the router: a benchmark baseline.
	AdaptiveConcurrency bool
	// ReceiptsRequired (fail-closed only): the 503 Envoy gives when knhk
	// did not answer also carries x-knhk-shed: receipt, the answer knhk
	// gives when it cannot log a receipt.
	ReceiptsRequired bool
}

// HTTPFilters returns, in order, the ext_proc filter pointing at knhk and
// the router (client x-knhk-* headers are gone by then: see Listener).
func HTTPFilters(o FilterOptions) []*hcmv3.HttpFilter {
	ext := &extprocfilterv3.ExternalProcessor{
		GrpcService: &corev3.GrpcService{
			TargetSpecifier: &corev3.GrpcService_EnvoyGrpc_{EnvoyGrpc: &corev3.GrpcService_EnvoyGrpc{ClusterName: ClusterKnhk}},
		},
		FailureModeAllow: o.FailureModeAllow,
		ProcessingMode: &extprocfilterv3.ProcessingMode{
			RequestHeaderMode:   extprocfilterv3.ProcessingMode_SEND,
			ResponseHeaderMode:  extprocfilterv3.ProcessingMode_SEND,
			RequestBodyMode:     extprocfilterv3.ProcessingMode_NONE,
			ResponseBodyMode:    extprocfilterv3.ProcessingMode_NONE,
			RequestTrailerMode:  extprocfilterv3.ProcessingMode_SKIP,
			ResponseTrailerMode: extprocfilterv3.ProcessingMode_SKIP,
		},
		MessageTimeout:     durationpb.New(o.MessageTimeout),
		ResponseAttributes: []string{clusterAttribute},
	}

	if o.RouteAttribute {
		ext.RequestAttributes = append(ext.RequestAttributes, routeAttribute)
	}
	if o.PeerAttribute {
		ext.RequestAttributes = append(ext.RequestAttributes, "connection.uri_san_peer_certificate")
	}
	router := &hcmv3.HttpFilter{Name: "envoy.filters.http.router", ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(&routerv3.Router{})}}
	if o.SkipExtProc {
		if o.AdaptiveConcurrency {
			return []*hcmv3.HttpFilter{adaptiveConcurrency(), router}
		}
		return []*hcmv3.HttpFilter{router}
	}
	return []*hcmv3.HttpFilter{
		{Name: "envoy.filters.http.ext_proc", ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(ext)}},
		router,
	}
}

// ADSSource is a config source meaning "over the ADS stream".
func ADSSource() *corev3.ConfigSource {
	return &corev3.ConfigSource{
		ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}},
		ResourceApiVersion:    corev3.ApiVersion_V3,
	}
}

// stripClientHeaders drops client x-knhk-* headers (but the trusted one) in
// an early header mutation: before Envoy picks the route, not in an HTTP
// filter. Envoy picks the route before the filter chain runs, and only
// ext_proc clears that choice; so when ext_proc fails open, a header removed
// by a filter would already have routed the request (x-knhk-version: canary
// to the canary).
func stripClientHeaders(trusted string) *corev3.TypedExtensionConfig {
	return &corev3.TypedExtensionConfig{Name: "knhk.strip_client_headers", TypedConfig: mustAny(&earlymutationv3.HeaderMutation{
		Mutations: []*mutationv3.HeaderMutation{{
			Action: &mutationv3.HeaderMutation_RemoveOnMatch_{RemoveOnMatch: &mutationv3.HeaderMutation_RemoveOnMatch{
				KeyMatcher: stripMatcher(trusted),
			}},
		}},
	})}
}

// Listener is the client-facing HTTP listener with knhk's filters; its route
// table (RouteName) comes from knhk over ADS.
func Listener(address string, port uint32, f FilterOptions) *listenerv3.Listener {
	hcm := &hcmv3.HttpConnectionManager{
		StatPrefix: "ingress",
		CodecType:  hcmv3.HttpConnectionManager_AUTO,
		// Headroom for knhk's request headers: see maxHeadersCount.
		CommonHttpProtocolOptions: &corev3.HttpProtocolOptions{MaxHeadersCount: wrapperspb.UInt32(maxHeadersCount)},
		MaxRequestHeadersKb:       wrapperspb.UInt32(maxRequestHeadersKB),
		RouteSpecifier: &hcmv3.HttpConnectionManager_Rds{Rds: &hcmv3.Rds{
			ConfigSource: ADSSource(), RouteConfigName: RouteName,
		}},
		HttpFilters: HTTPFilters(f),
	}
	if !f.SkipExtProc {
		hcm.EarlyHeaderMutationExtensions = []*corev3.TypedExtensionConfig{stripClientHeaders(f.TrustedHeader)}
		if !f.FailureModeAllow {
			hcm.LocalReplyConfig = refusedWithoutKnhk(f.ReceiptsRequired)
		}
	}
	return &listenerv3.Listener{
		Name:    ListenerName,
		Address: socketAddress(address, port),
		FilterChains: []*listenerv3.FilterChain{{
			Filters: []*listenerv3.Filter{{
				Name:       "envoy.filters.network.http_connection_manager",
				ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(hcm)},
			}},
		}},
	}
}

// knhkUnanswered matches Envoy's own replies when knhk did not answer:
// details "ext_proc_error_gRPC_error_N{...}" (knhk unreachable, a reset,
// the circuit breaker's overflow) and "ext_proc_error_per-message_timeout
// _exceeded". knhk's immediate responses carry knhk_* details, and the
// errors Envoy answers with status_on_error (a header mutation it
// rejected) have no such prefix: both stay as they are.
const knhkUnanswered = "response.code_details.startsWith('ext_proc_error')"

// refusedWithoutKnhk (fail-closed) makes those replies 503, a refusal the
// client may retry, instead of a 500 or 504; with receipts required they
// also carry x-knhk-shed: receipt, as knhk's own refusal does.
func refusedWithoutKnhk(receiptsRequired bool) *hcmv3.LocalReplyConfig {
	cel := &celfilterv3.ExpressionFilter{Expression: knhkUnanswered}
	m := &hcmv3.ResponseMapper{
		Filter: &accesslogv3.AccessLogFilter{FilterSpecifier: &accesslogv3.AccessLogFilter_ExtensionFilter{
			ExtensionFilter: &accesslogv3.ExtensionFilter{
				Name:       celFilterName,
				ConfigType: &accesslogv3.ExtensionFilter_TypedConfig{TypedConfig: mustAny(cel)},
			},
		}},
		StatusCode: wrapperspb.UInt32(503),
	}
	if receiptsRequired {
		m.HeadersToAdd = []*corev3.HeaderValueOption{{
			Header:       &corev3.HeaderValue{Key: headerShed, Value: "receipt"},
			AppendAction: corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD,
		}}
	}
	return &hcmv3.LocalReplyConfig{Mappers: []*hcmv3.ResponseMapper{m}}
}

const celFilterName = "envoy.access_loggers.extension_filters.cel"

// mustAny wraps a message built in this package; failure is a programming
// error, never input-dependent.
func mustAny(m proto.Message) *anypb.Any {
	a, err := anypb.New(m)
	if err != nil {
		panic(err)
	}
	return a
}

// stripMatcher matches every x-knhk-* header name except the trusted one.
// RE2 has no negative lookahead, so "x-knhk- followed by anything but
// NAME" is spelt out: shorter than NAME, diverging from it at some
// character, or longer than it.
func stripMatcher(trusted string) *matcherv3.StringMatcher {
	rest, ok := strings.CutPrefix(trusted, headerPrefix)
	if !ok || rest == "" {
		return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: headerPrefix}}
	}
	return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_SafeRegex{
		SafeRegex: &matcherv3.RegexMatcher{Regex: regexp.QuoteMeta(headerPrefix) + notExactly(rest)},
	}}
}

// notExactly is an RE2 pattern matching any string except s.
func notExactly(s string) string {
	alts := []string{""} // the empty remainder
	for i := range len(s) {
		p := regexp.QuoteMeta(s[:i])
		if i > 0 {
			alts = append(alts, p) // a proper prefix of s
		}
		alts = append(alts, p+"[^"+regexp.QuoteMeta(s[i:i+1])+"].*")
	}
	alts = append(alts, regexp.QuoteMeta(s)+".+")
	return "(?:" + strings.Join(alts, "|") + ")"
}

// adaptiveConcurrency is Envoy's gradient concurrency controller with its
// documented example settings: p50 latency samples, limit updated every
// 100 ms, the minimum RTT re-measured every 60 s over 50 requests.
func adaptiveConcurrency() *hcmv3.HttpFilter {
	cfg := &adaptivev3.AdaptiveConcurrency{
		ConcurrencyControllerConfig: &adaptivev3.AdaptiveConcurrency_GradientControllerConfig{
			GradientControllerConfig: &adaptivev3.GradientControllerConfig{
				SampleAggregatePercentile: &typev3.Percent{Value: 50},
				ConcurrencyLimitParams: &adaptivev3.GradientControllerConfig_ConcurrencyLimitCalculationParams{
					ConcurrencyUpdateInterval: durationpb.New(100 * time.Millisecond),
				},
				MinRttCalcParams: &adaptivev3.GradientControllerConfig_MinimumRTTCalculationParams{
					Interval:     durationpb.New(60 * time.Second),
					RequestCount: wrapperspb.UInt32(50),
				},
			},
		},
	}
	return &hcmv3.HttpFilter{Name: "envoy.filters.http.adaptive_concurrency", ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(cfg)}}
}
