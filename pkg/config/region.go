package config

import (
	"encoding/base64"
	"net"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	fnote "github.com/transparency-dev/formats/note"
)

// Region makes this knhk one region among peers that witness (cosign) and
// mirror each other's receipt logs over C2SP tlog-witness. It is on when
// listen.region is set.
type Region struct {
	// Name names this region and its witness key (a C2SP key name).
	Name string `yaml:"name"`
	// Quorum is how many regions, this one included, must cosign a
	// checkpoint before its receipts are durable (0: a majority).
	Quorum int `yaml:"quorum"`
	// WitnessKey is the Ed25519 cosigning key file (default
	// <data_dir>/witness.key, created 0600 on first start).
	WitnessKey string `yaml:"witness_key"`
	// MirrorKey is the Ed25519 key this region cosigns with as a mirror of
	// its peers' logs, named <name>-mirror (default <data_dir>/mirror.key,
	// created 0600 on first start).
	MirrorKey string `yaml:"mirror_key"`
	// WitnessKMS keeps the cosigning key in a KMS instead of the key
	// file: a Vault Transit ed25519 key.
	WitnessKMS WitnessKMS   `yaml:"witness_kms"`
	Peers      []RegionPeer `yaml:"peers"`
}

// WitnessKMS names a KMS key that cosigns for this region. Only Vault
// Transit is offered: the cosignature (tlog-cosignature/v1) needs Ed25519.
type WitnessKMS struct {
	Provider string `yaml:"provider"` // empty (the key file region.witness_key) | vault
	Endpoint string `yaml:"endpoint"` // vault: the server address
	KeyID    string `yaml:"key_id"`   // vault: the Transit key's name (type ed25519)
	Mount    string `yaml:"mount"`    // vault: the Transit mount (default transit); the token comes from VAULT_TOKEN
}

// RegionPeer is another region: where to reach it, who it is, and the
// keys this region pins for it (never the ones it publishes about itself).
type RegionPeer struct {
	Name string `yaml:"name"`
	// URL is the peer's listen.region (https under identity, else http on
	// loopback).
	URL      string `yaml:"url"`
	SpiffeID string `yaml:"spiffe_id"`
	// WitnessKey is its cosignature/v1 verifier key (its GET /v1/keys
	// "witness_verifier_key").
	WitnessKey string `yaml:"witness_key"`
	// LogKeys are its checkpoint verifier keys, named after its log's
	// origin (its "log_verifier_keys").
	LogKeys []string `yaml:"log_keys"`
	// MirrorKey is its mirror cosignature/v1 verifier key (its
	// "mirror_verifier_key"). Set, this region pushes its entries to the
	// peer, and the peer counts toward the quorum once it holds them.
	MirrorKey string `yaml:"mirror_key"`
}

// RegionEnabled reports whether this knhk takes part in regions.
func (c *Config) RegionEnabled() bool { return c.Listen.Region != "" }

