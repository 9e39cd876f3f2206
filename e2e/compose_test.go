package e2e

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"

	"github.com/knhk/knhk/internal/harness"
	"github.com/knhk/knhk/pkg/config"
)

type composeFile struct {
	Services map[string]struct {
		Image       string
		NetworkMode string `yaml:"network_mode"`
		Command     []string
		Entrypoint  []string
		Volumes     []string
		Build       *struct{ Context, Dockerfile string }
	}
}

// TestDockerComposeMatchesEnvoyDir checks what can be checked without a
// container engine: every file the compose file mounts or builds from
// exists, and the ports it implies are the contract's and agree with the
// files in envoy/.
func TestDockerComposeMatchesEnvoyDir(t *testing.T) {
	root, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(filepath.Join(root, "docker-compose.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var c composeFile
	if err := yaml.Unmarshal(raw, &c); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"envoy", "knhk", "stable", "canary"} {
		if _, ok := c.Services[name]; !ok {
			t.Fatalf("service %q missing", name)
		}
	}
	if img := c.Services["envoy"].Image; !strings.HasPrefix(img, "envoyproxy/envoy:v1.40") {
		t.Fatalf("envoy image %q is not Envoy's official 1.40 image", img)
	}
	mounts := map[string]string{} // container path → repo file
	for name, s := range c.Services {
		if s.NetworkMode != "host" {
			t.Errorf("service %s: network_mode %q; the loopback addresses in envoy/ need host networking", name, s.NetworkMode)
		}
		for _, v := range s.Volumes {
			parts := strings.Split(v, ":")
			if !strings.HasPrefix(parts[0], "./") {
				continue // named volume
			}
			if _, err := os.Stat(filepath.Join(root, parts[0])); err != nil {
				t.Errorf("service %s mounts %s, which does not exist", name, parts[0])
			}
			mounts[parts[1]] = filepath.Join(root, parts[0])
		}
		if s.Build != nil {
			if _, err := os.Stat(filepath.Join(root, s.Build.Context, s.Build.Dockerfile)); err != nil {
				t.Errorf("service %s builds from a missing Dockerfile: %v", name, err)
			}
		}
	}

	// knhk's config: the file its --config names, with the contract ports.
	knhkCfgPath := mounts[argAfter(c.Services["knhk"].Command, "--config")]
	if knhkCfgPath == "" {
		t.Fatal("knhk's --config is not a file mounted from the repository")
	}
	cfg, err := config.Load(knhkCfgPath)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Listen.GRPC != "127.0.0.1:9002" || cfg.Listen.Admin != "127.0.0.1:9090" {
		t.Fatalf("knhk listens on %+v, contract says 127.0.0.1:9002 and :9090", cfg.Listen)
	}
	// The demo upstreams listen where knhk's config says the versions are.
	for _, v := range []struct {
		svc  string
		want []string
	}{{"stable", cfg.Upstreams.Stable}, {"canary", cfg.Upstreams.Canary}} {
		addr := argAfter(c.Services[v.svc].Command, "--addr")
		if !slices.Contains(v.want, addr) {
			t.Errorf("%s upstream listens on %q, knhk config expects %v", v.svc, addr, v.want)
		}
	}
	// Envoy's bootstrap: the mounted file, reaching knhk on 9002 (ext_proc)
	// and 18000 (xDS), listener 10000, admin 9901. Upstreams come over xDS.
	envoyCfg := mounts[argAfter(c.Services["envoy"].Command, "-c")]
	if filepath.Base(envoyCfg) != "envoy.yaml" {
		t.Fatalf("envoy does not run envoy/envoy.yaml: %q", envoyCfg)
	}
	b, err := os.ReadFile(envoyCfg)
	if err != nil {
		t.Fatal(err)
	}
	ports := socketPorts(t, b)
	if cfg.Listen.XDS != "127.0.0.1:18000" {
		t.Fatalf("knhk xDS on %s, contract says 127.0.0.1:18000", cfg.Listen.XDS)
	}
	for _, p := range []int{9002, 18000, 10000, 9901} {
		if !slices.Contains(ports, p) {
			t.Errorf("envoy/envoy.yaml has no socket address on port %d (has %v)", p, ports)
		}
	}
}

func argAfter(args []string, flag string) string {
	for i := 0; i+1 < len(args); i++ {
		if args[i] == flag {
			return args[i+1]
		}
	}
	return ""
}

// socketPorts collects every port_value in a bootstrap.
func socketPorts(t *testing.T, b []byte) []int {
	var doc any
	if err := yaml.Unmarshal(b, &doc); err != nil {
		t.Fatal(err)
	}
	var out []int
	var walk func(v any)
	walk = func(v any) {
		switch x := v.(type) {
		case map[string]any:
			for k, c := range x {
				if k == "port_value" {
					if n, ok := c.(int); ok {
						out = append(out, n)
					}
				}
				walk(c)
			}
		case []any:
			for _, c := range x {
				walk(c)
			}
		}
	}
	walk(doc)
	return out
}
