package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
)

func TestDefaultsAreValid(t *testing.T) {
	c := Default()
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if c.Listen.GRPC != "127.0.0.1:9002" || c.Listen.Admin != "127.0.0.1:9090" {
		t.Fatalf("defaults not on the contract's loopback ports: %+v", c.Listen)
	}
}

func TestParseOverridesDefaults(t *testing.T) {
	c, err := Parse("k.yaml", []byte(`
upstreams:
  stable: ["127.0.0.1:7001", "127.0.0.1:7003"]
  canary: ["127.0.0.1:7002"]
canary:
  weight: 12.5
  salt: "checkout-v2"
  sticky_keys: ["header:x-user-id"]
envoy:
  failure_mode_allow: false
  message_timeout: 350ms
`))
	if err != nil {
		t.Fatal(err)
	}
	if c.Canary.Weight != 12.5 || c.Canary.Salt != "checkout-v2" || len(c.Upstreams.Stable) != 2 {
		t.Fatalf("not parsed: %+v", c)
	}
	if c.Envoy.FailureModeAllow || c.Envoy.MessageTimeout.D() != 350*time.Millisecond {
		t.Fatalf("envoy section not parsed: %+v", c.Envoy)
	}
	if c.Listen.GRPC != "127.0.0.1:9002" {
		t.Fatal("unset key lost its default")
	}
}

func TestEmptyFileIsDefaults(t *testing.T) {
	c, err := Parse("empty.yaml", nil)
	if err != nil || c.Canary.Weight != Default().Canary.Weight {
		t.Fatalf("%v %+v", err, c)
	}
}

func TestErrorsNameFileKeyAndReason(t *testing.T) {
	cases := []errCase{
		{"canary:\n  weight: 150\n", "config bad.yaml: canary.weight: weight must be between 0 and 100, got 150"},
		{"canary:\n  wieght: 5\n", "config bad.yaml:2: canary.wieght: unknown key"},
		{"canary:\n  weight: lots\n", "config bad.yaml:2: canary.weight: want a number, got \"lots\""},
		{"upstreams:\n  stable: []\n", "upstreams.stable: needs at least one host:port"},
		{"upstreams:\n  stable: [\"nope\"]\n", "upstreams.stable[0]: \"nope\" is not host:port"},
		{"upstreams:\n  canary: []\n", "upstreams.canary: empty, but canary.weight is 20"},
		{"canary:\n  sticky_keys: [\"query:id\"]\n", "canary.sticky_keys: [0] \"query:id\": unknown source"},
		{"canary:\n  sticky_keys: [\"header:a\", \"header:A\"]\n", "canary.sticky_keys: [1] \"header:A\" listed twice"},
		{"listen:\n  grpc: \":9002\"\n", "listen.grpc: \":9002\" has no host"},
		{"drain_timeout: -1s\n", "drain_timeout: must not be negative"},
		{"drain_timeout: soon\n", "config bad.yaml:1: drain_timeout: want a duration like \"5s\" or \"200ms\", got \"soon\""},
		{"envoy:\n  listener_port: 70000\n", "envoy.listener_port: must be 1..65535"},
		{"envoy:\n  knhk_max_requests: -1\n", "envoy.knhk_max_requests: must be 0 (Envoy's default) to 1048576, got -1"},
		{"envoy:\n  knhk_max_requests: 500\nadmission:\n  enabled: true\n", "envoy.knhk_max_requests: 500 is not above admission.limiter.max (1000)"},
		{"log:\n  level: loud\n", "log.level: \"loud\" is not one of"},
		{"- a\n- b\n", "the file must be a mapping"},
		{"canary: [\n", "config bad.yaml: "},
		{"receipts:\n  required: true\n", "receipts.required: needs envoy.failure_mode_allow: false"},
	}
	expectErrors(t, "bad.yaml", cases)
}

func TestLoadMissingFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "nope.yaml")
	_, err := Load(p)
	if err == nil || !strings.Contains(err.Error(), p) {
		t.Fatalf("error does not name the file: %v", err)
	}
}

