package e2e

import (
	"context"
	"crypto/tls"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/knhk/knhk/internal/harness"
	"github.com/knhk/knhk/pkg/config"
)

const spiffeTD = "knhk.test"

var (
	idKnhk     = spiffeid.RequireFromString("spiffe://knhk.test/knhk")
	idEnvoy    = spiffeid.RequireFromString("spiffe://knhk.test/envoy")
	idOperator = spiffeid.RequireFromString("spiffe://knhk.test/operator")
	idIntruder = spiffeid.RequireFromString("spiffe://knhk.test/intruder")
)

// spiffeEnv is a real SPIRE (server + agent) issuing SVIDs to knhk and to
// Envoy by their executables' paths, and an Envoy ⇄ knhk stack on mTLS.
type spiffeEnv struct {
	spire   *harness.Spire
	svids   map[spiffeid.ID]*x509svid.SVID // held by this test process
	bundles *x509bundle.Set
	stack   *harness.Stack
	logs    *harness.LogBuffer
}

// clientTLS presents id's SVID (none when id is zero) and accepts only knhk.
func (e *spiffeEnv) clientTLS(id spiffeid.ID) *tls.Config {
	return harness.ClientTLS(e.svids[id], e.bundles, idKnhk)
}

// startSPIFFE registers knhk and Envoy with the given SVID lifetimes, and
// this test process as operator, intruder, Envoy and knhk (long-lived,
// to probe the listeners and to write fallback files), then starts the
// stack with identity on every knhk listener.
func startSPIFFE(t *testing.T, knhkTTL, envoyTTL time.Duration, configure func(*config.Config)) *spiffeEnv {
	t.Helper()
	needEnvoy(t)
	lg := logs(t)
	sp, err := harness.StartSpire(spiffeTD, lg)
	if err != nil {
		t.Fatal(err) // never skipped: the error says how to install SPIRE
	}
	t.Cleanup(sp.Close)
	envoyBin, err := harness.EnvoyPath()
	if err != nil {
		t.Fatal(err)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range []struct {
		id  spiffeid.ID
		bin string
		ttl time.Duration
	}{
		{idKnhk, filepath.Join(binDir, "knhk"), knhkTTL}, {idEnvoy, envoyBin, envoyTTL},
		{idOperator, self, time.Hour}, {idIntruder, self, time.Hour}, {idEnvoy, self, time.Hour}, {idKnhk, self, time.Hour},
	} {
		if _, err := sp.Register(r.id, r.bin, r.ttl); err != nil {
			t.Fatal(err)
		}
	}
	svids, bundles, err := sp.FetchSVIDs(60*time.Second, idOperator, idIntruder, idEnvoy, idKnhk)
	if err != nil {
		t.Fatalf("this process got no SVIDs from the SPIRE agent: %v", err)
	}
	e := &spiffeEnv{spire: sp, svids: svids, bundles: bundles, logs: lg}
	ident, envoyArgs := sp.IdentityFor(idKnhk, idEnvoy, idOperator)
	admin := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: e.clientTLS(idOperator)}}
	e.stack = startStack(t, harness.StackOptions{Weight: 20, Logs: lg, AdminHTTP: admin,
		Configure: func(c *config.Config) {
			c.Identity = ident
			if configure != nil {
				configure(c)
			}
		},
		EnvoyArgs: envoyArgs,
	})
	return e
}

// servedSerial handshakes with knhk's admin listener as the operator and
// returns the serial of the certificate knhk presents.
func (e *spiffeEnv) servedSerial() (string, error) {
	d := tls.Dialer{NetDialer: &net.Dialer{Timeout: 2 * time.Second}, Config: e.clientTLS(idOperator)}
	c, err := d.DialContext(context.Background(), "tcp", e.stack.Knhk.Config.Listen.Admin)
	if err != nil {
		return "", err
	}
	defer func() { _ = c.Close() }()
	return c.(*tls.Conn).ConnectionState().PeerCertificates[0].SerialNumber.String(), nil
}

// envoySerials lists the serials of the certificates Envoy holds (admin /certs).
func envoySerials(e *harness.Envoy) ([]string, error) {
	var certs struct {
		Certificates []struct {
			CertChain []struct {
				SerialNumber string `json:"serial_number"`
			} `json:"cert_chain"`
		} `json:"certificates"`
	}
	if err := harness.GetJSON(e.AdminURL()+"/certs", &certs); err != nil {
		return nil, err
	}
	var out []string
	for _, c := range certs.Certificates {
		for _, cc := range c.CertChain {
			out = append(out, cc.SerialNumber)
		}
	}
	return out, nil
}

