package config

import (
	"crypto/rand"
	"fmt"
	"testing"

	fnote "github.com/transparency-dev/formats/note"
	"golang.org/x/mod/sumdb/note"
)

func peerKeys(t *testing.T, name, origin string) (witness, log string) {
	t.Helper()
	_, wv, err := note.GenerateKey(rand.Reader, name)
	if err != nil {
		t.Fatal(err)
	}
	if witness, err = fnote.VKeyToCosignatureV1(wv); err != nil {
		t.Fatal(err)
	}
	_, log, err = note.GenerateKey(rand.Reader, origin)
	if err != nil {
		t.Fatal(err)
	}
	return witness, log
}

func TestRegionConfig(t *testing.T) {
	w, l := peerKeys(t, "eu-west", "knhk/eu-west")
	w2, l2 := peerKeys(t, "ap-south", "knhk/ap-south")
	ok := fmt.Sprintf("listen:\n  region: 127.0.0.1:9443\nregion:\n  name: us-east\n  peers:\n    - {name: eu-west, url: \"http://127.0.0.2:9443\", witness_key: %q, log_keys: [%q]}\n", w, l)
	if _, err := Parse("r.yaml", []byte(fmt.Sprintf("identity:\n  trust_domain: example.org\n  allowed: {extproc: [\"spiffe://example.org/envoy\"], xds: [\"spiffe://example.org/envoy\"], admin: [\"spiffe://example.org/ops\"]}\nlisten:\n  region: 10.0.0.1:9443\nregion:\n  name: us-east\n  peers:\n    - {name: eu-west, url: \"https://10.0.0.2:9443\", spiffe_id: \"spiffe://example.org/eu\", witness_key: %q, log_keys: [%q]}\n", w, l))); err != nil {
		t.Fatalf("under identity, a non-loopback region: %v", err)
	}
	c, err := Parse("r.yaml", []byte(ok))
	if err != nil {
		t.Fatal(err)
	}
	if !c.RegionEnabled() || c.RegionQuorum() != 2 || c.Region.Peers[0].LogKeys[0] != l {
		t.Fatalf("%+v quorum %d", c.Region, c.RegionQuorum())
	}
	peer := func(s string) string {
		return "listen:\n  region: 127.0.0.1:9443\nregion:\n  name: us-east\n  peers:\n    - " + s + "\n"
	}
	good := fmt.Sprintf("witness_key: %q, log_keys: [%q]", w, l)
	mtls := func(s string) string {
		return "identity:\n  trust_domain: example.org\n  allowed: {extproc: [\"spiffe://example.org/envoy\"], xds: [\"spiffe://example.org/envoy\"], admin: [\"spiffe://example.org/ops\"]}\nlisten:\n  region: 10.0.0.1:9443\nregion:\n  name: us-east\n  peers:\n    - " + s + "\n"
	}
	expectErrors(t, "r.yaml", []errCase{
		{"region:\n  name: us-east\n", "listen.region: region.* is set but listen.region is empty"},
		{mtls("{name: eu-west, url: \"http://10.0.0.2:9443\", spiffe_id: \"spiffe://example.org/eu\", " + good + "}"), "region.peers[0].url: \"http://10.0.0.2:9443\": with identity.* on, peers are reached over mTLS: use https"},
		{mtls("{name: eu-west, url: \"https://10.0.0.2:9443\", " + good + "}"), "region.peers[0].spiffe_id: \"\""},
		{"listen:\n  region: 10.0.0.1:9443\nregion:\n  name: us-east\n", "listen.region: \"10.0.0.1:9443\" is not a loopback address: without identity.*"},
		{"listen:\n  region: 127.0.0.1:9443\nregion:\n  name: \"us east\"\n", "region.name: \"us east\""},
		{"listen:\n  region: 127.0.0.1:9443\nregion:\n  name: us-east\n  quorum: 2\n", "region.quorum: must be 0 (a majority) to 1"},
		{peer("{name: peers, url: \"http://127.0.0.2:9443\", " + good + "}"), "region.peers[0].name: \"peers\" is a word of the witness policy grammar"},
		{peer(fmt.Sprintf("{name: eu-west, url: \"http://127.0.0.2:9443\", witness_key: %q, log_keys: [%q, %q]}", w, l, l)), "region.peers[0].log_keys[1]: listed twice"},
		{peer("{name: us-east, url: \"http://127.0.0.2:9443\", " + good + "}"), "region.peers[0].name: \"us-east\" is used twice"},
		{peer("{name: eu-west, url: \"http://127.0.0.2:9443\", mirror_key: nope, " + good + "}"), "region.peers[0].mirror_key: not a cosignature/v1 verifier key"},
		{peer(fmt.Sprintf("{name: eu-west, url: \"http://127.0.0.2:9443\", mirror_key: %q, %s}", w, good)), "region.peers[0].mirror_key: the key is named \"eu-west\": a region's mirror key is named \"eu-west-mirror\""},
		{peer("{name: eu-mirror, url: \"http://127.0.0.2:9443\", " + good + "}"), "region.peers[0].name: \"eu-mirror\": a name may not end in -mirror"},
		{"listen:\n  region: 127.0.0.1:9443\nregion:\n  name: us-mirror\n", "region.name: \"us-mirror\": a name may not end in -mirror"},
		{peer("{name: eu-west, url: \"ftp://127.0.0.2\", " + good + "}"), "region.peers[0].url: \"ftp://127.0.0.2\""},
		{peer("{name: eu-west, url: \"http://192.0.2.1:9443\", " + good + "}"), "region.peers[0].url: \"http://192.0.2.1:9443\" is not a loopback address"},
		{peer(fmt.Sprintf("{name: eu-west, url: \"http://127.0.0.2:9443\", witness_key: \"nope\", log_keys: [%q]}", l)), "region.peers[0].witness_key: not a cosignature/v1 verifier key"},
		{peer(fmt.Sprintf("{name: eu-west, url: \"http://127.0.0.2:9443\", witness_key: %q, log_keys: [%q]}", l, l)), "region.peers[0].witness_key: the key is named \"knhk/eu-west\""},
		{peer(fmt.Sprintf("{name: eu-west, url: \"http://127.0.0.2:9443\", witness_key: %q}", w)), "region.peers[0].log_keys: needs the peer's checkpoint verifier key"},
		{peer(fmt.Sprintf("{name: eu-west, url: \"http://127.0.0.2:9443\", witness_key: %q, log_keys: [\"nope\"]}", w)), "region.peers[0].log_keys[0]: not a checkpoint verifier key"},
		{peer(fmt.Sprintf("{name: eu-west, url: \"http://127.0.0.2:9443\", witness_key: %q, log_keys: [%q]}", w, w)), "region.peers[0].log_keys[0]: not a checkpoint verifier key (a witness key belongs in witness_key)"},
		{peer(fmt.Sprintf("{name: eu-west, url: \"http://127.0.0.2:9443\", witness_key: %q, log_keys: [%q, %q]}", w, l, l2)), "region.peers[0].log_keys[1]: names origin \"knhk/ap-south\", but this peer's first key names \"knhk/eu-west\""},
		{fmt.Sprintf("listen:\n  region: 127.0.0.1:9443\nregion:\n  name: us-east\n  peers:\n    - {name: eu-west, url: \"http://127.0.0.2:9443\", witness_key: %q, log_keys: [%q]}\n    - {name: ap-south, url: \"http://127.0.0.3:9443\", witness_key: %q, log_keys: [%q]}\n", w, l, w2, l), "region.peers[1].log_keys[0]: origin \"knhk/eu-west\" is also eu-west's"},
		{fmt.Sprintf("listen:\n  region: 127.0.0.1:9443\nregion:\n  name: us-east\n  peers:\n    - {name: eu-west, url: \"http://127.0.0.2:9443\", witness_key: %q, log_keys: [%q]}\n    - {name: ap-south, url: \"http://127.0.0.2:9443\", witness_key: %q, log_keys: [%q]}\n", w, l, w2, l2), "region.peers[1].url: \"http://127.0.0.2:9443\" is also eu-west's URL"},
		{"listen:\n  region: 127.0.0.1:9443\nreceipts:\n  origin: knhk/eu-west\nregion:\n  name: us-east\n  peers:\n    - " + fmt.Sprintf("{name: eu-west, url: \"http://127.0.0.2:9443\", %s}", good) + "\n", "region.peers[0].log_keys[0]: names origin \"knhk/eu-west\", this region's own receipts.origin"},
	})
}

