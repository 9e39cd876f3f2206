// Package config loads, defaults and validates knhk's config file. Every error
// names the file, the key and the reason, so a user can fix it without
// reading code.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/knhk/knhk/pkg/canary"
)

// Config is the whole config file. The yaml names are part of the contract.
type Config struct {
	Listen       Listen    `yaml:"listen"`
	DataDir      string    `yaml:"data_dir"`
	Upstreams    Upstreams `yaml:"upstreams"`
	Canary       Canary    `yaml:"canary"`
	Envoy        Envoy     `yaml:"envoy"`
	DrainTimeout Duration  `yaml:"drain_timeout"`
	Log          Log       `yaml:"log"`
	Rollout      Rollout   `yaml:"rollout"`
	// Environment this knhk runs in: canary, staging or production (flags).
	Environment string          `yaml:"environment"`
	Flags       map[string]Flag `yaml:"flags"`
	Admission   Admission       `yaml:"admission"`
	Capacity    Capacity        `yaml:"capacity"`
	Receipts    Receipts        `yaml:"receipts"`
	Identity    Identity        `yaml:"identity"`
	Region      Region          `yaml:"region"`
	Debug       Debug           `yaml:"debug"`
}

// Debug holds switches for diagnosing knhk itself; all off by default.
type Debug struct {
	// Pprof serves net/http/pprof under /debug/pprof/ on the admin
	// listener (behind its mTLS when identity is on).
	Pprof bool `yaml:"pprof"`
}

// Rollout configures promotion and rollback.
type Rollout struct {
	Steps             []float64 `yaml:"steps"`
	Interval          Duration  `yaml:"interval"`
	Window            Duration  `yaml:"window"` // 0: same as interval
	MinRequests       uint64    `yaml:"min_requests"`
	MaxErrorRateDelta float64   `yaml:"max_error_rate_delta"`
	MaxErrorRate      float64   `yaml:"max_error_rate"`
	Confidence        float64   `yaml:"confidence"`
	MaxP99Ratio       float64   `yaml:"max_p99_ratio"`
	MaxP99Ms          float64   `yaml:"max_p99_ms"` // 0: off
	MinLatencySamples uint64    `yaml:"min_latency_samples"`
	MinP99DeltaMs     float64   `yaml:"min_p99_delta_ms"`
	FailureThreshold  int       `yaml:"failure_threshold"`
	ConfirmAfter      Duration  `yaml:"confirm_after"`
	HardErrorRate     float64   `yaml:"hard_error_rate"`
	HardMinRequests   uint64    `yaml:"hard_min_requests"`
	HardWindow        Duration  `yaml:"hard_window"`
	Webhooks          []Webhook `yaml:"webhooks"`
}

// Webhook receives every rollout decision as a JSON POST.
type Webhook struct {
	URL     string   `yaml:"url"`
	Timeout Duration `yaml:"timeout"`
}

// Flag is one feature flag.
type Flag struct {
	Default      bool            `yaml:"default"`
	Environments map[string]bool `yaml:"environments"`
	Versions     map[string]bool `yaml:"versions"`
	Percent      *float64        `yaml:"percent"`
	Salt         string          `yaml:"salt"`
}

// Listen holds knhk's own listeners. Loopback by default.
type Listen struct {
	GRPC  string `yaml:"grpc"`  // ext_proc + health
	XDS   string `yaml:"xds"`   // ADS for Envoy (SotW and delta)
	Admin string `yaml:"admin"` // /healthz, /readyz, /metrics, /v1/...
	// Region serves the C2SP witness API to peer regions (empty: off).
	Region string `yaml:"region"`
}

// Upstreams are the host:port endpoints of each version.
type Upstreams struct {
	Stable []string `yaml:"stable"`
	Canary []string `yaml:"canary"`
}

// Canary configures the sticky split.
type Canary struct {
	Weight     float64  `yaml:"weight"`
	Salt       string   `yaml:"salt"`
	StickyKeys []string `yaml:"sticky_keys"`
}