func TestExampleConfigsInRepoAreValid(t *testing.T) {
	files, _ := filepath.Glob("../../envoy/*knhk*.yaml")
	if len(files) == 0 {
		t.Fatal("no example knhk config in envoy/")
	}
	for _, f := range files {
		if _, err := Load(f); err != nil {
			t.Error(err)
		}
	}
	if _, err := os.Stat("../../envoy/knhk.yaml"); err != nil {
		t.Fatal(err)
	}
}

func TestGRPCAddressForEnvoy(t *testing.T) {
	c := Default()
	c.Listen.GRPC = "0.0.0.0:9002"
	if got := c.GRPCAddressForEnvoy(); got != "127.0.0.1:9002" {
		t.Fatal(got)
	}
	c.Envoy.KnhkAddress = "knhk.svc:9002"
	if got := c.GRPCAddressForEnvoy(); got != "knhk.svc:9002" {
		t.Fatal(got)
	}
}

func TestRolloutAndFlagErrors(t *testing.T) {
	cases := []errCase{
		{"rollout:\n  steps: [1, 5, 5, 100]\n", "rollout.steps[2]: 5 after 5: steps must be strictly increasing"},
		{"rollout:\n  steps: [10, 50]\n", "rollout.steps: the last step is 50; it must be 100"},
		{"rollout:\n  steps: [0, 100]\n", "rollout.steps[0]: 0: steps are weights in percent"},
		{"rollout:\n  steps: [50, 120]\n", "rollout.steps[1]"},
		{"rollout:\n  interval: -5s\n", "rollout.interval: must be positive"},
		{"rollout:\n  hard_window: -1s\n", "rollout.hard_window: must be positive"},
		{"rollout:\n  confidence: 1.5\n", "rollout.confidence"},
		{"rollout:\n  max_error_rate: 5\n", "rollout.max_error_rate: 5: a fraction from 0 to 1"},
		{"rollout:\n  failure_threshold: 0\n", "rollout.failure_threshold"},
		{"rollout:\n  webhooks: [{url: \"ftp://x\"}]\n", "rollout.webhooks[0].url"},
		{"rollout:\n  webhooks: [{urll: \"http://x\"}]\n", "rollout.webhooks[0].urll: unknown key"},
		{"rollout:\n  intervall: 5s\n", "rollout.intervall: unknown key"},
		{"environment: qa\n", "flags: environment \"qa\""},
		{"flags:\n  x:\n    environments: {prod: true}\n", "environments.prod: unknown environment"},
		{"flags:\n  x:\n    percent: 101\n", "flag \"x\": percent"},
		{"flags:\n  x:\n    dflt: true\n", "flags.x.dflt: unknown key"},
		{"envoy:\n  xds_api: rest\n", "envoy.xds_api"},
		{"listen:\n  xds: \"127.0.0.1:9002\"\n", "listen.xds: same address as listen.grpc"},
	}
	expectErrors(t, "r.yaml", cases)
}

func TestPromotionConfigDefaults(t *testing.T) {
	c := Default()
	p := c.PromotionConfig()
	if p.Window != 5*time.Second || p.Thresholds.Confidence != 0.99 || p.FailureThreshold != 2 || p.Steps[len(p.Steps)-1] != 100 {
		t.Fatalf("%+v", p)
	}
}

func TestIdentityErrors(t *testing.T) {
	cases := []errCase{
		{"identity:\n  trust_domain: \"Bad Domain\"\n", "identity.trust_domain"},
		{"identity:\n  trust_domain: example.org\n  allowed: {extproc: [\"spiffe://example.org/envoy\"], xds: [\"spiffe://other.org/envoy\"], admin: [\"spiffe://example.org/op\"]}\n", "identity.allowed.xds[0]: spiffe://other.org/envoy is not in trust domain example.org"},
		{"identity:\n  trust_domain: example.org\n  allowed: {extproc: [\"envoy\"], xds: [\"spiffe://example.org/e\"], admin: [\"spiffe://example.org/op\"]}\n", "identity.allowed.extproc[0]: \"envoy\" is not a SPIFFE ID"},
		{"identity:\n  trust_domain: example.org\n  allowed: {extproc: [\"spiffe://example.org/e\"], xds: [\"spiffe://example.org/e\"]}\n", "identity.allowed.admin: no SPIFFE ID allowed"},
		{"identity:\n  trust_domain: example.org\n  files: {cert: a.pem}\n  allowed: {extproc: [\"spiffe://example.org/e\"], xds: [\"spiffe://example.org/e\"], admin: [\"spiffe://example.org/e\"]}\n", "identity.files: set cert, key and bundle together"},
	}
	expectErrors(t, "i.yaml", cases)
}