// TestSPIFFEWithSPIRE: Envoy gets its SVID from the SPIRE agent over SDS,
// knhk from the Workload API; canary routing works over mTLS, each
// listener admits only its allowed IDs, and traffic flows across SVID
// rotations with zero failed requests.
func TestSPIFFEWithSPIRE(t *testing.T) {
	const ttl = 20 * time.Second // SPIRE rotates at half the lifetime
	e := startSPIFFE(t, ttl, ttl, nil)
	s := e.stack

	t.Run("canary routing over mTLS", func(t *testing.T) {
		us := users("spiffe-user", 2000)
		got := userVersions(t, s, us, nil)
		canary := 0
		for _, v := range got {
			if v == "canary" {
				canary++
			}
		}
		if share := float64(canary) / float64(len(us)) * 100; share < 16 || share > 24 {
			t.Fatalf("canary share %.1f%% through Envoy over mTLS, want about 20%%", share)
		}
		again := userVersions(t, s, us[:200], nil)
		for u, v := range again {
			if got[u] != v {
				t.Fatalf("user %s moved from %s to %s", u, got[u], v)
			}
		}
		// Envoy really holds a SPIRE SVID, and knhk serves one.
		if serials, err := envoySerials(s.Envoy); err != nil || len(serials) == 0 {
			t.Fatalf("Envoy holds no SDS certificate: %v %v", serials, err)
		}
		if _, err := e.servedSerial(); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("listeners refuse IDs not allowed and clients without certificates", func(t *testing.T) {
		grpcAddr, xdsAddr := s.Knhk.Config.Listen.GRPC, s.Knhk.Config.Listen.XDS
		for name, addr := range map[string]string{"ext_proc": grpcAddr, "xds": xdsAddr} {
			if err := harness.GRPCAnswers(addr, e.clientTLS(idEnvoy)); err != nil {
				t.Fatalf("%s: Envoy's ID was refused: %v", name, err)
			}
			for _, id := range []spiffeid.ID{idIntruder, idOperator, {}} {
				err := harness.GRPCAnswers(addr, e.clientTLS(id))
				if err == nil {
					t.Fatalf("%s admitted %q", name, id)
				}
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					t.Fatalf("%s: %q got no answer at all rather than a refusal: %v", name, id, err)
				}
			}
		}
		for _, id := range []spiffeid.ID{idIntruder, idEnvoy, {}} {
			c := &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{TLSClientConfig: e.clientTLS(id)}}
			resp, err := c.Get(s.Knhk.AdminURL() + "/metrics")
			if err == nil {
				_ = resp.Body.Close()
				t.Fatalf("admin answered %q with %s", id, resp.Status)
			}
		}
		plain := &http.Client{Timeout: 3 * time.Second}
		if resp, err := plain.Get("http://" + s.Knhk.Config.Listen.Admin + "/metrics"); err == nil && resp.StatusCode == http.StatusOK {
			_ = resp.Body.Close()
			t.Fatal("admin answered plaintext HTTP")
		}
		m, err := s.Knhk.Get("/metrics")
		if err != nil || !strings.Contains(string(m), "knhk_svid_expiry_seconds") {
			t.Fatalf("operator cannot read metrics with the SVID expiry: %v", err)
		}
	})

	t.Run("bad identity config at start", func(t *testing.T) { badConfigAtStart(t, e) })

	t.Run("rotation with zero failed requests", func(t *testing.T) {
		load := harness.StartLoad(s.URL, 50, "rot")
		knhkSerials, envoyAll := map[string]bool{}, map[string]bool{}
		err := harness.Poll(4*ttl, 200*time.Millisecond, func() error {
			if sn, err := e.servedSerial(); err == nil {
				knhkSerials[sn] = true
			}
			if sns, err := envoySerials(s.Envoy); err == nil {
				for _, sn := range sns {
					envoyAll[sn] = true
				}
			}
			// Three serials each means two rotations of each side's SVID.
			if len(knhkSerials) < 3 || len(envoyAll) < 3 {
				return fmt.Errorf("seen %d knhk and %d Envoy certificates", len(knhkSerials), len(envoyAll))
			}
			return nil
		})
		samples := load.Stop()
		if err != nil {
			t.Fatalf("SVIDs did not rotate twice: %v", err)
		}
		failed := 0
		for _, x := range samples {
			if x.Code != http.StatusOK {
				failed++
			}
		}
		if failed > 0 || len(samples) < 100 {
			t.Fatalf("%d of %d requests failed across rotations", failed, len(samples))
		}
		t.Logf("%d requests, 0 failed, across %d knhk and %d Envoy certificates", len(samples), len(knhkSerials), len(envoyAll))
	})
}

