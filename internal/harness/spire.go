package harness

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/knhk/knhk/pkg/config"
)

// SpireInstallHint is printed when the SPIRE binaries are missing.
const SpireInstallHint = "run `make tools` (it builds spire-server and spire-agent v1.13.3 from tools/spire/go.mod into .tools/bin; about 5 minutes the first time)"

// Spire is a running SPIRE server and agent (v1.13.3): sqlite datastore,
// join-token node attestation, unix workload attestation by binary path.
type Spire struct {
	TrustDomain  spiffeid.TrustDomain
	Dir          string // short temp dir: unix socket paths are limited to 108 bytes
	ServerSocket string
	AgentSocket  string // the Workload API and SDS socket
	AgentID      spiffeid.ID
	serverBin    string
	agentBin     string
	logs         io.Writer
	server       *process
	agent        *process
}

// process is a started command whose exit is observable.
type process struct {
	cmd  *exec.Cmd
	done chan error
}

func startProcess(logs io.Writer, bin string, args ...string) (*process, error) {
	p := &process{cmd: exec.Command(bin, args...), done: make(chan error, 1)}
	p.cmd.Stdout, p.cmd.Stderr = logs, logs
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", filepath.Base(bin), err)
	}
	go func() { p.done <- p.cmd.Wait() }()
	return p, nil
}

// exited returns the exit error if the process has ended.
func (p *process) exited() error {
	select {
	case err := <-p.done:
		p.done <- err
		return fmt.Errorf("%s exited: %w", filepath.Base(p.cmd.Path), err)
	default:
		return nil
	}
}

func (p *process) stop() {
	if p == nil || p.exited() != nil {
		return
	}
	_ = p.cmd.Process.Kill()
	err := <-p.done
	p.done <- errors.Join(errors.New("killed"), err)
}

// SpireBinaries returns the paths `make tools` installs spire-server and
// spire-agent at.
func SpireBinaries() (server, agent string, err error) {
	root, err := RepoRoot()
	if err != nil {
		return "", "", err
	}
	server = filepath.Join(root, ".tools", "bin", "spire-server")
	agent = filepath.Join(root, ".tools", "bin", "spire-agent")
	for _, b := range []string{server, agent} {
		if _, err := os.Stat(b); err != nil {
			return "", "", fmt.Errorf("%s not found: %s", b, SpireInstallHint)
		}
	}
	return server, agent, nil
}