type errCase = struct{ yaml, want string }

// expectErrors parses each case and wants an error containing want.
func expectErrors(t *testing.T, file string, cases []errCase) {
	t.Helper()
	for _, c := range cases {
		_, err := Parse(file, []byte(c.yaml))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q:\n got  %v\n want %s", c.yaml, err, c.want)
		}
	}
}

func TestReceiptsErrors(t *testing.T) {
	cases := []errCase{
		{"receipts:\n  kms: {provider: gcp}\n", "receipts.kms.provider: \"gcp\": want local, aws, azure or vault"},
		{"receipts:\n  kms: {provider: aws}\n", "receipts.kms.key_id: required for the aws provider"},
		{"receipts:\n  kms: {provider: azure, key_id: receipts, endpoint: \"http://vault\"}\n", "receipts.kms.endpoint: \"http://vault\": the azure provider needs the vault URL"},
		{"receipts:\n  kms: {provider: vault, key_id: receipts}\n", "receipts.kms.endpoint: the Vault server address is required"},
		{"receipts:\n  kms: {refresh_interval: 10ms}\n", "receipts.kms.refresh_interval: 10ms: at least 1s"},
		{"receipts:\n  delegation: 48h\n", "receipts.delegation: 48h0m0s: above 0 and at most 24h0m0s"},
		{"receipts:\n  batch_max_age: 2s\n", "receipts.batch_max_age"},
		{"receipts:\n  commit_wait: 50ms\n", "receipts.commit_wait"},
		{"receipts:\n  commit_wait: -1ms\n", "receipts.commit_wait"},
	}
	expectErrors(t, "rc.yaml", cases)
}

// A value of the wrong type is reported with the file, the line, the key's
// full path, what the key takes, and the value as written.
func TestTypeErrorsSayWhatWasExpected(t *testing.T) {
	long := strings.Repeat("x", 300)
	cases := []struct{ yaml, want string }{
		{"rollout:\n  interval: abcdefghijklmnop\n",
			`config t.yaml:2: rollout.interval: want a duration like "5s" or "200ms", got "abcdefghijklmnop"`},
		{"drain_timeout: 10\n",
			`config t.yaml:1: drain_timeout: want a duration like "5s" or "200ms", got "10"`},
		{"canary:\n  weight: \"20\"\n",
			`config t.yaml:2: canary.weight: want a number, got "20" (in quotes, so a string: remove the quotes)`},
		{"rollout:\n  min_requests: -5\n",
			`config t.yaml:2: rollout.min_requests: want a whole number, 0 or more, got "-5"`},
		{"envoy:\n  listener_port: 1.5\n",
			`config t.yaml:2: envoy.listener_port: want a whole number, got "1.5"`},
		{"envoy:\n  failure_mode_allow: maybe\n",
			`config t.yaml:2: envoy.failure_mode_allow: want true or false, got "maybe"`},
		{"rollout:\n  steps: 5\n",
			`config t.yaml:2: rollout.steps: want a list of numbers, got "5"`},
		{"rollout:\n  steps: [1, x, 100]\n",
			`config t.yaml:2: rollout.steps[1]: want a number, got "x"`},
		{"upstreams:\n  stable: 127.0.0.1:8001\n",
			`config t.yaml:2: upstreams.stable: want a list of strings, got "127.0.0.1:8001"`},
		{"envoy: 5\n",
			`config t.yaml:1: envoy: want a mapping of keys, got "5"`},
		{"log:\n  level: {a: 1}\n",
			`config t.yaml:2: log.level: want a string, got a mapping`},
		{"listen: {grpc: \"127.0.0.1:1\", admin: [x]}\n",
			`config t.yaml:1: listen.admin: want a string, got a list`},
		{"flags:\n  x:\n    percent: half\n",
			`config t.yaml:3: flags.x.percent: want a number, got "half"`},
		{"flags:\n  x: true\n",
			`config t.yaml:2: flags.x: want a mapping of keys, got "true"`},
		{"admission:\n  classes:\n    R1:\n      budget: fast\n",
			`config t.yaml:4: admission.classes.R1.budget: want a duration like "5s" or "200ms", got "fast"`},
		{"rollout:\n  webhooks:\n    - url: \"http://x\"\n      timeout: never\n",
			`config t.yaml:4: rollout.webhooks[0].timeout: want a duration like "5s" or "200ms", got "never"`},
		{"rollout:\n  webhooks: {url: \"http://x\"}\n",
			`config t.yaml:2: rollout.webhooks: want a list of mappings, got a mapping`},
		{"canary: &c {weight: 5}\ndrain_timeout: *c\n",
			`config t.yaml:1: drain_timeout: want a duration like "5s" or "200ms", got a mapping`},
		{"drain_timeout: " + long + "\n",
			`config t.yaml:1: drain_timeout: want a duration like "5s" or "200ms", got "` + long[:200] + `"…(300 bytes)`},
	}
	for _, c := range cases {
		_, err := Parse("t.yaml", []byte(c.yaml))
		if err == nil || err.Error() != c.want {
			t.Errorf("%q:\n got  %v\n want %s", c.yaml, err, c.want)
		}
	}
}

