package receipt

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/transparency-dev/formats/log"
	"k8s.io/klog/v2"

	"github.com/knhk/knhk/internal/fsutil"
	"github.com/knhk/knhk/pkg/kms"
)

// ServiceConfig configures receipts.
type ServiceConfig struct {
	Origin             string // the log's name in checkpoints
	Region, Instance   string
	Delegation         time.Duration // lifetime of a delegated key (≤ 24 h)
	CheckpointInterval time.Duration
	BatchMaxAge        time.Duration
	// CommitWait is the most a receipt waits for others to share its
	// journal sync and batch signature (0: none).
	CommitWait time.Duration
	// KMSRefresh is how often a rotatable KMS key (kms.Versioned) is asked
	// for its latest version (default 1 min; 0 uses the default).
	KMSRefresh time.Duration
	// Witnessing: peer regions that cosign each checkpoint.
	Witnessing Witnessing
	// KeepBodiesFor is receipts.retention.keep_bodies_for: Run prunes the
	// bodies of receipts older than this that no hold keeps (retention.go).
	// 0 keeps them for ever.
	KeepBodiesFor time.Duration
}

// Service issues receipts: it owns the delegated keys, the log, the KMS
// keys it has used and the receipt-id index.
type Service struct {
	cfg   ServiceConfig
	log   *slog.Logger
	keys  *Keys
	rlog  *Log
	notes *NoteSigner
	index *index
	wal   *wal

	// Journaled receipts on their way into the log: bounded, so a stalled
	// log pushes back on requests instead of growing memory.
	inflight chan struct{}
	pmuIn    sync.Mutex
	pending  map[[16]byte]struct{}
	bg       context.Context
	stopBG   context.CancelFunc
	sequence sync.WaitGroup
	closeMu  sync.Mutex // guards closing; taken around sequence.Add only
	closing  bool
	seqq     chan sequencedItem // journaled receipts waiting for the log, in order

	rotate  sync.Mutex // one KMS key change at a time
	signer  atomic.Pointer[signerBox]
	kmsPath string

	pmu       sync.RWMutex
	published []PublishedKMSKey // every KMS key ever used, oldest first

	lastIntegrated atomic.Int64 // Unix ns when a receipt last entered the log, for Retry-After

	ret        retention                     // pruning bodies under receipts.retention, and the holds that stop it
	pruneBound atomic.Pointer[func() uint64] // nil: no bound (SetPruneBound)
}

type signerBox struct{ kms.Signer }

// PublishedKMSKey is a KMS key (version) that has signed for this log,
// kept in data_dir/receipts/kms-keys.jsonl before its first use.
type PublishedKMSKey struct {
	KeyID          string `json:"key_id"`
	Algorithm      string `json:"algorithm"`
	PublicKey      []byte `json:"public_key"` // PKIX DER
	LogVerifierKey string `json:"log_verifier_key"`
}

// ErrNotFound and ErrNotIntegrated are the two reasons a bundle is
// missing; ErrNotCovered, that BundleAt's checkpoint predates the receipt.
var (
	ErrNotFound      = errors.New("no such receipt")
	ErrNotIntegrated = errors.New("receipt not yet in a signed checkpoint")
	ErrNotCovered    = errors.New("receipt not in the given checkpoint")
)

// NotIntegratedError is ErrNotIntegrated with when to ask again.
type NotIntegratedError struct {
	// RetryAfter is how long until a checkpoint should cover the receipt.
	RetryAfter time.Duration
	// CheckpointInterval is receipts.checkpoint_interval: a client that
	// just got its token waits about this long.
	CheckpointInterval time.Duration
}

func (e *NotIntegratedError) Error() string { return ErrNotIntegrated.Error() }
func (e *NotIntegratedError) Unwrap() error { return ErrNotIntegrated }