func (c *Config) validateRegion(fail failFunc) error {
	r := &c.Region
	if !c.RegionEnabled() {
		if r.Name != "" || len(r.Peers) > 0 || r.WitnessKMS != (WitnessKMS{}) {
			return fail("listen.region", "region.* is set but listen.region is empty: set the address the peers push checkpoints to")
		}
		return nil
	}
	if err := checkHostPort(c.Listen.Region, 0); err != nil {
		return fail("listen.region", "%v", err)
	}
	mtls := c.Identity.Enabled()
	if host, _, _ := net.SplitHostPort(c.Listen.Region); !mtls && !isLoopback(host) {
		return fail("listen.region", "%q is not a loopback address: without identity.* (SPIFFE mTLS) the region API stays on loopback", c.Listen.Region)
	}
	if !validKeyName(r.Name) {
		return fail("region.name", "%q: needs a name without spaces or '+' (it names this region's witness key)", r.Name)
	}
	if strings.HasSuffix(r.Name, "-mirror") {
		return fail("region.name", "%q: a name may not end in -mirror (it marks a region's mirror key)", r.Name)
	}
	if err := c.validateWitnessKMS(fail); err != nil {
		return err
	}
	if r.Quorum < 0 || r.Quorum > 1+len(r.Peers) {
		return fail("region.quorum", "must be 0 (a majority) to %d (this region and its %d peers), got %d", 1+len(r.Peers), len(r.Peers), r.Quorum)
	}
	names := map[string]bool{r.Name: true}
	urls := map[string]string{}
	logOrigins, originOwner := map[string]string{}, map[string]string{}
	for i, p := range r.Peers {
		key := func(f string) string { return "region.peers[" + strconv.Itoa(i) + "]." + f }
		if !validKeyName(p.Name) {
			return fail(key("name"), "%q: needs a name without spaces or '+'", p.Name)
		}
		if strings.HasSuffix(p.Name, "-mirror") {
			return fail(key("name"), "%q: a name may not end in -mirror (it marks a region's mirror key)", p.Name)
		}
		if policyWords[p.Name] {
			return fail(key("name"), "%q is a word of the witness policy grammar: choose another name", p.Name)
		}
		if names[p.Name] {
			return fail(key("name"), "%q is used twice (region.name and peer names must differ)", p.Name)
		}
		names[p.Name] = true
		u, err := url.Parse(p.URL)
		if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
			return fail(key("url"), "%q: want http(s)://host:port, the peer's listen.region", p.URL)
		}
		if other, ok := urls[u.Host]; ok {
			// Under mTLS the address names the SPIFFE ID to expect there.
			return fail(key("url"), "%q is also %s's URL: each peer has its own listen.region", p.URL, other)
		}
		urls[u.Host] = p.Name
		if mtls && u.Scheme != "https" {
			return fail(key("url"), "%q: with identity.* on, peers are reached over mTLS: use https", p.URL)
		}
		if !mtls && !isLoopback(u.Hostname()) {
			return fail(key("url"), "%q is not a loopback address: without identity.* (SPIFFE mTLS) peers must be on this machine", p.URL)
		}
		if mtls {
			if _, err := spiffeid.FromString(p.SpiffeID); err != nil {
				return fail(key("spiffe_id"), "%q: %v (with identity.* on, only this ID may push as %s)", p.SpiffeID, err, p.Name)
			}
		}
		wv, err := fnote.NewVerifierForCosignatureV1(p.WitnessKey)
		if err != nil {
			return fail(key("witness_key"), "not a cosignature/v1 verifier key (the peer's witness_verifier_key): %v", err)
		}
		if wv.Name() != p.Name {
			return fail(key("witness_key"), "the key is named %q: a region's witness key is named after the region (%q)", wv.Name(), p.Name)
		}
		if p.MirrorKey != "" {
			mv, err := fnote.NewVerifierForCosignatureV1(p.MirrorKey)
			if err != nil {
				return fail(key("mirror_key"), "not a cosignature/v1 verifier key (the peer's mirror_verifier_key): %v", err)
			}
			if mv.Name() != p.Name+"-mirror" {
				return fail(key("mirror_key"), "the key is named %q: a region's mirror key is named %q", mv.Name(), p.Name+"-mirror")
			}
		}
		if len(p.LogKeys) == 0 {
			return fail(key("log_keys"), "needs the peer's checkpoint verifier key (its log_verifier_keys)")
		}
		for j, k := range p.LogKeys {
			v, err := fnote.NewVerifier(k)
			if err != nil || isCosignatureKey(k) {
				return fail(key("log_keys["+strconv.Itoa(j)+"]"), "not a checkpoint verifier key (a witness key belongs in witness_key): %v", err)
			}
			if origin := logOrigins[p.Name]; origin != "" && origin != v.Name() {
				return fail(key("log_keys["+strconv.Itoa(j)+"]"), "names origin %q, but this peer's first key names %q: one peer has one log", v.Name(), origin)
			}
			if slices.Contains(p.LogKeys[:j], k) {
				return fail(key("log_keys["+strconv.Itoa(j)+"]"), "listed twice")
			}
			if owner, ok := originOwner[v.Name()]; ok && owner != p.Name {
				return fail(key("log_keys["+strconv.Itoa(j)+"]"), "origin %q is also %s's: each peer's log has its own origin", v.Name(), owner)
			}
			logOrigins[p.Name], originOwner[v.Name()] = v.Name(), p.Name
			if v.Name() == c.Receipts.Origin {
				return fail(key("log_keys["+strconv.Itoa(j)+"]"), "names origin %q, this region's own receipts.origin: give each region's log its own origin (e.g. knhk/%s)", v.Name(), r.Name)
			}
		}
	}
	return nil
}

