package identity

import (
	"crypto/tls"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// ParseAllowed parses the SPIFFE IDs allowed on a listener; every one must
// be in the trust domain. key names the config key in errors.
func ParseAllowed(key string, td spiffeid.TrustDomain, ids []string) ([]spiffeid.ID, error) {
	out := make([]spiffeid.ID, 0, len(ids))
	for i, s := range ids {
		id, err := spiffeid.FromString(s)
		if err != nil {
			return nil, fmt.Errorf("%s[%d]: %q is not a SPIFFE ID: %w", key, i, s, err)
		}
		if id.TrustDomain() != td {
			return nil, fmt.Errorf("%s[%d]: %s is not in trust domain %s", key, i, id, td)
		}
		out = append(out, id)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s: no SPIFFE ID allowed; list at least one", key)
	}
	return out, nil
}

// ServerTLS requires client SVIDs from the bundle and allows only ids.
func ServerTLS(svid x509svid.Source, bundle x509bundle.Source, ids []spiffeid.ID) *tls.Config {
	return tlsconfig.MTLSServerConfig(svid, bundle, tlsconfig.AuthorizeOneOf(ids...))
}

// ClientTLS presents svid and accepts only a server with the given id.
func ClientTLS(svid x509svid.Source, bundle x509bundle.Source, server spiffeid.ID) *tls.Config {
	return tlsconfig.MTLSClientConfig(svid, bundle, tlsconfig.AuthorizeID(server))
}