// StartSpire starts a SPIRE server and an agent attested with a join token,
// and waits until both are healthy.
func StartSpire(trustDomain string, logs io.Writer) (_ *Spire, err error) {
	serverBin, agentBin, err := SpireBinaries()
	if err != nil {
		return nil, err
	}
	td, err := spiffeid.TrustDomainFromString(trustDomain)
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "spire")
	if err != nil {
		return nil, err
	}
	s := &Spire{TrustDomain: td, Dir: dir, ServerSocket: filepath.Join(dir, "server.sock"), AgentSocket: filepath.Join(dir, "agent.sock"),
		serverBin: serverBin, agentBin: agentBin, logs: logs}
	defer func() {
		if err != nil {
			s.Close()
		}
	}()
	port, err := FreePort()
	if err != nil {
		return nil, err
	}
	serverConf := fmt.Sprintf(`server {
  bind_address = "127.0.0.1"
  bind_port = "%d"
  socket_path = %q
  trust_domain = %q
  data_dir = %q
  log_level = "WARN"
  ca_ttl = "24h"
  default_x509_svid_ttl = "1h"
}
plugins {
  DataStore "sql" {
    plugin_data {
      database_type = "sqlite3"
      connection_string = %q
    }
  }
  NodeAttestor "join_token" {
    plugin_data {}
  }
  KeyManager "memory" {
    plugin_data {}
  }
}
`, port, s.ServerSocket, trustDomain, filepath.Join(dir, "server"), filepath.Join(dir, "server", "datastore.sqlite3"))
	if err := os.WriteFile(filepath.Join(dir, "server.conf"), []byte(serverConf), 0o600); err != nil {
		return nil, err
	}
	if s.server, err = startProcess(logs, serverBin, "run", "-config", filepath.Join(dir, "server.conf")); err != nil {
		return nil, err
	}
	if err := s.waitHealthy(s.server, serverBin, s.ServerSocket); err != nil {
		return nil, fmt.Errorf("spire-server: %w", err)
	}
	out, err := s.serverCmd("token", "generate", "-ttl", "600")
	if err != nil {
		return nil, err
	}
	m := tokenLine.FindStringSubmatch(out)
	if m == nil {
		return nil, fmt.Errorf("spire-server token generate: no token in %q", out)
	}
	token := m[1]
	if s.AgentID, err = spiffeid.FromSegments(td, "spire", "agent", "join_token", token); err != nil {
		return nil, fmt.Errorf("join token %q: %w", token, err)
	}
	agentConf := fmt.Sprintf(`agent {
  data_dir = %q
  log_level = "WARN"
  server_address = "127.0.0.1"
  server_port = "%d"
  socket_path = %q
  trust_domain = %q
  insecure_bootstrap = true
  join_token = %q
}
plugins {
  NodeAttestor "join_token" {
    plugin_data {}
  }
  KeyManager "memory" {
    plugin_data {}
  }
  WorkloadAttestor "unix" {
    plugin_data {
      discover_workload_path = true
    }
  }
}
`, filepath.Join(dir, "agent"), port, s.AgentSocket, trustDomain, token)
	if err := os.WriteFile(filepath.Join(dir, "agent.conf"), []byte(agentConf), 0o600); err != nil {
		return nil, err
	}
	if err := s.StartAgent(); err != nil {
		return nil, err
	}
	return s, nil
}

// StartAgent starts the agent (again, after StopAgent) and waits until it
// is healthy.
func (s *Spire) StartAgent() error {
	var err error
	if s.agent, err = startProcess(s.logs, s.agentBin, "run", "-config", filepath.Join(s.Dir, "agent.conf")); err != nil {
		return err
	}
	if err := s.waitHealthy(s.agent, s.agentBin, s.AgentSocket); err != nil {
		return fmt.Errorf("spire-agent: %w", err)
	}
	return nil
}

// StopAgent kills the agent: workloads keep the SVIDs they hold.
func (s *Spire) StopAgent() { s.agent.stop() }

func (s *Spire) waitHealthy(p *process, bin, socket string) error {
	return Poll(60*time.Second, 100*time.Millisecond, func() error {
		if err := p.exited(); err != nil {
			return err
		}
		out, err := exec.Command(bin, "healthcheck", "-socketPath", socket).CombinedOutput()
		if err != nil {
			return fmt.Errorf("healthcheck: %w: %s", err, bytes.TrimSpace(out))
		}
		return nil
	})
}

func (s *Spire) serverCmd(args ...string) (string, error) {
	args = append(args, "-socketPath", s.ServerSocket)
	out, err := exec.Command(s.serverBin, args...).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("spire-server %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return string(out), nil
}

var tokenLine = regexp.MustCompile(`(?m)^Token:\s*(\S+)`)

var entryIDLine = regexp.MustCompile(`(?m)^Entry ID\s*:\s*(\S+)`)

// Register creates an entry giving the workload whose executable is bin the
// SPIFFE ID id, with the given SVID lifetime. It returns the entry id.
func (s *Spire) Register(id spiffeid.ID, bin string, ttl time.Duration) (string, error) {
	real, err := filepath.EvalSymlinks(bin)
	if err != nil {
		return "", err
	}
	out, err := s.serverCmd("entry", "create", "-parentID", s.AgentID.String(), "-spiffeID", id.String(),
		"-selector", "unix:path:"+real, "-x509SVIDTTL", strconv.Itoa(int(ttl.Seconds())))
	if err != nil {
		return "", err
	}
	m := entryIDLine.FindStringSubmatch(out)
	if m == nil {
		return "", fmt.Errorf("spire-server entry create: no entry id in %q", out)
	}
	return m[1], nil
}

// FetchSVIDs waits until the Workload API gives this process SVIDs for
// every id in want, and returns them by id with the trust bundles.
func (s *Spire) FetchSVIDs(timeout time.Duration, want ...spiffeid.ID) (map[spiffeid.ID]*x509svid.SVID, *x509bundle.Set, error) {
	got := map[spiffeid.ID]*x509svid.SVID{}
	var bundles *x509bundle.Set
	err := Poll(timeout, 200*time.Millisecond, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		xc, err := workloadapi.FetchX509Context(ctx, workloadapi.WithAddr("unix://"+s.AgentSocket))
		if err != nil {
			return err
		}
		bundles = xc.Bundles
		for _, sv := range xc.SVIDs {
			got[sv.ID] = sv
		}
		for _, id := range want {
			if got[id] == nil {
				return fmt.Errorf("no SVID for %s yet", id)
			}
		}
		return nil
	})
	return got, bundles, err
}