// The check follows YAML's own rules: what the decoder takes is not refused.
func TestTypeCheckAcceptsWhatYAMLAccepts(t *testing.T) {
	c, err := Parse("ok.yaml", []byte(`
drain_timeout: &d 3s
canary:
  weight: 7
  salt: 1234
envoy:
  failure_mode_allow: false
  message_timeout: 1s
rollout:
  steps: [1, 2.5, 100]
  min_requests: 0x10
  interval: *d
flags:
  x: {percent: 5, environments: {production: true}}
`))
	if err != nil {
		t.Fatal(err)
	}
	if c.Canary.Weight != 7 || c.Canary.Salt != "1234" || c.Rollout.MinRequests != 16 || *c.Flags["x"].Percent != 5 || c.Rollout.Interval.D() != 3*time.Second {
		t.Fatalf("%+v", c)
	}
}

func TestUpstreamPortZeroRefused(t *testing.T) {
	cases := []errCase{
		{"upstreams:\n  stable: [\"127.0.0.1:0\"]\n", `upstreams.stable[0]: "127.0.0.1:0": port must be 1..65535`},
		{"upstreams:\n  canary: [\"127.0.0.1:8002\", \"10.0.0.1:0\"]\n", `upstreams.canary[1]: "10.0.0.1:0": port must be 1..65535`},
		{"upstreams:\n  stable: [\"127.0.0.1:65536\"]\n", `upstreams.stable[0]: "127.0.0.1:65536": port must be 1..65535`},
		{"envoy:\n  knhk_address: \"knhk:0\"\n", `envoy.knhk_address: "knhk:0": port must be 1..65535`},
		{"envoy:\n  xds_address: \"knhk:0\"\n", `envoy.xds_address: "knhk:0": port must be 1..65535`},
	}
	expectErrors(t, "u.yaml", cases)
	// A listener may still ask for any free port.
	if _, err := Parse("l.yaml", []byte("listen: {grpc: \"127.0.0.1:0\", xds: \"127.0.0.1:0\", admin: \"127.0.0.1:0\"}\n")); err != nil {
		t.Fatal(err)
	}
}

// Tools write configs with yaml.Marshal (the e2e harness does): what it
// writes must pass the type check, flags and admission rules included.
func TestMarshalledConfigParses(t *testing.T) {
	c := Default()
	half := 50.0
	c.Flags = map[string]Flag{"x": {Percent: &half, Environments: map[string]bool{"production": true}}}
	c.Admission.Rules = []ClassRule{{Class: "C1", PathPrefix: "/batch", Methods: []string{"POST"}}}
	c.Rollout.Webhooks = []Webhook{{URL: "http://127.0.0.1:1/hook", Timeout: Duration(time.Second)}}
	b, err := yaml.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	got, err := Parse("m.yaml", b)
	if err != nil {
		t.Fatalf("%v\n%s", err, b)
	}
	if *got.Flags["x"].Percent != 50 || got.Rollout.Webhooks[0].Timeout.D() != time.Second || len(got.Admission.Rules) != 1 {
		t.Fatalf("%+v", got)
	}
}