// Envoy configures the bootstrap `knhk envoy-config` prints.
type Envoy struct {
	ListenerAddress  string   `yaml:"listener_address"`
	ListenerPort     int      `yaml:"listener_port"`
	AdminPort        int      `yaml:"admin_port"`
	FailureModeAllow bool     `yaml:"failure_mode_allow"`
	MessageTimeout   Duration `yaml:"message_timeout"`
	// KnhkMaxRequests is the knhk cluster's circuit breaker: the most
	// ext_proc streams one Envoy keeps open to knhk. A stream lasts the
	// whole request, upstream time included, so size it as peak requests
	// per second per Envoy × (upstream p99 + knhk's p99), with headroom.
	// Past it Envoy answers at once rather than queue behind a saturated
	// knhk: without knhk when fail-open, 503 when fail-closed. 0: Envoy's
	// default (1,024).
	KnhkMaxRequests int `yaml:"knhk_max_requests"`
	// KnhkAddress is where Envoy reaches knhk's gRPC listener, when that is
	// not listen.grpc as seen from Envoy (another host or container).
	KnhkAddress string `yaml:"knhk_address"`
	// XDSAddress is the same for listen.xds.
	XDSAddress string `yaml:"xds_address"`
	// XDSAPI is the ADS flavour in the bootstrap: delta or sotw.
	XDSAPI string `yaml:"xds_api"`
	// RouteTimeout is Envoy's upstream timeout per request (0: Envoy's 15 s).
	RouteTimeout Duration `yaml:"route_timeout"`
}

// Log configures slog.
type Log struct {
	Level string `yaml:"level"`
}

// Default returns the embedded defaults: everything on loopback.
func Default() Config {
	return Config{
		Listen:    Listen{GRPC: "127.0.0.1:9002", XDS: "127.0.0.1:18000", Admin: "127.0.0.1:9090"},
		DataDir:   "./data",
		Upstreams: Upstreams{Stable: []string{"127.0.0.1:8001"}, Canary: []string{"127.0.0.1:8002"}},
		Canary: Canary{
			Weight:     20,
			Salt:       "knhk",
			StickyKeys: []string{"header:x-user-id", "cookie:knhk-session", "header:x-request-id"},
		},
		Envoy: Envoy{
			ListenerAddress:  "127.0.0.1",
			ListenerPort:     10000,
			AdminPort:        9901,
			FailureModeAllow: true,
			MessageTimeout:   Duration(200 * time.Millisecond),
			XDSAPI:           "delta",
		},
		Rollout: Rollout{
			Steps:             []float64{1, 5, 10, 25, 50, 100},
			Interval:          Duration(5 * time.Second),
			MinRequests:       50,
			MaxErrorRateDelta: 0.01,
			MaxErrorRate:      0.1,
			Confidence:        0.99,
			MaxP99Ratio:       1.5,
			MinLatencySamples: 100,
			MinP99DeltaMs:     5,
			FailureThreshold:  2,
			ConfirmAfter:      Duration(time.Second),
			HardErrorRate:     0.5,
			HardMinRequests:   20,
			HardWindow:        Duration(5 * time.Second),
		},
		Environment:  "production",
		Admission:    defaultAdmission(),
		Receipts:     defaultReceipts(),
		Capacity:     Capacity{Key: "path", TopK: 50, MRCKeys: 16384},
		DrainTimeout: Duration(10 * time.Second),
		Log:          Log{Level: "info"},
	}
}

// Duration is a time.Duration written as "5s", "200ms" in the file.
type Duration time.Duration

// UnmarshalYAML parses a Go duration string.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	v, err := time.ParseDuration(n.Value)
	if err != nil {
		return fmt.Errorf("line %d: %q is not a duration (e.g. 5s, 200ms)", n.Line, n.Value)
	}
	*d = Duration(v)
	return nil
}

// MarshalYAML writes the Go duration string.
func (d Duration) MarshalYAML() (any, error) { return time.Duration(d).String(), nil }

// D returns the time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// Error is a config error: the file, the key and the reason.
type Error struct {
	File   string
	Key    string
	Line   int
	Reason string
}

func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("config ")
	if e.File == "" {
		b.WriteString("(defaults)")
	} else {
		b.WriteString(e.File)
	}
	if e.Line > 0 {
		b.WriteString(":" + strconv.Itoa(e.Line))
	}
	if e.Key != "" {
		b.WriteString(": " + e.Key)
	}
	b.WriteString(": " + e.Reason)
	return b.String()
}

// Load reads a config file over the defaults and validates it.
func Load(path string) (Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return Config{}, &Error{File: path, Reason: err.Error()}
	}
	return Parse(path, data)
}

// Parse decodes data (named path in errors) over the defaults and validates.
func Parse(path string, data []byte) (Config, error) {
	cfg := Default()
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return Config{}, &Error{File: path, Reason: strings.TrimPrefix(err.Error(), "yaml: ")}
	}
	if len(root.Content) == 0 { // empty file: defaults
		return cfg, cfg.validate(path)
	}
	lines := map[int]string{}
	if err := checkKeys(root.Content[0], typeOfConfig, "", lines); err != nil {
		err.File = path
		return Config{}, err
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&cfg); err != nil {
		return Config{}, decodeError(path, err, lines)
	}
	return cfg, cfg.validate(path)
}