// OpenService opens keys, log and index under dir.
func OpenService(ctx context.Context, dir string, cfg ServiceConfig, signer kms.Signer, logger *slog.Logger) (_ *Service, err error) {
	if cfg.KMSRefresh <= 0 {
		cfg.KMSRefresh = time.Minute
	}
	if cfg.CheckpointInterval <= 0 {
		cfg.CheckpointInterval = defaultCheckpointInterval
	}
	if cfg.BatchMaxAge <= 0 {
		cfg.BatchMaxAge = defaultBatchMaxAge
	}
	routeKlog(logger)
	if err := fsutil.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	s := &Service{cfg: cfg, log: logger, kmsPath: filepath.Join(dir, "kms-keys.jsonl")}
	if s.published, err = readJSONLines[PublishedKMSKey](s.kmsPath, logger); err != nil {
		return nil, err
	}
	if err := s.publishKMS(signer); err != nil {
		return nil, err
	}
	s.signer.Store(&signerBox{signer})
	s.notes, _, err = NewNoteSigner(cfg.Origin, signer)
	if err != nil {
		return nil, err
	}
	if s.keys, err = OpenKeys(ctx, filepath.Join(dir, "delegations"), signer, cfg.Delegation, cfg.Region, cfg.Instance, logger); err != nil {
		return nil, err
	}
	s.rlog, err = OpenLog(ctx, filepath.Join(dir, "log"), s.notes, s.verifierKeys(),
		LogOptions{CheckpointInterval: cfg.CheckpointInterval, BatchMaxAge: cfg.BatchMaxAge, Witnessing: cfg.Witnessing})
	if err != nil {
		return nil, err
	}
	if s.index, err = openIndex(filepath.Join(dir, "index.db"), logger); err != nil {
		_ = s.rlog.Close(ctx)
		return nil, err
	}
	s.bg, s.stopBG = context.WithCancel(context.WithoutCancel(ctx))
	s.inflight = make(chan struct{}, maxInflight)
	s.pending = map[[16]byte]struct{}{}
	// Never full: at most maxInflight receipts are between Issue and here.
	s.seqq = make(chan sequencedItem, maxInflight)
	go s.sequencer()
	if err := s.reindex(ctx); err != nil {
		_ = s.Close(ctx)
		return nil, err
	}
	if err := s.recoverJournal(ctx, filepath.Join(dir, "journal")); err != nil {
		_ = s.Close(ctx)
		return nil, err
	}
	return s, nil
}

var klogOnce sync.Once

// routeKlog sends tessera's klog output to logger. klog is process-wide
// and must not change while tessera goroutines log through it (a data
// race), so the first service's logger keeps it.
func routeKlog(logger *slog.Logger) {
	klogOnce.Do(func() { klog.SetSlogLogger(logger.With("component", "tessera")) })
}

// maxInflight bounds receipts journaled but not yet in the log.
const maxInflight = 1 << 15

// recoverJournal appends what a crash left in the journal and the log
// lacks, then starts the journal for new receipts.
func (s *Service) recoverJournal(ctx context.Context, dir string) error {
	w, recs, err := openWAL(dir)
	if err != nil {
		return err
	}
	n, appended := 0, 0
	type pendingAppend struct {
		id   [16]byte
		rec  indexRecord
		wait func() (uint64, error)
	}
	var waits []pendingAppend
	restore := func(enc []byte, rec indexRecord) error {
		n++
		r, err := Decode(enc)
		if err != nil {
			return err
		}
		if e, ok, err := s.index.get(r.ID); err != nil {
			return err
		} else if ok {
			rec.index = e.index
			s.index.put(r.ID, rec)
			return nil
		}
		// Queued now, awaited below: one Append at a time would wait a
		// whole log batch (batch_max_age) per receipt.
		waits = append(waits, pendingAppend{r.ID, rec, s.rlog.Enqueue(ctx, enc)})
		return nil
	}
	for i, p := range recs {
		if isBatchRecord(p) {
			sb, encs, err := parseBatchRecord(p)
			if err != nil {
				return fmt.Errorf("receipt journal record %d: %w", i, err)
			}
			s.index.putBatch(&sb)
			for j, enc := range encs {
				rec := indexRecord{keyID: sb.KeyID, signed: true, batched: true, batchID: sb.ID, leafIndex: j}
				if err := restore(enc, rec); err != nil {
					return fmt.Errorf("receipt journal record %d, receipt %d: %w", i, j, err)
				}
			}
			continue
		}
		keyID, sig, enc, err := splitKR1Record(p)
		if err == nil {
			err = restore(enc, indexRecord{keyID: keyID, signature: sig, signed: true})
		}
		if err != nil {
			return fmt.Errorf("receipt journal record %d: %w", i, err)
		}
	}
	for _, p := range waits {
		idx, err := p.wait()
		if err != nil {
			return err
		}
		p.rec.index = idx
		s.index.put(p.id, p.rec)
		appended++
	}
	if len(recs) > 0 {
		s.log.Info("receipt journal recovered", "records", n, "appended_to_log", appended)
		// The index holds the recovered tokens' signatures; on disk first,
		// since the journal that also holds them goes next.
		if err := s.index.flush(); err != nil {
			return fmt.Errorf("receipt index: %w", err)
		}
		if err := w.dropRecovered(); err != nil {
			return err
		}
	}
	// Only a started journal is the service's: Close waits for its
	// committer, which never runs if the first segment cannot be made.
	key := func() ([8]byte, ed25519.PrivateKey) {
		d := s.keys.Current()
		return d.KeyID, d.Key
	}
	if err := w.start(key, s.index.putBatch, s.cfg.CommitWait); err != nil {
		return err
	}
	s.wal = w
	return nil
}

