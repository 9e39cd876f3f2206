package main

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/knhk/knhk/internal/harness"
	"github.com/knhk/knhk/pkg/config"
)

// mtlsBench: Envoy ⇄ knhk over SPIFFE mTLS (SVIDs from a real SPIRE, Envoy's
// over SDS) against the same pair in plaintext, in one run: per-request
// p50/p99 at a fixed rate, and the cost of a new connection.
func mtlsBench(bin, work string, logs *harness.LogBuffer) error {
	sp, err := harness.StartSpire("bench.knhk", logs)
	if err != nil {
		return err
	}
	defer sp.Close()
	td := sp.TrustDomain
	knhkID, envoyID := spiffeid.RequireFromPath(td, "/knhk"), spiffeid.RequireFromPath(td, "/envoy")
	envoyBin, err := harness.EnvoyPath()
	if err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	// This process also gets Envoy's ID, to open connections as Envoy does.
	for _, r := range []struct {
		id  spiffeid.ID
		bin string
	}{{knhkID, filepath.Join(bin, "knhk")}, {envoyID, envoyBin}, {envoyID, self}} {
		if _, err := sp.Register(r.id, r.bin, time.Hour); err != nil {
			return err
		}
	}
	svids, bundles, err := sp.FetchSVIDs(60*time.Second, envoyID)
	if err != nil {
		return err
	}
	clientTLS := harness.ClientTLS(svids[envoyID], bundles, knhkID)
	up, err := harness.StartUpstream("stable")
	if err != nil {
		return err
	}
	defer up.Close()
	// Receipts off in both: the comparison isolates the transport.
	plain, err := harness.StartStack(harness.StackOptions{BinDir: bin, Dir: filepath.Join(work, "plain"), Weight: 20, Logs: logs,
		StableAddr: up.Addr, CanaryAddr: up.Addr, Configure: func(c *config.Config) { c.Receipts.Enabled = false }})
	if err != nil {
		return err
	}
	defer func() { _ = plain.Close() }()
	ident, envoyArgs := sp.IdentityFor(knhkID, envoyID, envoyID)
	admin := harness.AdminClient(clientTLS)
	mtls, err := harness.StartStack(harness.StackOptions{BinDir: bin, Dir: filepath.Join(work, "mtls"), Weight: 20, Logs: logs,
		StableAddr: up.Addr, CanaryAddr: up.Addr, Configure: func(c *config.Config) { c.Identity = ident; c.Receipts.Enabled = false },
		EnvoyArgs: envoyArgs, AdminHTTP: admin})
	if err != nil {
		return err
	}
	defer func() { _ = mtls.Close() }()

	const rate = 1000
	fmt.Printf("\nSPIFFE mTLS between Envoy and knhk: %d req/s, 3 interleaved rounds of 8 s (median)\n", rate)
	a, b := abRounds(plain.URL, mtls.URL, rate)
	fmt.Printf("| Envoy ⇄ knhk | p50 | p99 | success (worst round) |\n|---|---|---|---|\n| plaintext | %s | %s | %.2f%% |\n| SPIFFE mTLS | %s | %s | %.2f%% |\n",
		ms(a.p50), ms(a.p99), a.success*100, ms(b.p50), ms(b.p99), b.success*100)
	fmt.Printf("added by mTLS: p50 %s, p99 %s\n", ms(b.p50-a.p50), ms(b.p99-a.p99))

	// New connections: what Envoy pays when it (re)connects to knhk —
	// TCP, then (mTLS) a TLS 1.3 handshake with knhk checking the client
	// SVID, until knhk's first HTTP/2 frame.
	const n = 300
	conn := func(addr string, tls bool) (p50, p99 time.Duration, err error) {
		ds := make([]time.Duration, 0, n)
		for range n {
			start := time.Now()
			if tls {
				err = harness.GRPCAnswers(addr, clientTLS)
			} else {
				err = harness.GRPCAnswers(addr, nil)
			}
			if err != nil {
				return 0, 0, err
			}
			ds = append(ds, time.Since(start))
		}
		slices.Sort(ds)
		return ds[n/2], ds[n*99/100], nil
	}
	p50p, p99p, err := conn(plain.Knhk.Config.Listen.GRPC, false)
	if err != nil {
		return err
	}
	p50m, p99m, err := conn(mtls.Knhk.Config.Listen.GRPC, true)
	if err != nil {
		return err
	}
	fmt.Printf("new connection to knhk's ext_proc listener (%d, sequential): plaintext p50 %s p99 %s; mTLS p50 %s p99 %s; handshake adds p50 %s\n",
		n, ms(p50p), ms(p99p), ms(p50m), ms(p99m), ms(p50m-p50p))
	return nil
}