// decodeError turns a yaml type error into one naming the key.
func decodeError(path string, err error, lines map[int]string) error {
	var te *yaml.TypeError
	msg := err.Error()
	if errors.As(err, &te) && len(te.Errors) > 0 {
		msg = te.Errors[0]
	}
	msg = strings.TrimPrefix(msg, "yaml: ")
	e := &Error{File: path, Reason: msg}
	if rest, ok := strings.CutPrefix(msg, "line "); ok {
		num, reason, _ := strings.Cut(rest, ": ")
		if n, convErr := strconv.Atoi(num); convErr == nil {
			e.Line, e.Key, e.Reason = n, lines[n], reason
		}
	}
	return e
}

func (c *Config) validate(file string) error {
	fail := func(key, format string, args ...any) error {
		return &Error{File: file, Key: key, Reason: fmt.Sprintf(format, args...)}
	}
	if err := checkAddr(c.Listen.GRPC); err != nil {
		return fail("listen.grpc", "%v", err)
	}
	if err := checkAddr(c.Listen.Admin); err != nil {
		return fail("listen.admin", "%v", err)
	}
	if err := checkAddr(c.Listen.XDS); err != nil {
		return fail("listen.xds", "%v", err)
	}
	seen := map[string]string{}
	for _, l := range []struct{ key, addr string }{{"listen.grpc", c.Listen.GRPC}, {"listen.xds", c.Listen.XDS}, {"listen.admin", c.Listen.Admin}} {
		if other, dup := seen[l.addr]; dup && !strings.HasSuffix(l.addr, ":0") {
			return fail(l.key, "same address as %s (%s)", other, l.addr)
		}
		seen[l.addr] = l.key
	}
	if c.DataDir == "" {
		return fail("data_dir", "must not be empty")
	}
	if len(c.Upstreams.Stable) == 0 {
		return fail("upstreams.stable", "needs at least one host:port")
	}
	for i, a := range c.Upstreams.Stable {
		if err := checkDialAddr(a); err != nil {
			return fail(fmt.Sprintf("upstreams.stable[%d]", i), "%v", err)
		}
	}
	for i, a := range c.Upstreams.Canary {
		if err := checkDialAddr(a); err != nil {
			return fail(fmt.Sprintf("upstreams.canary[%d]", i), "%v", err)
		}
	}
	if _, err := canary.WeightToBuckets(c.Canary.Weight); err != nil {
		return fail("canary.weight", "%v", err)
	}
	if c.Canary.Weight > 0 && len(c.Upstreams.Canary) == 0 {
		return fail("upstreams.canary", "empty, but canary.weight is %v: traffic would go nowhere", c.Canary.Weight)
	}
	if _, err := c.StickySources(); err != nil {
		return fail("canary.sticky_keys", "%v", err)
	}
	if c.Envoy.ListenerAddress == "" || net.ParseIP(c.Envoy.ListenerAddress) == nil {
		return fail("envoy.listener_address", "%q is not an IP address", c.Envoy.ListenerAddress)
	}
	if c.Envoy.ListenerPort < 1 || c.Envoy.ListenerPort > 65535 {
		return fail("envoy.listener_port", "must be 1..65535, got %d", c.Envoy.ListenerPort)
	}
	if c.Envoy.AdminPort < 1 || c.Envoy.AdminPort > 65535 {
		return fail("envoy.admin_port", "must be 1..65535, got %d", c.Envoy.AdminPort)
	}
	if c.Envoy.AdminPort == c.Envoy.ListenerPort {
		return fail("envoy.admin_port", "same port as envoy.listener_port (%d)", c.Envoy.ListenerPort)
	}
	if c.Envoy.MessageTimeout <= 0 {
		return fail("envoy.message_timeout", "must be positive, got %s", c.Envoy.MessageTimeout.D())
	}
	if c.Envoy.KnhkMaxRequests < 0 || c.Envoy.KnhkMaxRequests > 1<<20 {
		return fail("envoy.knhk_max_requests", "must be 0 (Envoy's default) to 1048576, got %d", c.Envoy.KnhkMaxRequests)
	}
	if n := c.Envoy.KnhkMaxRequests; n > 0 && c.Admission.Enabled && n <= c.Admission.Limiter.Max {
		// The breaker is blind to classes: below the admission limit it
		// would refuse R1 as readily as C1, before knhk sheds by class.
		return fail("envoy.knhk_max_requests", "%d is not above admission.limiter.max (%d): Envoy would refuse requests without regard to class before knhk's admission sheds by class; raise it or leave it 0", n, c.Admission.Limiter.Max)
	}
	if c.Envoy.KnhkAddress != "" {
		if err := checkDialAddr(c.Envoy.KnhkAddress); err != nil {
			return fail("envoy.knhk_address", "%v", err)
		}
	}
	if c.Envoy.XDSAddress != "" {
		if err := checkDialAddr(c.Envoy.XDSAddress); err != nil {
			return fail("envoy.xds_address", "%v", err)
		}
	}
	if c.Envoy.XDSAPI != "delta" && c.Envoy.XDSAPI != "sotw" {
		return fail("envoy.xds_api", "%q: want delta or sotw", c.Envoy.XDSAPI)
	}
	if err := c.Rollout.validate(fail); err != nil {
		return err
	}
	if _, err := c.FlagSet(); err != nil {
		return fail("flags", "%v", err)
	}
	if err := c.Admission.validate(fail); err != nil {
		return err
	}
	if err := c.Capacity.validate(fail); err != nil {
		return err
	}
	if c.Receipts.Enabled && c.Receipts.Required && c.Envoy.FailureModeAllow {
		// Fail-open lets Envoy serve the request without knhk whenever knhk
		// is slower than message_timeout: exactly a request without a receipt.
		return fail("receipts.required", "needs envoy.failure_mode_allow: false; with fail-open Envoy serves requests without knhk (and so without a receipt) whenever knhk is down or slower than envoy.message_timeout")
	}
	if err := c.Receipts.validate(fail); err != nil {
		return err
	}
	if err := c.Identity.validate(fail); err != nil {
		return err
	}
	if err := c.validateRegion(fail); err != nil {
		return err
	}
	if c.Envoy.RouteTimeout < 0 {
		return fail("envoy.route_timeout", "must not be negative")
	}
	if c.DrainTimeout < 0 {
		return fail("drain_timeout", "must not be negative, got %s", c.DrainTimeout.D())
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		return fail("log.level", "%q is not one of debug, info, warn, error", c.Log.Level)
	}
	return nil
}