// splitKR1Record reads a journal record left by a version before batches:
// key id ‖ kr1 signature ‖ encoded receipt.
func splitKR1Record(p []byte) (keyID [8]byte, sig [64]byte, enc []byte, err error) {
	if len(p) < 72 {
		return keyID, sig, nil, fmt.Errorf("%d bytes, shorter than its header", len(p))
	}
	copy(keyID[:], p)
	copy(sig[:], p[8:])
	return keyID, sig, p[72:], nil
}

// reindex indexes the log's tail that a crash may have left unindexed.
func (s *Service) reindex(ctx context.Context) error {
	size, err := s.rlog.IntegratedSize(ctx)
	if err != nil {
		return err
	}
	from := uint64(0)
	if top, ok, err := s.index.maxIndex(); err != nil {
		return err
	} else if ok && top >= reindexWindow {
		from = top - reindexWindow
	}
	return s.rlog.ScanFrom(ctx, from, size, func(i uint64, data []byte) error {
		id, err := entryID(data) // a receipt, or the tombstone of a pruned one
		if err != nil {
			return fmt.Errorf("receipt log entry %d: %w", i, err)
		}
		if _, ok, err := s.index.get(id); err != nil || ok {
			return err
		}
		s.index.put(id, indexRecord{index: i})
		return nil
	})
}

// publishKMS records signer's key (if new) durably, before it signs.
func (s *Service) publishKMS(signer kms.Signer) error {
	s.pmu.RLock()
	for _, k := range s.published {
		if k.KeyID == signer.KeyID() {
			s.pmu.RUnlock()
			return nil
		}
	}
	s.pmu.RUnlock()
	der, err := x509.MarshalPKIXPublicKey(signer.Public())
	if err != nil {
		return fmt.Errorf("KMS key %s: %w", signer.KeyID(), err)
	}
	vkey, err := VerifierKey(s.cfg.Origin, signer)
	if err != nil {
		return err
	}
	k := PublishedKMSKey{KeyID: signer.KeyID(), Algorithm: string(signer.Algorithm()), PublicKey: der, LogVerifierKey: vkey}
	if err := appendJSONLine(s.kmsPath, k); err != nil {
		return err
	}
	s.pmu.Lock()
	s.published = append(s.published, k)
	s.pmu.Unlock()
	return nil
}

func (s *Service) verifierKeys() []string {
	s.pmu.RLock()
	defer s.pmu.RUnlock()
	out := make([]string, len(s.published))
	for i, k := range s.published {
		out[i] = k.LogVerifierKey
	}
	return out
}

