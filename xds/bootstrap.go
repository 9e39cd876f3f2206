package xds

import (
	"bytes"
	"encoding/json"
	"fmt"
	"time"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	"go.yaml.in/yaml/v3"
	"google.golang.org/protobuf/encoding/protojson"
)

// BootstrapOptions is everything `knhk envoy-config` needs.
type BootstrapOptions struct {
	NodeID           string
	ListenerAddress  string
	ListenerPort     uint32
	AdminPort        uint32
	KnhkGRPC         string // host:port of knhk's gRPC listener as Envoy sees it
	KnhkXDS          string // host:port of knhk's xDS listener as Envoy sees it
	Delta            bool   // DELTA_GRPC instead of state-of-the-world GRPC
	FailureModeAllow bool
	MessageTimeout   time.Duration
	// KnhkMaxRequests bounds Envoy's concurrent ext_proc streams to knhk
	// (0: Envoy's default of 1,024).
	KnhkMaxRequests uint32
	// SkipExtProc leaves knhk out of the filter chain: Envoy alone, the
	// baseline `make bench` measures knhk against.
	SkipExtProc bool
	// TrustedHeader, RouteAttribute, AdaptiveConcurrency: see FilterOptions.
	TrustedHeader       string
	RouteAttribute      bool
	PeerAttribute       bool
	AdaptiveConcurrency bool
	ReceiptsRequired    bool
	// SPIFFE, when set, makes Envoy talk mTLS to knhk with its SVID from
	// the SPIRE agent over SDS.
	SPIFFE *SPIFFE
}

// Bootstrap builds and validates an Envoy bootstrap: the listener and knhk's
// two clusters are static; the version clusters (CDS) and the route table
// (RDS) come from knhk over one ADS stream, so weight changes need no restart.
func Bootstrap(o BootstrapOptions) (*bootstrapv3.Bootstrap, error) {
	knhk, err := KnhkCluster(o.KnhkGRPC, o.KnhkMaxRequests)
	if err != nil {
		return nil, fmt.Errorf("knhk gRPC address: %w", err)
	}
	xdsCluster, err := endpointCluster(ClusterXDS, []string{o.KnhkXDS}, grpcProtocol())
	if err != nil {
		return nil, fmt.Errorf("knhk xDS address: %w", err)
	}
	node := o.NodeID
	if node == "" {
		node = "knhk-envoy"
	}
	api := corev3.ApiConfigSource_GRPC
	if o.Delta {
		api = corev3.ApiConfigSource_DELTA_GRPC
	}
	b := &bootstrapv3.Bootstrap{
		Node: &corev3.Node{Id: node, Cluster: "knhk"},
		Admin: &bootstrapv3.Admin{
			Address: socketAddress("127.0.0.1", o.AdminPort),
		},
		DynamicResources: &bootstrapv3.Bootstrap_DynamicResources{
			AdsConfig: &corev3.ApiConfigSource{
				ApiType:             api,
				TransportApiVersion: corev3.ApiVersion_V3,
				GrpcServices: []*corev3.GrpcService{{TargetSpecifier: &corev3.GrpcService_EnvoyGrpc_{
					EnvoyGrpc: &corev3.GrpcService_EnvoyGrpc{ClusterName: ClusterXDS},
				}}},
				SetNodeOnFirstMessageOnly: true,
			},
			CdsConfig: ADSSource(),
		},
		StaticResources: &bootstrapv3.Bootstrap_StaticResources{
			Listeners: []*listenerv3.Listener{Listener(o.ListenerAddress, o.ListenerPort,
				FilterOptions{FailureModeAllow: o.FailureModeAllow, MessageTimeout: o.MessageTimeout, SkipExtProc: o.SkipExtProc,
					TrustedHeader: o.TrustedHeader, RouteAttribute: o.RouteAttribute, PeerAttribute: o.PeerAttribute, AdaptiveConcurrency: o.AdaptiveConcurrency,
					ReceiptsRequired: o.ReceiptsRequired})},
			Clusters: []*clusterv3.Cluster{knhk, xdsCluster},
		},
	}
	if o.SPIFFE != nil {
		knhk.TransportSocket = o.SPIFFE.upstreamTLS()
		xdsCluster.TransportSocket = o.SPIFFE.upstreamTLS()
		b.StaticResources.Clusters = append(b.StaticResources.Clusters, o.SPIFFE.agentCluster())
	}
	if err := b.ValidateAll(); err != nil {
		return nil, fmt.Errorf("generated bootstrap is invalid: %w", err)
	}
	return b, nil
}

// BootstrapYAML renders a bootstrap as YAML with a stable key order, so the
// committed envoy/envoy.yaml can be compared with what the generator prints.
func BootstrapYAML(b *bootstrapv3.Bootstrap) ([]byte, error) {
	js, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(b)
	if err != nil {
		return nil, err
	}
	var v any
	if err := json.Unmarshal(js, &v); err != nil {
		return nil, err
	}
	explicitDefaults(v)
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return buf.Bytes(), enc.Close()
}

// explicitDefaults writes out the ext_proc settings proto3 JSON omits when
// they hold their zero value: whether Envoy fails open and that bodies are
// not sent are decisions a reader of the bootstrap must see.
func explicitDefaults(v any) {
	switch t := v.(type) {
	case map[string]any:
		if t["@type"] == "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor" {
			if _, ok := t["failure_mode_allow"]; !ok {
				t["failure_mode_allow"] = false
			}
			if pm, ok := t["processing_mode"].(map[string]any); ok {
				for _, k := range []string{"request_body_mode", "response_body_mode"} {
					if _, ok := pm[k]; !ok {
						pm[k] = "NONE"
					}
				}
			}
		}
		for _, c := range t {
			explicitDefaults(c)
		}
	case []any:
		for _, c := range t {
			explicitDefaults(c)
		}
	}
}
