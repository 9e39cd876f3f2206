package identity

import (
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/knhk/knhk/internal/spiffetest"
)

const td = "example.org"

func serve(t *testing.T, f *Files, allowed ...string) string {
	ids, err := ParseAllowed("identity.allowed.extproc", spiffeid.RequireTrustDomainFromString(td), allowed)
	if err != nil {
		t.Fatal(err)
	}
	l, err := tls.Listen("tcp", "127.0.0.1:0", ServerTLS(f, f, ids))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				_ = c.(*tls.Conn).Handshake()
				_, _ = c.Write([]byte("ok"))
				_ = c.Close()
			}()
		}
	}()
	return l.Addr().String()
}

// dial connects with cfg and returns the server's certificate serial, or
// the error (a refused handshake surfaces on the first read).
func dial(addr string, cfg *tls.Config) (int64, error) {
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 2 * time.Second}, "tcp", addr, cfg)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	buf := make([]byte, 2)
	if _, err := c.Read(buf); err != nil {
		return 0, err
	}
	return c.ConnectionState().PeerCertificates[0].SerialNumber.Int64(), nil
}

func TestMTLSAllowsOnlyListedSPIFFEIDsAndReloadsFiles(t *testing.T) {
	dir := t.TempDir()
	authority := spiffetest.NewCA(t, td)
	bundle := authority.Bundle(t, dir)
	sc, sk := authority.Issue(t, dir, "knhk", "spiffe://example.org/knhk", 100)
	server, err := LoadFiles(spiffeid.RequireTrustDomainFromString(td), sc, sk, bundle, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()
	go server.Watch(20 * time.Millisecond)
	addr := serve(t, server, "spiffe://example.org/envoy")

	client := func(id string) *tls.Config {
		cc, ck := authority.Issue(t, dir, strings.ReplaceAll(id, "/", "_"), id, 200)
		svid, err := x509svid.Load(cc, ck)
		if err != nil {
			t.Fatal(err)
		}
		return ClientTLS(svid, server, spiffeid.RequireFromString("spiffe://example.org/knhk"))
	}
	serial, err := dial(addr, client("spiffe://example.org/envoy"))
	if err != nil || serial != 100 {
		t.Fatalf("allowed client: serial %d, %v", serial, err)
	}
	if _, err := dial(addr, client("spiffe://example.org/intruder")); err == nil {
		t.Fatal("a client with a SPIFFE ID that is not allowed got in")
	}
	noCert := &tls.Config{InsecureSkipVerify: true} //nolint:gosec // the test wants the server to refuse
	if _, err := dial(addr, noCert); err == nil {
		t.Fatal("a client without a certificate got in")
	}

	// Rotation: new files, new handshakes present the new certificate.
	authority.Issue(t, dir, "knhk", "spiffe://example.org/knhk", 101)
	deadline := time.Now().Add(5 * time.Second)
	for {
		serial, err := dial(addr, client("spiffe://example.org/envoy"))
		if err == nil && serial == 101 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("rotated SVID not served: serial %d, %v", serial, err)
		}
		time.Sleep(20 * time.Millisecond) // poll period
	}
}

func TestBadIdentityInput(t *testing.T) {
	tdom := spiffeid.RequireTrustDomainFromString(td)
	for ids, want := range map[string]string{
		"not-a-spiffe-id":             "is not a SPIFFE ID",
		"spiffe://other.org/envoy":    "not in trust domain example.org",
		"spiffe://example.org/Bad ID": "is not a SPIFFE ID",
	} {
		if _, err := ParseAllowed("identity.allowed.xds", tdom, []string{ids}); err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), "identity.allowed.xds[0]") {
			t.Errorf("%q: %v", ids, err)
		}
	}
	if _, err := ParseAllowed("identity.allowed.admin", tdom, nil); err == nil {
		t.Error("an empty allow list was accepted")
	}
	dir := t.TempDir()
	if _, err := LoadFiles(tdom, filepath.Join(dir, "nope.pem"), filepath.Join(dir, "k.pem"), filepath.Join(dir, "b.pem"), slog.New(slog.DiscardHandler)); err == nil || !strings.Contains(err.Error(), "nope.pem") {
		t.Fatalf("missing file: %v", err)
	}
	other := spiffetest.NewCA(t, "other.org")
	c, k := other.Issue(t, dir, "x", "spiffe://other.org/knhk", 1)
	b := other.Bundle(t, dir)
	if _, err := LoadFiles(tdom, c, k, b, slog.New(slog.DiscardHandler)); err == nil || !strings.Contains(err.Error(), "not in trust domain") {
		t.Fatalf("trust domain mismatch: %v", err)
	}
}

// A private key others can read is not a secret: refuse it, naming the file,
// its mode and the fix.
func TestKeyFileReadableByOthersIsRefused(t *testing.T) {
	tdom := spiffeid.RequireTrustDomainFromString(td)
	dir := t.TempDir()
	authority := spiffetest.NewCA(t, td)
	b := authority.Bundle(t, dir)
	c, k := authority.Issue(t, dir, "knhk", "spiffe://example.org/knhk", 1)
	for _, mode := range []os.FileMode{0o644, 0o640, 0o604, 0o660, 0o620} {
		if err := os.Chmod(k, mode); err != nil {
			t.Fatal(err)
		}
		_, err := LoadFiles(tdom, c, k, b, slog.New(slog.DiscardHandler))
		want := fmt.Sprintf("identity file %s: mode %04o gives group or others access to the private key; run chmod 600 %s", k, mode, k)
		if err == nil || err.Error() != want {
			t.Errorf("mode %04o:\n got  %v\n want %s", mode, err, want)
		}
	}
	for _, mode := range []os.FileMode{0o600, 0o400} {
		if err := os.Chmod(k, mode); err != nil {
			t.Fatal(err)
		}
		f, err := LoadFiles(tdom, c, k, b, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Errorf("mode %04o refused: %v", mode, err)
			continue
		}
		f.Close()
	}
}