// RefreshKMS asks a rotatable KMS key for its latest version. When it has
// changed, the new version is published (durably) first, then signs the
// next checkpoints and certifies a new delegated key; everything the old
// version signed keeps verifying. It reports whether the key changed.
func (s *Service) RefreshKMS(ctx context.Context) (bool, error) {
	s.rotate.Lock()
	defer s.rotate.Unlock()
	cur := s.signer.Load().Signer
	v, ok := cur.(kms.Versioned)
	if !ok {
		return false, nil
	}
	next, err := v.Latest(ctx)
	if err != nil {
		return false, fmt.Errorf("KMS key %s: latest version: %w", cur.KeyID(), err)
	}
	if next.KeyID() == cur.KeyID() {
		return false, nil
	}
	if err := s.publishKMS(next); err != nil {
		return false, err
	}
	vkey, err := VerifierKey(s.cfg.Origin, next)
	if err != nil {
		return false, err
	}
	if err := s.rlog.AddVerifier(vkey); err != nil {
		return false, err
	}
	if _, err := s.notes.Use(next); err != nil {
		return false, err
	}
	s.signer.Store(&signerBox{next})
	s.keys.SetSigner(next)
	s.log.Info("KMS key rotated: new checkpoints and delegations use the new version", "old", cur.KeyID(), "new", next.KeyID())
	if err := s.keys.Rotate(ctx); err != nil {
		// The current delegated key (certified by the old version) stays
		// valid; Run retries rotation.
		s.log.Warn("could not certify a delegated key with the new KMS key yet", "kms_key", next.KeyID(), "error", err.Error())
	}
	return true, nil
}

// Issue assigns an id, journals the signed receipt durably (group
// commit) and returns its token; the receipt goes into the Merkle log
// right after, off the request path.
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
	leaf := LeafHash(enc)
	select {
	case s.inflight <- struct{}{}:
	case <-ctx.Done():
		return "", fmt.Errorf("receipt log is behind (%d receipts waiting): %w", maxInflight, ctx.Err())
	}
	s.pmuIn.Lock()
	s.pending[r.ID] = struct{}{}
	s.pmuIn.Unlock()
	// Counted before anything can finish it; never once Close is waiting,
	// since a WaitGroup must not grow from zero while it is waited on.
	s.closeMu.Lock()
	if s.closing {
		s.closeMu.Unlock()
		s.done(r.ID)
		return "", errors.New("receipts are closing")
	}
	s.sequence.Add(1)
	s.closeMu.Unlock()
	ack, err := s.wal.submit(ctx, enc, leaf)
	if err != nil {
		s.sequence.Done()
		s.done(r.ID)
		return "", err
	}
	var tok Token
	finish := func(a walAck) error {
		if a.err != nil {
			s.sequence.Done()
			s.done(r.ID)
			return a.err
		}
		tok = batchToken(r.ID, leaf, a.seal, a.index, a.path)
		rec := indexRecord{keyID: a.seal.KeyID, signed: true, batched: true, batchID: a.seal.ID, leafIndex: a.index}
		s.seqq <- sequencedItem{r.ID, rec, a.seg, s.rlog.Enqueue(s.bg, enc)}
		return nil
	}
	var a walAck
	select {
	case a = <-ack:
	case <-s.wal.done:
		a = s.wal.await(ack)
	case <-ctx.Done():
		// No token is promised; the record, if it lands, is logged all the
		// same, so the journal's accounting stays whole.
		go func() { _ = finish(s.wal.await(ack)) }()
		return "", fmt.Errorf("receipt journal did not sync in time: %w", ctx.Err())
	}
	if err := finish(a); err != nil {
		return "", err
	}
	return tok.String(), nil
}

// sequencedItem is a journaled receipt and its future in the log.
type sequencedItem struct {
	id   [16]byte
	rec  indexRecord // without its log index yet
	seg  uint64
	wait func() (uint64, error)
}

// sequencer indexes journaled receipts once the log has them and lets
// their journal segments go. One goroutine for all, in order: the log
// integrates in order, so waiting on each future in turn costs nothing,
// where a goroutine per receipt cost a stack and a wake-up each. If the
// log fails, a record stays in the journal and is appended at the next
// start.
func (s *Service) sequencer() {
	for {
		select {
		case it := <-s.seqq:
			s.sequenced(it)
		case <-s.bg.Done():
			return
		}
	}
}

func (s *Service) sequenced(it sequencedItem) {
	defer s.sequence.Done()
	defer s.done(it.id)
	idx, err := it.wait()
	if err != nil {
		s.log.Error("receipt journaled but not yet in the log; it is appended at the next start", "receipt", fmt.Sprintf("%x", it.id), "error", err.Error())
		return
	}
	s.lastIntegrated.Store(time.Now().UnixNano())
	it.rec.index = idx
	s.index.put(it.id, it.rec)
	s.wal.release(it.seg)
}

func (s *Service) done(id [16]byte) {
	s.pmuIn.Lock()
	delete(s.pending, id)
	s.pmuIn.Unlock()
	<-s.inflight
}

