package config

import (
	"strings"
	"time"

	"github.com/knhk/knhk/pkg/receipt"
)

// Receipts configures signed request receipts.
type Receipts struct {
	Enabled bool `yaml:"enabled"`
	// Required: a request that cannot get a receipt is answered 503 with
	// x-knhk-shed: receipt instead of going out unreceipted.
	Required           bool      `yaml:"required"`
	KMS                KMSConfig `yaml:"kms"`
	Origin             string    `yaml:"origin"` // the log's name in checkpoints
	Region             string    `yaml:"region"`
	Instance           string    `yaml:"instance"`
	CheckpointInterval Duration  `yaml:"checkpoint_interval"`
	Delegation         Duration  `yaml:"delegation"`
	// BatchMaxAge: the most a receipt, once journaled (its token already
	// sent), waits for its Merkle-log batch.
	BatchMaxAge Duration `yaml:"batch_max_age"`
	// CommitWait: the most a receipt waits for others to share its journal
	// sync and its batch signature, the two costs that are per group, not
	// per receipt. 0: none (each sync takes what has queued meanwhile).
	CommitWait Duration `yaml:"commit_wait"`
	// Retention deletes old receipt bodies (legal holds excepted).
	Retention Retention `yaml:"retention"`
}

// Retention is receipts.retention.
type Retention struct {
	// KeepBodiesFor: receipt bodies (path, caller and every other field)
	// older than this are replaced by tombstones, unless a legal hold
	// keeps them; leaf hashes stay, so proofs keep verifying. 0 (the
	// default) keeps them for ever.
	KeepBodiesFor Duration `yaml:"keep_bodies_for"`
}

// minKeepBodiesFor is the shortest retention: a receipt must outlive the
// journal, the log's batching and a client's verify by far, and an hour
// leaves an operator time to place a hold.
const minKeepBodiesFor = time.Hour

// KMSConfig selects the key that signs checkpoints and certifies the
// delegated receipt keys.
type KMSConfig struct {
	Provider string `yaml:"provider"` // local (default) | aws | azure | vault
	KeyID    string `yaml:"key_id"`   // aws: id/ARN/alias; azure: key name; vault: transit key name
	Region   string `yaml:"region"`   // aws
	Endpoint string `yaml:"endpoint"` // aws: KMS-compatible endpoint; azure: vault URL; vault: server address
	Mount    string `yaml:"mount"`    // vault: transit mount (default transit); the token comes from VAULT_TOKEN
	// RefreshInterval: how often the key's latest version is looked up, so
	// a rotation in the KMS is picked up while running.
	RefreshInterval Duration `yaml:"refresh_interval"`
}

func defaultReceipts() Receipts {
	return Receipts{Enabled: true, KMS: KMSConfig{Provider: "local", RefreshInterval: Duration(time.Minute)}, Origin: "knhk.local/receipts", Region: "local",
		CheckpointInterval: Duration(5 * time.Second), Delegation: Duration(24 * time.Hour), BatchMaxAge: Duration(250 * time.Millisecond),
		CommitWait: Duration(defaultCommitWait)}
}

// defaultCommitWait is 0: through Envoy at 1,500 req/s on two cores, 2 ms
// halved the CPU receipts add (147 → 72 µs a request) but took knhk's p99
// from 22 ms to 80–169 ms (docs/BENCHMARKS.md). It is for those who would
// rather spend latency than CPU.
const defaultCommitWait = 0

func (r *Receipts) validate(fail failFunc) error {
	switch r.KMS.Provider {
	case "local":
	case "aws", "azure", "vault":
		if r.KMS.KeyID == "" {
			return fail("receipts.kms.key_id", "required for the %s provider", r.KMS.Provider)
		}
		if r.KMS.Provider == "vault" && r.KMS.Endpoint == "" {
			return fail("receipts.kms.endpoint", "the Vault server address is required for the vault provider")
		}
		if r.KMS.Provider == "azure" && !strings.HasPrefix(r.KMS.Endpoint, "https://") {
			return fail("receipts.kms.endpoint", "%q: the azure provider needs the vault URL (https://<vault>.vault.azure.net/)", r.KMS.Endpoint)
		}
	default:
		return fail("receipts.kms.provider", "%q: want local, aws, azure or vault", r.KMS.Provider)
	}
	if d := r.KMS.RefreshInterval.D(); d != 0 && d < time.Second { // 0: the default
		return fail("receipts.kms.refresh_interval", "%s: at least 1s (each refresh is a KMS call)", r.KMS.RefreshInterval.D())
	}
	if r.Origin == "" {
		return fail("receipts.origin", "must not be empty")
	}
	if r.CheckpointInterval.D() < 100*time.Millisecond {
		return fail("receipts.checkpoint_interval", "%s: at least 100ms", r.CheckpointInterval.D())
	}
	if d := r.Delegation.D(); d <= 0 || d > receipt.MaxDelegation {
		return fail("receipts.delegation", "%s: above 0 and at most %s", d, receipt.MaxDelegation)
	}
	if d := r.BatchMaxAge.D(); d <= 0 || d > time.Second {
		return fail("receipts.batch_max_age", "%s: above 0 and at most 1s (receipts wait this long to enter the log)", d)
	}
	if d := r.CommitWait.D(); d < 0 || d > 20*time.Millisecond {
		return fail("receipts.commit_wait", "%s: from 0 to 20ms (every response may wait this long for its receipt)", d)
	}
	if d := r.Retention.KeepBodiesFor.D(); d != 0 && d < minKeepBodiesFor {
		return fail("receipts.retention.keep_bodies_for", "%s: 0 (keep for ever) or at least %s", d, minKeepBodiesFor)
	}
	return nil
}

// ServiceConfig converts for pkg/receipt.
func (r *Receipts) ServiceConfig(instance string) receipt.ServiceConfig {
	if r.Instance != "" {
		instance = r.Instance
	}
	return receipt.ServiceConfig{Origin: r.Origin, Region: r.Region, Instance: instance, Delegation: r.Delegation.D(),
		CheckpointInterval: r.CheckpointInterval.D(), BatchMaxAge: r.BatchMaxAge.D(), CommitWait: r.CommitWait.D(), KMSRefresh: r.KMS.RefreshInterval.D(),
		KeepBodiesFor: r.Retention.KeepBodiesFor.D()}
}
