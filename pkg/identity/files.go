// Package identity provides knhk's SPIFFE identity: X.509-SVIDs and trust
// bundles (from the Workload API, or from files as a fallback), mTLS
// configs for its listeners and clients, and authorization by SPIFFE ID.
// The Workload API source and the listener wiring follow (issue 6); this
// file is the file fallback.
package identity

import (
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// Files is an SVID and trust bundle read from PEM files and reloaded when
// any of them changes, so a rotated certificate is picked up without a
// restart. It implements x509svid.Source and x509bundle.Source.
type Files struct {
	cert, key, bundle string
	td                spiffeid.TrustDomain
	log               *slog.Logger

	mu      sync.RWMutex
	svid    *x509svid.SVID
	bundles *x509bundle.Bundle
	mtimes  [3]time.Time
	stop    chan struct{}
}

// LoadFiles reads the files once; it fails naming the file and the reason.
func LoadFiles(td spiffeid.TrustDomain, cert, key, bundle string, log *slog.Logger) (*Files, error) {
	f := &Files{cert: cert, key: key, bundle: bundle, td: td, log: log, stop: make(chan struct{})}
	if err := f.load(); err != nil {
		return nil, err
	}
	return f, nil
}

func (f *Files) load() error {
	var m [3]time.Time
	for i, p := range []string{f.cert, f.key, f.bundle} {
		st, err := os.Stat(p)
		if err != nil {
			return fmt.Errorf("identity file %s: %w", p, err)
		}
		m[i] = st.ModTime()
		// Stat follows symlinks (a Kubernetes secret volume), so this is
		// the mode of the key itself.
		if p == f.key && st.Mode().Perm()&0o077 != 0 {
			return fmt.Errorf("identity file %s: mode %04o gives group or others access to the private key; run chmod 600 %s", p, st.Mode().Perm(), p)
		}
	}
	svid, err := x509svid.Load(f.cert, f.key)
	if err != nil {
		return fmt.Errorf("identity files %s, %s: %w", f.cert, f.key, err)
	}
	if svid.ID.TrustDomain() != f.td {
		return fmt.Errorf("identity file %s: SVID %s is not in trust domain %s", f.cert, svid.ID, f.td)
	}
	b, err := x509bundle.Load(f.td, f.bundle)
	if err != nil {
		return fmt.Errorf("identity file %s: %w", f.bundle, err)
	}
	f.mu.Lock()
	f.svid, f.bundles, f.mtimes = svid, b, m
	f.mu.Unlock()
	return nil
}

// Watch reloads the files every period when one changed, until Close. A
// bad rewrite is logged and the last good SVID kept.
func (f *Files) Watch(period time.Duration) {
	t := time.NewTicker(period)
	defer t.Stop()
	for {
		select {
		case <-f.stop:
			return
		case <-t.C:
		}
		changed := false
		f.mu.RLock()
		for i, p := range []string{f.cert, f.key, f.bundle} {
			if st, err := os.Stat(p); err == nil && !st.ModTime().Equal(f.mtimes[i]) {
				changed = true
			}
		}
		f.mu.RUnlock()
		if !changed {
			continue
		}
		if err := f.load(); err != nil {
			f.log.Error("identity files changed but do not load; keeping the current SVID", "error", err.Error())
			continue
		}
		f.log.Info("identity files reloaded", "spiffe_id", f.SVIDID().String())
	}
}

// Close stops Watch.
func (f *Files) Close() { close(f.stop) }

// GetX509SVID implements x509svid.Source.
func (f *Files) GetX509SVID() (*x509svid.SVID, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.svid, nil
}

// GetX509BundleForTrustDomain implements x509bundle.Source.
func (f *Files) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	if td != f.td {
		return nil, fmt.Errorf("no bundle for trust domain %s (only %s)", td, f.td)
	}
	return f.bundles, nil
}

// SVIDID is the current SVID's SPIFFE ID.
func (f *Files) SVIDID() spiffeid.ID {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.svid.ID
}

// Expiry is when the current SVID's certificate expires.
func (f *Files) Expiry() time.Time {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.svid.Certificates[0].NotAfter
}
