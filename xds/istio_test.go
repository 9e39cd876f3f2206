package xds

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"

	extprocfilterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"go.yaml.in/yaml/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/knhk/knhk/pkg/config"
)

// istioDocs decodes every YAML document of an envoy/istio manifest.
func istioDocs(t *testing.T, name string) []map[string]any {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "envoy", "istio", name))
	if err != nil {
		t.Fatal(err)
	}
	var out []map[string]any
	dec := yaml.NewDecoder(bytes.NewReader(b))
	for {
		var d map[string]any
		if err := dec.Decode(&d); errors.Is(err, io.EOF) {
			return out
		} else if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		out = append(out, d)
	}
}

func dig(t *testing.T, v any, path ...any) any {
	t.Helper()
	for _, p := range path {
		switch k := p.(type) {
		case string:
			m, ok := v.(map[string]any)
			if !ok {
				t.Fatalf("no %q in %v", k, v)
			}
			v = m[k]
		case int:
			l, ok := v.([]any)
			if !ok || len(l) <= k {
				t.Fatalf("no [%d] in %v", k, v)
			}
			v = l[k]
		}
	}
	return v
}

// The Istio example's ext_proc filter is a valid Envoy ExternalProcessor
// that asks for what knhk needs, the gateway's connection manager strips
// client x-knhk-* headers before routing and has the bootstrap's header
// limits, and its knhk config validates.
func TestIstioExample(t *testing.T) {
	ef := istioDocs(t, "envoyfilter.yaml")[0]
	tc := dig(t, ef, "spec", "configPatches", 0, "patch", "value", "typed_config").(map[string]any)
	if tc["@type"] != "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor" {
		t.Fatalf("@type %v", tc["@type"])
	}
	delete(tc, "@type")
	j, err := json.Marshal(tc)
	if err != nil {
		t.Fatal(err)
	}
	var ext extprocfilterv3.ExternalProcessor
	if err := protojson.Unmarshal(j, &ext); err != nil {
		t.Fatalf("EnvoyFilter's typed_config is not an Envoy ExternalProcessor: %v", err)
	}
	if err := ext.Validate(); err != nil {
		t.Fatal(err)
	}
	pm := ext.GetProcessingMode()
	if pm.GetRequestHeaderMode() != extprocfilterv3.ProcessingMode_SEND || pm.GetResponseHeaderMode() != extprocfilterv3.ProcessingMode_SEND {
		t.Fatal("knhk needs request and response headers")
	}
	if len(ext.GetResponseAttributes()) != 1 || ext.GetResponseAttributes()[0] != clusterAttribute {
		t.Fatalf("response attributes %v, want [%s]", ext.GetResponseAttributes(), clusterAttribute)
	}

	// The gateway's header limits leave knhk the same headroom as the bootstrap.
	hp := dig(t, ef, "spec", "configPatches", 1, "patch", "value", "typed_config").(map[string]any)
	if hp["@type"] != "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager" {
		t.Fatalf("@type %v", hp["@type"])
	}
	delete(hp, "@type")
	if j, err = json.Marshal(hp); err != nil {
		t.Fatal(err)
	}
	var hcm hcmv3.HttpConnectionManager
	if err := protojson.Unmarshal(j, &hcm); err != nil {
		t.Fatalf("EnvoyFilter's HCM patch is not an Envoy HttpConnectionManager: %v", err)
	}
	want, _ := protojson.Marshal(stripClientHeaders(""))
	if got := hcm.GetEarlyHeaderMutationExtensions(); len(got) != 1 || !proto.Equal(got[0], stripClientHeaders("")) {
		t.Fatalf("gateway early header mutations %v, want %s (client x-knhk-* dropped before routing)", got, want)
	}
	if hcm.GetCommonHttpProtocolOptions().GetMaxHeadersCount().GetValue() != maxHeadersCount ||
		hcm.GetMaxRequestHeadersKb().GetValue() != maxRequestHeadersKB {
		t.Fatalf("gateway header limits %d headers, %d KiB; want %d, %d as in the bootstrap",
			hcm.GetCommonHttpProtocolOptions().GetMaxHeadersCount().GetValue(), hcm.GetMaxRequestHeadersKb().GetValue(),
			maxHeadersCount, maxRequestHeadersKB)
	}

	for _, d := range istioDocs(t, "knhk.yaml") {
		if d["kind"] != "ConfigMap" {
			continue
		}
		body := dig(t, d, "data", "knhk.yaml").(string)
		cfg, err := config.Parse("envoy/istio/knhk.yaml", []byte(body))
		if err != nil {
			t.Fatal(err)
		}
		if !cfg.Identity.Enabled() || cfg.Identity.TrustDomain != "cluster.local" {
			t.Fatalf("the Istio config must run knhk on the mesh's trust domain, got %q", cfg.Identity.TrustDomain)
		}
		return
	}
	t.Fatal("no ConfigMap with knhk.yaml in envoy/istio/knhk.yaml")
}