// Validate checks a config built in code (defaults plus flags).
func (c *Config) Validate() error { return c.validate("") }

// StickySources parses canary.sticky_keys.
func (c *Config) StickySources() ([]canary.Source, error) {
	if len(c.Canary.StickyKeys) == 0 {
		return nil, errors.New("needs at least one source, e.g. \"header:x-user-id\"")
	}
	seen := map[canary.Source]bool{}
	out := make([]canary.Source, 0, len(c.Canary.StickyKeys))
	for i, s := range c.Canary.StickyKeys {
		src, err := canary.ParseSource(s)
		if err != nil {
			return nil, fmt.Errorf("[%d] %w", i, err)
		}
		if seen[src] {
			return nil, fmt.Errorf("[%d] %q listed twice", i, s)
		}
		seen[src] = true
		out = append(out, src)
	}
	return out, nil
}

// checkAddr validates a listen address: host:port with a numeric port, 0
// meaning any free port.
func checkAddr(a string) error { return checkHostPort(a, 0) }

// checkDialAddr validates an address knhk or Envoy connects to, where port 0
// means nothing.
func checkDialAddr(a string) error { return checkHostPort(a, 1) }

func checkHostPort(a string, minPort int) error {
	host, port, err := net.SplitHostPort(a)
	if err != nil {
		return fmt.Errorf("%q is not host:port", a)
	}
	if host == "" && minPort == 0 {
		return fmt.Errorf("%q has no host (use 127.0.0.1 for loopback, 0.0.0.0 to listen everywhere)", a)
	}
	if host == "" {
		return fmt.Errorf("%q has no host (use 127.0.0.1 for this machine)", a)
	}
	p, err := strconv.Atoi(port)
	if err != nil || p < minPort || p > 65535 {
		return fmt.Errorf("%q: port must be %d..65535", a, minPort)
	}
	return nil
}

// GRPCAddressForEnvoy is where Envoy should dial knhk's gRPC listener.
func (c *Config) GRPCAddressForEnvoy() string {
	if c.Envoy.KnhkAddress != "" {
		return c.Envoy.KnhkAddress
	}
	return loopbackIfUnspecified(c.Listen.GRPC)
}

// loopbackIfUnspecified turns a listen-everywhere address into one to dial.
func loopbackIfUnspecified(addr string) string {
	host, port, _ := net.SplitHostPort(addr)
	if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port)
}

// XDSAddressForEnvoy is where Envoy should dial knhk's xDS listener.
func (c *Config) XDSAddressForEnvoy() string {
	if c.Envoy.XDSAddress != "" {
		return c.Envoy.XDSAddress
	}
	return loopbackIfUnspecified(c.Listen.XDS)
}