// TestSPIFFEAgentStopped: with the SPIRE agent gone, knhk keeps serving on
// the SVID it holds and warns as expiry approaches; restarted without an
// agent, it falls back to the identity files.
func TestSPIFFEAgentStopped(t *testing.T) {
	const ttl, margin = 48 * time.Second, 16 * time.Second // rotation comes at 24 s left, above the margin
	e := startSPIFFE(t, ttl, time.Hour, func(c *config.Config) { c.Identity.ExpiryWarning = config.Duration(margin) })
	s := e.stack
	ok := func() error {
		r, err := get(s.URL+"/", map[string]string{"x-user-id": "agent-stopped"})
		if err != nil {
			return err
		}
		if r.status != http.StatusOK {
			return fmt.Errorf("status %d", r.status)
		}
		return nil
	}
	if err := ok(); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(e.logs.String(), "SVID expires soon") {
		t.Fatal("expiry warning while the agent was rotating SVIDs")
	}
	e.spire.StopAgent()
	// Every request succeeds until knhk warns about the coming expiry.
	err := harness.Poll(ttl, 100*time.Millisecond, func() error {
		if err := ok(); err != nil {
			return fmt.Errorf("request failed with the agent stopped: %w", err)
		}
		if !strings.Contains(e.logs.String(), "SVID expires soon") {
			return errors.New("no expiry warning yet")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}

	// Restart without an agent: the Workload API is unreachable at start,
	// so knhk serves the fallback files.
	dir := t.TempDir()
	sv := e.svids[idKnhk]
	certPEM, keyDER, err := sv.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	var bundlePEM []byte
	b, _ := e.bundles.GetX509BundleForTrustDomain(spiffeid.RequireTrustDomainFromString(spiffeTD))
	for _, c := range b.X509Authorities() {
		bundlePEM = append(bundlePEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	files := config.IdentityFiles{Cert: filepath.Join(dir, "svid.pem"), Key: filepath.Join(dir, "svid-key.pem"), Bundle: filepath.Join(dir, "bundle.pem")}
	for p, data := range map[string][]byte{files.Cert: certPEM, files.Key: keyDER, files.Bundle: bundlePEM} {
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	cfg := s.Knhk.Config
	cfg.Identity.Files = files
	if err := harness.WriteConfig(s.Knhk.ConfigPath, cfg); err != nil {
		t.Fatal(err)
	}
	s.Knhk.Config = cfg
	if err := s.Knhk.Restart(false); err != nil {
		t.Fatal(err)
	}
	if err := harness.Poll(20*time.Second, 100*time.Millisecond, ok); err != nil {
		t.Fatalf("no traffic on the fallback files: %v", err)
	}
	sn, err := e.servedSerial()
	if err != nil {
		t.Fatal(err)
	}
	if want := sv.Certificates[0].SerialNumber.String(); sn != want {
		t.Fatalf("knhk serves certificate %s, want the fallback file's %s", sn, want)
	}
	if !strings.Contains(e.logs.String(), "using the identity files") {
		t.Fatal("no log line saying knhk fell back to the files")
	}
}

// badConfigAtStart: knhk refuses to start, naming the key, on a trust
// domain that does not match the SPIRE agent's SVIDs and on a Workload API
// socket that is not there.
func badConfigAtStart(t *testing.T, e *spiffeEnv) {
	base := e.stack.Knhk.Config
	for name, c := range map[string]struct {
		edit func(*config.Identity)
		want []string
	}{
		"trust domain mismatch": {func(i *config.Identity) {
			i.TrustDomain = "other.test"
			i.Allowed = config.AllowedIdentity{ExtProc: []string{"spiffe://other.test/envoy"}, XDS: []string{"spiffe://other.test/envoy"}, Admin: []string{"spiffe://other.test/op"}}
		}, []string{"identity.workload_api_socket", "not in trust domain other.test"}},
		"socket not there": {func(i *config.Identity) { i.Socket = "unix://" + filepath.Join(t.TempDir(), "agent.sock") }, []string{"identity.workload_api_socket", "no such file"}},
	} {
		t.Run(name, func(t *testing.T) {
			cfg := base
			c.edit(&cfg.Identity)
			cfg.DataDir = t.TempDir()
			path := filepath.Join(t.TempDir(), "knhk.yaml")
			if err := harness.WriteConfig(path, cfg); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			out, err := exec.CommandContext(ctx, filepath.Join(binDir, "knhk"), "serve", "--config", path).CombinedOutput()
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() != 1 {
				t.Fatalf("knhk serve: %v, want exit 1\n%s", err, out)
			}
			for _, w := range c.want {
				if !strings.Contains(string(out), w) {
					t.Fatalf("error does not say %q:\n%s", w, out)
				}
			}
		})
	}
}