// Bundle returns a receipt with its proof and the latest checkpoint.
func (s *Service) Bundle(ctx context.Context, id [16]byte) (Bundle, error) {
	return s.BundleAt(ctx, id, nil)
}

// BundleAt is Bundle proved against the signed checkpoint given (one of
// this log's, verified here) instead of the latest: regions prove a
// receipt against the newest checkpoint that met their quorum. A receipt
// that checkpoint does not cover is ErrNotCovered. A receipt whose body
// retention pruned comes marked Pruned, with its leaf hash (proved here
// against the checkpoint) and no body.
func (s *Service) BundleAt(ctx context.Context, id [16]byte, checkpoint []byte) (Bundle, error) {
	e, ok, err := s.index.get(id)
	if err != nil {
		return Bundle{}, err
	}
	if !ok {
		s.pmuIn.Lock()
		_, journaled := s.pending[id]
		s.pmuIn.Unlock()
		if journaled {
			return Bundle{}, s.notIntegrated(true)
		}
		return Bundle{}, ErrNotFound
	}
	var cp *log.Checkpoint
	raw := checkpoint
	if checkpoint != nil {
		if cp, err = s.rlog.Open(checkpoint); err != nil {
			return Bundle{}, err
		}
		if cp.Size <= e.index {
			return Bundle{}, ErrNotCovered
		}
	} else if cp, raw, err = s.rlog.Checkpoint(ctx); err != nil || cp.Size <= e.index {
		return Bundle{}, s.notIntegrated(false)
	}
	data, err := s.rlog.Entry(ctx, e.index, cp.Size)
	if err != nil {
		return Bundle{}, fmt.Errorf("reading receipt %d: %w", e.index, err)
	}
	p, err := s.rlog.InclusionProof(ctx, e.index, cp.Size)
	if err != nil {
		return Bundle{}, err
	}
	b := Bundle{Index: e.index, Proof: p, Checkpoint: string(raw)}
	var leaf [32]byte
	if tid, tleaf, ok := ParseTombstone(data); ok {
		// Pruned under retention: the leaf hash stands for the body, and
		// the client's token proves it is the receipt it was given.
		if tid != id {
			return Bundle{}, fmt.Errorf("receipt log entry %d is the tombstone of another receipt", e.index)
		}
		if err := VerifyInclusion(tleaf, e.index, cp.Size, p, cp.Hash); err != nil {
			return Bundle{}, fmt.Errorf("receipt log entry %d: its tombstone's leaf hash is not in the tree: %w", e.index, err)
		}
		leaf = tleaf
		b.Pruned, b.LeafHash = true, leaf[:]
	} else {
		r, err := Decode(data)
		if err != nil {
			return Bundle{}, fmt.Errorf("receipt log entry %d: %w", e.index, err)
		}
		view, err := json.Marshal(r.View())
		if err != nil {
			return Bundle{}, err
		}
		leaf = LeafHash(data)
		b.Receipt, b.Decoded = data, view
	}
	// A receipt indexed by a rescan after a crash has no stored signature:
	// verify it with the token the client received.
	switch {
	case e.batched:
		sb, ok, err := s.index.getBatch(e.batchID)
		if err != nil {
			return Bundle{}, err
		}
		switch {
		case ok && e.leafIndex < len(sb.Leaves) && sb.Leaves[e.leafIndex] == leaf:
			b.Token = batchToken(id, leaf, sb, e.leafIndex, sb.paths()[e.leafIndex]).String()
		default:
			// Verify it with the token the client holds, as after a rescan.
			s.log.Error("receipt index: the batch record does not hold this receipt; bundle served without a token",
				"receipt", fmt.Sprintf("%x", id), "batch", e.batchID, "leaf", e.leafIndex, "found", ok)
		}
	case e.signed:
		b.Token = Token{ID: id, LeafHash: leaf, KeyID: e.keyID, Signature: e.signature}.String()
	}
	return b, nil
}