func TestRegionWitnessKMS(t *testing.T) {
	region := func(s string) string {
		return "listen:\n  region: 127.0.0.1:9443\nregion:\n  name: us-east\n" + s
	}
	c, err := Parse("r.yaml", []byte(region("  witness_kms: {provider: vault, endpoint: \"https://vault.example:8200\", key_id: knhk-us-east, mount: kms/transit}\n")))
	if err != nil {
		t.Fatal(err)
	}
	if k := c.Region.WitnessKMS; k.Provider != "vault" || k.Endpoint != "https://vault.example:8200" || k.KeyID != "knhk-us-east" || k.Mount != "kms/transit" {
		t.Fatalf("%+v", k)
	}
	// Without identity, any endpoint receipts.kms' Vault provider takes:
	// Vault has its own TLS and token.
	if _, err := Parse("r.yaml", []byte(region("  witness_kms: {provider: vault, endpoint: \"http://10.0.0.9:8200\", key_id: w}\n"))); err != nil {
		t.Fatalf("a non-loopback Vault without identity: %v", err)
	}
	// The same key name in another mount, or on another Vault, is another key.
	if _, err := Parse("r.yaml", []byte("receipts:\n  kms: {provider: vault, endpoint: \"http://127.0.0.1:8200\", key_id: k}\n"+
		region("  witness_kms: {provider: vault, endpoint: \"http://127.0.0.1:8200\", key_id: k, mount: witness}\n"))); err != nil {
		t.Fatalf("the same name under another mount: %v", err)
	}
	expectErrors(t, "r.yaml", []errCase{
		{"region:\n  witness_kms: {provider: vault, endpoint: \"http://127.0.0.1:8200\", key_id: w}\n", "listen.region: region.* is set but listen.region is empty"},
		{region("  witness_kms: {provider: aws, endpoint: \"http://127.0.0.1:8200\", key_id: w}\n"), "region.witness_kms.provider: \"aws\": want vault"},
		{region("  witness_kms: {endpoint: \"http://127.0.0.1:8200\", key_id: w}\n"), "region.witness_kms.provider: region.witness_kms is set without a provider"},
		{region("  witness_kms: {provider: vault, key_id: w}\n"), "region.witness_kms.endpoint: the Vault server address is required"},
		{region("  witness_kms: {provider: vault, endpoint: \"http://127.0.0.1:8200\"}\n"), "region.witness_kms.key_id: the Transit key's name is required"},
		{region("  witness_kms: {provider: vault, endpoint: \"http://127.0.0.1:8200\", key_id: \"../sys/x\"}\n"), "region.witness_kms.key_id: \"../sys/x\": a Transit key name"},
		{region("  witness_key: /etc/knhk/witness.key\n  witness_kms: {provider: vault, endpoint: \"http://127.0.0.1:8200\", key_id: w}\n"), "region.witness_kms: set region.witness_key (a key file) or region.witness_kms (a Vault key), not both"},
		{"receipts:\n  kms: {provider: vault, endpoint: \"http://127.0.0.1:8200/\", key_id: k}\n" + region("  witness_kms: {provider: vault, endpoint: \"http://127.0.0.1:8200\", key_id: k, mount: /transit/}\n"),
			"region.witness_kms.key_id: \"k\" is also receipts.kms.key_id"},
	})
}
