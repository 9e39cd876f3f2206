package receipt

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"sync"
	"time"

	"k8s.io/klog/v2"

	"github.com/knhk/knhk/pkg/kms"
)

// ServiceConfig configures receipts.
type ServiceConfig struct {
	Origin             string // the log's name in checkpoints
	Region, Instance   string
	Delegation         time.Duration // lifetime of a delegated key (≤ 24 h)
	CheckpointInterval time.Duration
	BatchMaxAge        time.Duration
}

// Service issues receipts: it owns the delegated keys, the log and the
// receipt-id index.
type Service struct {
	cfg    ServiceConfig
	signer kms.Signer
	vkey   string
	keys   *Keys
	log    *Log

	mu   sync.RWMutex
	byID map[[16]byte]entry
}

// entry locates a receipt; token is kept for receipts issued by this
// process (the inline signature exists only in the client's copy and here).
type entry struct {
	index uint64
	token string
}

// ErrNotFound and ErrNotIntegrated are the two reasons a bundle is missing.
var (
	ErrNotFound      = errors.New("no such receipt")
	ErrNotIntegrated = errors.New("receipt not yet in a signed checkpoint")
)

// OpenService opens keys and log under dir and rebuilds the id index.
func OpenService(ctx context.Context, dir string, cfg ServiceConfig, signer kms.Signer, logger *slog.Logger) (*Service, error) {
	// Tessera logs through klog; send it to our structured log.
	klog.SetSlogLogger(logger.With("component", "tessera"))
	ns, vkey, err := NewNoteSigner(cfg.Origin, signer)
	if err != nil {
		return nil, err
	}
	keys, err := OpenKeys(ctx, filepath.Join(dir, "delegations"), signer, cfg.Delegation, cfg.Region, cfg.Instance, logger)
	if err != nil {
		return nil, err
	}
	l, err := OpenLog(ctx, filepath.Join(dir, "log"), ns, vkey, LogOptions{CheckpointInterval: cfg.CheckpointInterval, BatchMaxAge: cfg.BatchMaxAge})
	if err != nil {
		return nil, err
	}
	s := &Service{cfg: cfg, signer: signer, vkey: vkey, keys: keys, log: l, byID: map[[16]byte]entry{}}
	size, err := l.IntegratedSize(ctx)
	if err != nil {
		return nil, err
	}
	err = l.Scan(ctx, size, func(i uint64, data []byte) error {
		r, err := Decode(data)
		if err != nil {
			return fmt.Errorf("receipt log entry %d: %w", i, err)
		}
		s.byID[r.ID] = entry{index: i}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return s, nil
}

// Issue assigns an id, appends the receipt durably and returns its token.
func (s *Service) Issue(ctx context.Context, r *Receipt) (string, error) {
	if _, err := rand.Read(r.ID[:]); err != nil {
		return "", err
	}
	if r.Region == "" {
		r.Region = s.cfg.Region
	}
	enc, err := r.Encode()
	if err != nil {
		return "", err
	}
	idx, err := s.log.Append(ctx, enc)
	if err != nil {
		return "", err
	}
	d := s.keys.Current()
	tok := Sign(r.ID, LeafHash(enc), d.KeyID, d.Key).String()
	s.mu.Lock()
	s.byID[r.ID] = entry{index: idx, token: tok}
	s.mu.Unlock()
	return tok, nil
}

// Bundle returns a receipt with its proof and the checkpoint it is in.
func (s *Service) Bundle(ctx context.Context, id [16]byte) (Bundle, error) {
	s.mu.RLock()
	e, ok := s.byID[id]
	s.mu.RUnlock()
	idx := e.index
	if !ok {
		return Bundle{}, ErrNotFound
	}
	cp, raw, err := s.log.Checkpoint(ctx)
	if err != nil || cp.Size <= idx {
		return Bundle{}, ErrNotIntegrated
	}
	data, err := s.log.Entry(ctx, idx, cp.Size)
	if err != nil {
		return Bundle{}, fmt.Errorf("reading receipt %d: %w", idx, err)
	}
	p, err := s.log.InclusionProof(ctx, idx, cp.Size)
	if err != nil {
		return Bundle{}, err
	}
	// Token is empty for receipts issued before a restart: verify them
	// with the token the client received.
	return Bundle{Token: e.token, Receipt: data, Index: idx, Proof: p, Checkpoint: string(raw)}, nil
}

// Checkpoint is the latest signed checkpoint note.
func (s *Service) Checkpoint(ctx context.Context) ([]byte, error) {
	_, raw, err := s.log.Checkpoint(ctx)
	return raw, err
}

// Consistency proves the tree of size from is a prefix of the tree of size
// to; to must not exceed the latest checkpoint.
func (s *Service) Consistency(ctx context.Context, from, to uint64) ([][]byte, error) {
	cp, _, err := s.log.Checkpoint(ctx)
	if err != nil {
		return nil, err
	}
	if to > cp.Size || from > to {
		return nil, fmt.Errorf("want from ≤ to ≤ %d (the latest checkpoint), got %d and %d", cp.Size, from, to)
	}
	return s.log.ConsistencyProof(ctx, from, to)
}

// Published is GET /v1/keys.
func (s *Service) Published() (PublishedKeys, error) {
	der, err := x509.MarshalPKIXPublicKey(s.signer.Public())
	if err != nil {
		return PublishedKeys{}, err
	}
	return PublishedKeys{LogVerifierKey: s.vkey, KMS: map[string][]byte{s.signer.KeyID(): der}, Certificates: s.keys.Published()}, nil
}

// Run rotates delegated keys until ctx ends.
func (s *Service) Run(ctx context.Context) { s.keys.Run(ctx) }

// Close flushes the log.
func (s *Service) Close(ctx context.Context) error { return s.log.Close(ctx) }