// notIntegrated says when a checkpoint should cover a receipt. Tessera
// publishes once the last checkpoint is an interval old, at the first
// integration after that or an interval after the last one, so a receipt
// already in the log is covered at the latest an interval after the most
// recent integration; one still journaled enters the log within a batch.
func (s *Service) notIntegrated(journaled bool) error {
	interval := s.cfg.CheckpointInterval
	wait := interval
	if journaled {
		wait += s.cfg.BatchMaxAge
	} else if last := s.lastIntegrated.Load(); last != 0 {
		wait = time.Until(time.Unix(0, last).Add(interval))
		if wait <= 0 {
			// Overdue (a slow KMS or disk): ask again soon.
			wait = time.Second
		}
	}
	return &NotIntegratedError{RetryAfter: wait, CheckpointInterval: interval}
}

// Checkpoint is the latest signed checkpoint note.
func (s *Service) Checkpoint(ctx context.Context) ([]byte, error) {
	_, raw, err := s.rlog.Checkpoint(ctx)
	return raw, err
}

// Consistency proves the tree of size from is a prefix of the tree of size
// to, for any sizes with from ≤ to ≤ the latest checkpoint's (else
// ErrBadRange). ErrNoCheckpoint: none is signed yet.
func (s *Service) Consistency(ctx context.Context, from, to uint64) ([][]byte, error) {
	cp, _, err := s.rlog.Checkpoint(ctx)
	if err != nil {
		return nil, err
	}
	return s.rlog.ConsistencyProof(ctx, from, to, cp.Size)
}

// IndexFlushErrors counts failed writes of the receipt-id index (each
// retry counts).
func (s *Service) IndexFlushErrors() uint64 { return s.index.flushErrors.Load() }

// Degraded says why receipts are not healthy, nil when they are: the
// index cannot be written (bundles still served from memory), or the
// journal has failed (no receipt can be issued).
func (s *Service) Degraded() error {
	return errors.Join(s.Failed(), s.index.degraded())
}

// Failed is nil unless no receipt can be logged (the journal failed);
// unlike an index that is behind, that stops receipts altogether.
func (s *Service) Failed() error { return s.wal.failed() }

// Published is GET /v1/keys.
func (s *Service) Published() (PublishedKeys, error) {
	cur := s.signer.Load().Signer
	s.pmu.RLock()
	defer s.pmu.RUnlock()
	out := PublishedKeys{KMS: map[string][]byte{}, Certificates: s.keys.Published()}
	for _, k := range s.published {
		out.KMS[k.KeyID] = k.PublicKey
		out.LogVerifierKeys = append(out.LogVerifierKeys, k.LogVerifierKey)
		if k.KeyID == cur.KeyID() {
			out.LogVerifierKey = k.LogVerifierKey
		}
	}
	return out, nil
}

// Run rotates delegated keys, follows KMS key rotation and, with
// KeepBodiesFor set, prunes old bodies (once SetHolds is called) until ctx
// ends.
func (s *Service) Run(ctx context.Context) {
	go s.keys.Run(ctx)
	if s.cfg.KeepBodiesFor > 0 {
		go s.runRetention(ctx)
	}
	t := time.NewTicker(s.cfg.KMSRefresh)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if _, err := s.RefreshKMS(ctx); err != nil {
			s.log.Warn("KMS key refresh failed; checkpoints keep the current version", "error", err.Error())
		}
	}
}

// Close stops taking receipts, lets journaled ones reach the log (bounded
// by ctx; the rest stay journaled for the next start), and flushes the log
// and the index.
func (s *Service) Close(ctx context.Context) error {
	s.closeMu.Lock()
	s.closing = true
	s.closeMu.Unlock()
	// No bundle is rewritten once the index and the log start closing.
	s.ret.mu.Lock()
	s.ret.closed = true
	s.ret.mu.Unlock()
	var werr error
	if s.wal != nil {
		werr = s.wal.close(ctx)
		done := make(chan struct{})
		go func() { s.sequence.Wait(); close(done) }()
		select {
		case <-done:
		case <-ctx.Done():
		}
	}
	if s.stopBG != nil {
		defer s.stopBG()
	}
	// The index first: its flush is quick and worth the time, while the
	// log's close waits for a checkpoint that the next start can publish.
	// It gets a moment of its own even when a stuck journal used up ctx.
	ictx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 500*time.Millisecond)
	defer cancel()
	if d, ok := ctx.Deadline(); ok && time.Until(d) > 500*time.Millisecond {
		ictx = ctx
	}
	ierr := s.index.close(ictx)
	return errors.Join(werr, ierr, s.rlog.Close(ctx))
}