// validateWitnessKMS checks region.witness_kms. The endpoint follows
// receipts.kms' Vault rule (required, any address): Vault is reached
// over its own TLS and token, not the SPIFFE mTLS.
func (c *Config) validateWitnessKMS(fail failFunc) error {
	k := &c.Region.WitnessKMS
	switch k.Provider {
	case "":
		if *k != (WitnessKMS{}) {
			return fail("region.witness_kms.provider", "region.witness_kms is set without a provider: set provider: vault, or remove it to use the key file")
		}
		return nil
	case "vault":
	default:
		return fail("region.witness_kms.provider", "%q: want vault (a Transit ed25519 key), or no region.witness_kms for the key file", k.Provider)
	}
	if c.Region.WitnessKey != "" {
		return fail("region.witness_kms", "set region.witness_key (a key file) or region.witness_kms (a Vault key), not both")
	}
	if k.Endpoint == "" {
		return fail("region.witness_kms.endpoint", "the Vault server address is required for the vault provider")
	}
	if k.KeyID == "" {
		return fail("region.witness_kms.key_id", "the Transit key's name is required for the vault provider")
	}
	if !transitKeyName.MatchString(k.KeyID) {
		return fail("region.witness_kms.key_id", "%q: a Transit key name (letters, digits, '_', '-' and '.')", k.KeyID)
	}
	rk := &c.Receipts.KMS
	if rk.Provider == "vault" && rk.KeyID == k.KeyID && strings.TrimRight(rk.Endpoint, "/") == strings.TrimRight(k.Endpoint, "/") &&
		transitMount(rk.Mount) == transitMount(k.Mount) {
		return fail("region.witness_kms.key_id", "%q is also receipts.kms.key_id: the witness key and the log's checkpoint key must be two keys", k.KeyID)
	}
	return nil
}

// transitKeyName is Vault's pattern for a key name in a Transit path.
var transitKeyName = regexp.MustCompile(`^\w([\w.-]*\w)?$`)

func transitMount(m string) string {
	if m = strings.Trim(m, "/"); m == "" {
		return "transit"
	}
	return m
}

// RegionQuorum is region.quorum, or a majority of the regions when unset.
func (c *Config) RegionQuorum() int {
	if c.Region.Quorum > 0 {
		return c.Region.Quorum
	}
	return (1+len(c.Region.Peers))/2 + 1
}

// isCosignatureKey: a vkey whose algorithm is a witness cosignature
// (0x04 Ed25519, 0x06 ML-DSA), which formats' verifier also accepts.
func isCosignatureKey(vkey string) bool {
	parts := strings.SplitN(vkey, "+", 3)
	if len(parts) != 3 {
		return false
	}
	raw, err := base64.StdEncoding.DecodeString(parts[2])
	return err == nil && len(raw) > 0 && (raw[0] == 0x04 || raw[0] == 0x06)
}

func validKeyName(s string) bool {
	return s != "" && !strings.ContainsAny(s, "+# \t\n")
}

// policyWords are the Sigsum policy keywords and the group name knhk's
// policy uses: a peer named so would break the policy tessera reads.
var policyWords = map[string]bool{"log": true, "witness": true, "group": true, "quorum": true, "any": true, "all": true, "none": true, "peers": true}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
