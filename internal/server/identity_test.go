package server

import (
	"context"
	"log/slog"
	"net/http"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/knhk/knhk/internal/harness"
	"github.com/knhk/knhk/internal/spiffetest"
	"github.com/knhk/knhk/pkg/identity"
)

// TestListenersRequireAllowedSPIFFEIDs: with identity configured, the
// gRPC and admin listeners accept only mTLS clients with an allowed ID.
func TestListenersRequireAllowedSPIFFEIDs(t *testing.T) {
	dir := t.TempDir()
	ca := spiffetest.NewCA(t, "example.org")
	bundle := ca.Bundle(t, dir)
	cert, key := ca.Issue(t, dir, "knhk", "spiffe://example.org/knhk", 1)
	cfg := testConfig(t)
	cfg.Identity.TrustDomain = "example.org"
	cfg.Identity.Files.Cert, cfg.Identity.Files.Key, cfg.Identity.Files.Bundle = cert, key, bundle
	cfg.Identity.Allowed.ExtProc = []string{"spiffe://example.org/envoy"}
	cfg.Identity.Allowed.XDS = []string{"spiffe://example.org/envoy"}
	cfg.Identity.Allowed.Admin = []string{"spiffe://example.org/operator"}
	s, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { _ = s.Serve(ctx) }()

	td := spiffeid.RequireTrustDomainFromString("example.org")
	bundles, err := x509bundle.Load(td, bundle)
	if err != nil {
		t.Fatal(err)
	}
	svidFor := func(id string) *x509svid.SVID {
		c, k := ca.Issue(t, dir, "client", id, 2)
		v, err := x509svid.Load(c, k)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	knhkID := spiffeid.RequireFromString("spiffe://example.org/knhk")
	healthCheck := func(id string) error {
		tlsCfg := identity.ClientTLS(svidFor(id), bundles, knhkID)
		conn, err := grpc.NewClient(s.GRPCAddr(), grpc.WithTransportCredentials(credentials.NewTLS(tlsCfg)))
		if err != nil {
			return err
		}
		defer conn.Close()
		cctx, ccancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer ccancel()
		_, err = healthpb.NewHealthClient(conn).Check(cctx, &healthpb.HealthCheckRequest{})
		return err
	}
	if err := harness.Poll(5*time.Second, 20*time.Millisecond, func() error { return healthCheck("spiffe://example.org/envoy") }); err != nil {
		t.Fatalf("allowed caller refused: %v", err)
	}
	if err := healthCheck("spiffe://example.org/intruder"); err == nil {
		t.Fatal("a caller whose SPIFFE ID is not allowed on the gRPC listener got in")
	}
	get := func(id string) error {
		c := &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{
			TLSClientConfig: identity.ClientTLS(svidFor(id), bundles, knhkID)}}
		resp, err := c.Get("https://" + s.AdminAddr() + "/healthz")
		if err != nil {
			return err
		}
		return resp.Body.Close()
	}
	if err := get("spiffe://example.org/operator"); err != nil {
		t.Fatalf("admin refused its operator: %v", err)
	}
	if err := get("spiffe://example.org/envoy"); err == nil {
		t.Fatal("Envoy's ID got into the admin listener, which allows only the operator")
	}
	if resp, err := http.Get("http://" + s.AdminAddr() + "/healthz"); err == nil {
		_ = resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			t.Fatal("plain HTTP reached the admin listener")
		}
	}
}