// Close stops the agent and server and removes their directory.
func (s *Spire) Close() {
	s.agent.stop()
	s.server.stop()
	_ = os.RemoveAll(s.Dir)
}

// IdentityFor is knhk's identity config taking SVIDs from this agent, with
// envoy allowed on ext_proc and xDS and admin on the admin API, and the
// `knhk envoy-config` flags that give Envoy its SVID over SDS and make it
// accept only knhk.
func (s *Spire) IdentityFor(knhk, envoy, admin spiffeid.ID) (config.Identity, []string) {
	id := config.Identity{TrustDomain: s.TrustDomain.Name(), Socket: "unix://" + s.AgentSocket,
		Allowed: config.AllowedIdentity{ExtProc: []string{envoy.String()}, XDS: []string{envoy.String()}, Admin: []string{admin.String()}}}
	return id, []string{"--spiffe", "--spiffe-agent-socket", s.AgentSocket, "--spiffe-envoy-id", envoy.String(), "--spiffe-knhk-id", knhk.String()}
}

// FixedSVID serves one SVID (a test client's).
type FixedSVID struct{ *x509svid.SVID }

// GetX509SVID returns the SVID.
func (f FixedSVID) GetX509SVID() (*x509svid.SVID, error) { return f.SVID, nil }

// ClientTLS presents svid (none when nil) and accepts only server.
func ClientTLS(svid *x509svid.SVID, bundles *x509bundle.Set, server spiffeid.ID) *tls.Config {
	if svid == nil {
		return tlsconfig.TLSClientConfig(bundles, tlsconfig.AuthorizeID(server))
	}
	return tlsconfig.MTLSClientConfig(FixedSVID{svid}, bundles, tlsconfig.AuthorizeID(server))
}

// H2Preface is an HTTP/2 client preface and an empty SETTINGS frame: sent
// on a new connection to a gRPC server, it makes the server answer with its
// own SETTINGS (and, under TLS 1.3, judge the client certificate first).
const H2Preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"

// GRPCAnswers opens a new connection to a gRPC listener (TLS when cfg is
// set), sends the preface and waits for the server's SETTINGS frame: an
// admitted client gets it, a refused one a TLS alert.
func GRPCAnswers(addr string, cfg *tls.Config) error {
	var c net.Conn
	var err error
	nd := &net.Dialer{Timeout: 2 * time.Second}
	if cfg != nil {
		cfg = cfg.Clone()
		cfg.NextProtos = []string{"h2"}
		c, err = (&tls.Dialer{NetDialer: nd, Config: cfg}).DialContext(context.Background(), "tcp", addr)
	} else {
		c, err = nd.Dial("tcp", addr)
	}
	if err != nil {
		return err
	}
	defer func() { _ = c.Close() }()
	if _, err := c.Write([]byte(H2Preface)); err != nil {
		return err
	}
	_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
	buf := make([]byte, 9)
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if buf[3] != 0x04 {
		return fmt.Errorf("first frame type %d, want SETTINGS", buf[3])
	}
	return nil
}

// AdminClient is an HTTP client for knhk's admin API over mTLS.
func AdminClient(cfg *tls.Config) *http.Client {
	return &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: cfg}}
}
