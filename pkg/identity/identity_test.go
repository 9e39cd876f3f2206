package identity

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"log/slog"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// ca is a throwaway SPIFFE trust domain CA for tests.
type ca struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newCA(t *testing.T, td string) *ca {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse("spiffe://" + td)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"}, URIs: []*url.URL{u},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return &ca{cert: c, key: k}
}

// issue writes an SVID for id (cert + key PEM) into dir and returns the paths.
func (c *ca) issue(t *testing.T, dir, name, id string, serial int64) (string, string) {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse(id)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), URIs: []*url.URL{u},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.cert, &k.PublicKey, c.key)
	if err != nil {
		t.Fatal(err)
	}
	kd, _ := x509.MarshalPKCS8PrivateKey(k)
	cp, kp := filepath.Join(dir, name+".pem"), filepath.Join(dir, name+"-key.pem")
	write(t, cp, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	write(t, kp, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kd}))
	return cp, kp
}

func (c *ca) bundle(t *testing.T, dir string) string {
	p := filepath.Join(dir, "bundle.pem")
	write(t, p, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.cert.Raw}))
	return p
}

func write(t *testing.T, p string, b []byte) {
	// Write then rename: a watcher never sees a half-written file.
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, p); err != nil {
		t.Fatal(err)
	}
}

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
	authority := newCA(t, td)
	bundle := authority.bundle(t, dir)
	sc, sk := authority.issue(t, dir, "knhk", "spiffe://example.org/knhk", 100)
	server, err := LoadFiles(spiffeid.RequireTrustDomainFromString(td), sc, sk, bundle, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()
	go server.Watch(20 * time.Millisecond)
	addr := serve(t, server, "spiffe://example.org/envoy")

	client := func(id string) *tls.Config {
		cc, ck := authority.issue(t, dir, strings.ReplaceAll(id, "/", "_"), id, 200)
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
	authority.issue(t, dir, "knhk", "spiffe://example.org/knhk", 101)
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
	other := newCA(t, "other.org")
	c, k := other.issue(t, dir, "x", "spiffe://other.org/knhk", 1)
	b := other.bundle(t, dir)
	if _, err := LoadFiles(tdom, c, k, b, slog.New(slog.DiscardHandler)); err == nil || !strings.Contains(err.Error(), "not in trust domain") {
		t.Fatalf("trust domain mismatch: %v", err)
	}
}
