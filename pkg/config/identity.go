package config

import (
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/knhk/knhk/pkg/identity"
)

// Identity turns on mTLS with SPIFFE IDs for every listener.
type Identity struct {
	TrustDomain string          `yaml:"trust_domain"` // empty: off (loopback plaintext, local use only)
	Socket      string          `yaml:"workload_api_socket"`
	Files       IdentityFiles   `yaml:"files"`
	Allowed     AllowedIdentity `yaml:"allowed"`
	// ExpiryWarning: warn when the SVID has this little time left (SPIRE
	// rotates at half the lifetime, so this means rotation has stalled).
	ExpiryWarning Duration `yaml:"expiry_warning"`
}

// IdentityFiles is the fallback SVID when no Workload API is reachable.
type IdentityFiles struct {
	Cert   string `yaml:"cert"`
	Key    string `yaml:"key"`
	Bundle string `yaml:"bundle"`
}

// AllowedIdentity lists the SPIFFE IDs allowed on each listener.
type AllowedIdentity struct {
	ExtProc []string `yaml:"extproc"` // ext_proc/ext_authz callers (Envoy)
	XDS     []string `yaml:"xds"`
	Admin   []string `yaml:"admin"`
}

// Enabled reports whether identity is configured.
func (i *Identity) Enabled() bool { return i.TrustDomain != "" }

func (i *Identity) validate(fail failFunc) error {
	if !i.Enabled() {
		return nil
	}
	td, err := spiffeid.TrustDomainFromString(i.TrustDomain)
	if err != nil {
		return fail("identity.trust_domain", "%q: %v", i.TrustDomain, err)
	}
	for key, ids := range map[string][]string{
		"identity.allowed.extproc": i.Allowed.ExtProc, "identity.allowed.xds": i.Allowed.XDS, "identity.allowed.admin": i.Allowed.Admin,
	} {
		if _, err := identity.ParseAllowed(key, td, ids); err != nil {
			return fail("", "%v", err)
		}
	}
	if i.ExpiryWarning < 0 {
		return fail("identity.expiry_warning", "must not be negative")
	}
	f := i.Files
	if (f.Cert != "" || f.Key != "" || f.Bundle != "") && (f.Cert == "" || f.Key == "" || f.Bundle == "") {
		return fail("identity.files", "set cert, key and bundle together")
	}
	return nil
}
