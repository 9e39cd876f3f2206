package harness

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/knhk/knhk/pkg/config"
)

// StackOptions describe one Envoy + knhk + two upstreams setup.
type StackOptions struct {
	BinDir           string // holds the knhk binary (BuildBinaries)
	Dir              string // scratch directory (config, bootstrap, data)
	Weight           float64
	Salt             string
	StickyKeys       []string // nil: knhk's defaults
	FailureModeAllow bool
	Logs             io.Writer // Envoy and knhk output
	// Upstreams, when set, are used instead of in-process ones.
	StableAddr, CanaryAddr string
	// Configure, when set, edits knhk's config before it is written.
	Configure func(*config.Config)
	// EnvoyArgs are extra `knhk envoy-config` flags (e.g. --spiffe ...).
	EnvoyArgs []string
	// AdminHTTP reaches knhk's admin API (an mTLS client under identity).
	AdminHTTP *http.Client
}

// Stack is a running setup; URL is Envoy's listener.
type Stack struct {
	Opts           StackOptions
	Stable, Canary *Upstream // nil when external upstreams were given
	Knhk           *Knhk
	Envoy          *Envoy
	URL            string
}

// KnhkConfig returns the knhk config of a stack on fresh free ports.
func KnhkConfig(o StackOptions, stable, canary string) (config.Config, error) {
	ports, err := FreePorts(5)
	if err != nil {
		return config.Config{}, err
	}
	cfg := config.Default()
	cfg.Listen.GRPC = "127.0.0.1:" + strconv.Itoa(ports[0])
	cfg.Listen.Admin = "127.0.0.1:" + strconv.Itoa(ports[1])
	cfg.Listen.XDS = "127.0.0.1:" + strconv.Itoa(ports[4])
	cfg.Envoy.ListenerPort = ports[2]
	cfg.Envoy.AdminPort = ports[3]
	cfg.Envoy.FailureModeAllow = o.FailureModeAllow
	cfg.DataDir = filepath.Join(o.Dir, "data")
	cfg.Upstreams.Stable = []string{stable}
	cfg.Upstreams.Canary = []string{canary}
	cfg.Canary.Weight = o.Weight
	if o.Salt != "" {
		cfg.Canary.Salt = o.Salt
	}
	if o.StickyKeys != nil {
		cfg.Canary.StickyKeys = o.StickyKeys
	}
	cfg.DrainTimeout = config.Duration(5 * time.Second)
	// envoy.message_timeout stays at the production default (200 ms), so the
	// tests see what a deployment sees; a test that needs longer sets it in
	// Configure and says why.
	if o.Configure != nil {
		o.Configure(&cfg)
	}
	return cfg, cfg.Validate()
}

// StartStack starts upstreams, knhk and Envoy and waits until all are ready.
func StartStack(o StackOptions) (_ *Stack, err error) {
	s := &Stack{Opts: o}
	if err := os.MkdirAll(o.Dir, 0o700); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			_ = s.Close()
		}
	}()
	stableAddr, canaryAddr := o.StableAddr, o.CanaryAddr
	if stableAddr == "" {
		if s.Stable, err = StartUpstream("stable"); err != nil {
			return nil, err
		}
		if s.Canary, err = StartUpstream("canary"); err != nil {
			return nil, err
		}
		stableAddr, canaryAddr = s.Stable.Addr, s.Canary.Addr
	}
	cfg, err := KnhkConfig(o, stableAddr, canaryAddr)
	if err != nil {
		return nil, err
	}
	if s.Knhk, err = StartKnhk(filepath.Join(o.BinDir, "knhk"), o.Dir, cfg, o.Logs, o.AdminHTTP); err != nil {
		return nil, err
	}
	if err := s.Knhk.WaitReady(20 * time.Second); err != nil {
		return nil, fmt.Errorf("knhk not ready: %w", err)
	}
	if s.Envoy, err = StartEnvoyFor(o.BinDir, o.Dir, "envoy", s.Knhk.ConfigPath, cfg.Envoy.AdminPort, o.Logs, o.EnvoyArgs...); err != nil {
		return nil, err
	}
	s.URL = "http://127.0.0.1:" + strconv.Itoa(cfg.Envoy.ListenerPort)
	return s, nil
}

// StartEnvoyFor renders `knhk envoy-config` for a knhk config file (with
// extra flags) into dir/name.yaml and starts Envoy on it, with name as its
// xDS node id (--service-node), so knhk tells a stack's Envoys apart.
func StartEnvoyFor(binDir, dir, name, knhkConfig string, adminPort int, logs io.Writer, extra ...string) (*Envoy, error) {
	bootstrap := filepath.Join(dir, name+".yaml")
	if err := EnvoyConfig(filepath.Join(binDir, "knhk"), knhkConfig, bootstrap, extra...); err != nil {
		return nil, err
	}
	e, err := StartEnvoy(bootstrap, adminPort, filepath.Join(dir, name), logs, "--service-node", name)
	if err != nil {
		return nil, err
	}
	if err := e.WaitReady(30 * time.Second); err != nil {
		_ = e.Stop()
		return nil, fmt.Errorf("envoy not ready: %w", err)
	}
	return e, nil
}

// Close stops everything that was started.
func (s *Stack) Close() error {
	var errs []error
	if s.Envoy != nil {
		errs = append(errs, s.Envoy.Stop())
	}
	if s.Knhk != nil {
		errs = append(errs, s.Knhk.Stop(10*time.Second))
	}
	for _, u := range []*Upstream{s.Stable, s.Canary} {
		if u != nil {
			u.Close()
		}
	}
	return errors.Join(errs...)
}

// ListenerAddr returns host:port of Envoy's listener.
func (s *Stack) ListenerAddr() string {
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(s.Knhk.Config.Envoy.ListenerPort))
}
