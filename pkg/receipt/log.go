package receipt

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sync/atomic"
	"time"

	"github.com/transparency-dev/formats/log"
	fnote "github.com/transparency-dev/formats/note"
	"github.com/transparency-dev/merkle/proof"
	"github.com/transparency-dev/merkle/rfc6962"
	"github.com/transparency-dev/tessera"
	"github.com/transparency-dev/tessera/api"
	"github.com/transparency-dev/tessera/api/layout"
	"github.com/transparency-dev/tessera/client"
	"github.com/transparency-dev/tessera/storage/posix"
	"golang.org/x/mod/sumdb/note"

	"github.com/knhk/knhk/pkg/kms"
)

// NoteSigner signs C2SP checkpoints (signed notes) with a KMS key: type
// 0x01 for Ed25519 keys, 0x02 (ECDSA P-256 over SHA-256, key id from the
// SPKI DER, as transparency-dev/witness) for ECDSA keys. The key can be
// swapped (KMS key rotation) while tessera is running.
type NoteSigner struct {
	name    string
	current atomic.Pointer[noteKey]
	// pinned is the key whose hash KeyHash last returned: note.Sign asks
	// KeyHash and then Sign, from tessera's one checkpoint goroutine, so a
	// swap between the two calls cannot pair one key's hash with another's
	// signature.
	pinned atomic.Pointer[noteKey]
}

type noteKey struct {
	signer kms.Signer
	hash   uint32
	vkey   string
}

// VerifierKey is the C2SP verifier key ("vkey") of signer's key under the
// log's origin.
func VerifierKey(origin string, signer kms.Signer) (string, error) {
	switch pub := signer.Public().(type) {
	case ed25519.PublicKey:
		return note.NewEd25519VerifierKey(origin, pub)
	case *ecdsa.PublicKey:
		der, err := x509.MarshalPKIXPublicKey(pub)
		if err != nil {
			return "", err
		}
		h := sha256.Sum256(der)
		return fmt.Sprintf("%s+%08x+%s", origin, binary.BigEndian.Uint32(h[:4]), base64.StdEncoding.EncodeToString(append([]byte{0x02}, der...))), nil
	}
	return "", fmt.Errorf("checkpoint signer %s: %T keys cannot sign C2SP notes", signer.KeyID(), signer.Public())
}

func newNoteKey(origin string, signer kms.Signer) (*noteKey, error) {
	vkey, err := VerifierKey(origin, signer)
	if err != nil {
		return nil, err
	}
	v, err := fnote.NewVerifier(vkey)
	if err != nil {
		return nil, err
	}
	return &noteKey{signer: signer, hash: v.KeyHash(), vkey: vkey}, nil
}

// NewNoteSigner wraps signer under the log's origin name and returns the
// matching verifier key (the "vkey" to publish).
func NewNoteSigner(origin string, signer kms.Signer) (*NoteSigner, string, error) {
	s := &NoteSigner{name: origin}
	vkey, err := s.Use(signer)
	return s, vkey, err
}

// Use makes signer sign the next checkpoints and returns its verifier key.
func (s *NoteSigner) Use(signer kms.Signer) (string, error) {
	k, err := newNoteKey(s.name, signer)
	if err != nil {
		return "", err
	}
	s.current.Store(k)
	return k.vkey, nil
}

// Name is the log origin.
func (s *NoteSigner) Name() string { return s.name }

// KeyHash identifies the key in the note's signature lines.
func (s *NoteSigner) KeyHash() uint32 {
	k := s.current.Load()
	s.pinned.Store(k)
	return k.hash
}

// Sign signs the note text through the KMS.
func (s *NoteSigner) Sign(msg []byte) ([]byte, error) {
	k := s.pinned.Load()
	if k == nil {
		k = s.current.Load()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return k.signer.Sign(ctx, msg)
}

// ErrNoCheckpoint and ErrBadRange are why a proof cannot be had: the log
// has not signed a checkpoint yet (try later), or the request asks for
// tree sizes the log cannot prove (the caller's mistake).
var (
	ErrNoCheckpoint = errors.New("no signed checkpoint yet")
	ErrBadRange     = errors.New("tree sizes out of range")
)

// Log is the durable, append-only Merkle log of receipts (tessera with its
// POSIX driver): entries are the canonical receipt encodings, leaves their
// RFC 6962 hashes, checkpoints C2SP signed notes.
type Log struct {
	add       tessera.AddFn
	reader    tessera.LogReader
	shutdown  func(context.Context) error
	cancel    context.CancelFunc // stops tessera's background work
	origin    string
	dir       string                          // tessera's POSIX layout (tlog-tiles)
	verifiers atomic.Pointer[[]note.Verifier] // every checkpoint key ever used
	vkeys     []string                        // their text, to skip duplicates; guarded by the caller
}

const (
	defaultBatchMaxAge        = 250 * time.Millisecond
	defaultCheckpointInterval = 5 * time.Second
)

// LogOptions tune batching (the group commit) and checkpointing.
type LogOptions struct {
	BatchMaxSize       uint          // default 8192
	BatchMaxAge        time.Duration // default 250 ms: the most an entry waits for its batch
	CheckpointInterval time.Duration // default 5 s: KMS signs per interval, not per request
	Witnessing
}

// Witnessing asks peer witnesses to cosign each checkpoint before it is
// published (tessera's WithWitnesses). Publication waits at most Timeout
// and then goes ahead with the cosignatures that came back: a down peer
// delays its cosignature, never a checkpoint, and never a receipt.
type Witnessing struct {
	Witnesses *tessera.WitnessGroup // nil: no witnessing
	Timeout   time.Duration         // default tessera's
	Client    *http.Client          // to reach the witnesses (mTLS under identity); nil: net/http's
}

// OpenLog opens (or creates) the log in dir; vkeys are the verifier keys
// its checkpoints may be signed with (the current one and older ones).
func OpenLog(ctx context.Context, dir string, signer *NoteSigner, vkeys []string, o LogOptions) (*Log, error) {
	if o.BatchMaxSize == 0 {
		o.BatchMaxSize = 8192
	}
	if o.BatchMaxAge == 0 {
		o.BatchMaxAge = defaultBatchMaxAge
	}
	if o.CheckpointInterval == 0 {
		o.CheckpointInterval = defaultCheckpointInterval
	}
	l := &Log{origin: signer.Name(), dir: dir}
	l.verifiers.Store(&[]note.Verifier{})
	for _, k := range vkeys {
		if err := l.AddVerifier(k); err != nil {
			return nil, err
		}
	}
	// Tessera's integration and checkpointing run for as long as the
	// appender's context: give it one that Close ends.
	bg, cancel := context.WithCancel(context.WithoutCancel(ctx))
	driver, err := posix.New(bg, posix.Config{Path: dir, HTTPClient: o.Client})
	if err != nil {
		cancel()
		return nil, fmt.Errorf("receipt log %s: %w", dir, err)
	}
	opts := tessera.NewAppendOptions().
		WithCheckpointSigner(signer).
		WithBatching(o.BatchMaxSize, o.BatchMaxAge).
		WithCheckpointInterval(o.CheckpointInterval)
	if o.Witnesses != nil {
		opts = opts.WithWitnesses(*o.Witnesses, &tessera.WitnessOptions{Timeout: o.Timeout, FailOpen: true})
	}
	appender, shutdown, reader, err := tessera.NewAppender(bg, driver, opts)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("receipt log %s: %w", dir, err)
	}
	l.add, l.reader, l.shutdown, l.cancel = appender.Add, reader, shutdown, cancel
	return l, nil
}

// AddVerifier accepts checkpoints signed with vkey from now on. Callers
// serialise it (the service does under its rotation lock).
func (l *Log) AddVerifier(vkey string) error {
	if slices.Contains(l.vkeys, vkey) {
		return nil
	}
	v, err := fnote.NewVerifier(vkey)
	if err != nil {
		return fmt.Errorf("receipt log: verifier key: %w", err)
	}
	vs := append(slices.Clone(*l.verifiers.Load()), v)
	l.verifiers.Store(&vs)
	l.vkeys = append(l.vkeys, vkey)
	return nil
}

// Append adds an encoded receipt and returns its index once it is durably
// sequenced and integrated (its batch is on disk).
func (l *Log) Append(ctx context.Context, encoded []byte) (uint64, error) {
	return l.Enqueue(ctx, encoded)()
}

// Enqueue queues an encoded receipt for the next batch; the returned
// function waits for its index.
func (l *Log) Enqueue(ctx context.Context, encoded []byte) func() (uint64, error) {
	f := l.add(ctx, tessera.NewEntry(encoded))
	return func() (uint64, error) {
		idx, err := f()
		if err != nil {
			return 0, fmt.Errorf("receipt log append: %w", err)
		}
		return idx.Index, nil
	}
}

// Checkpoint returns the latest signed checkpoint, verified with any of
// the log's keys (the one on disk may predate a KMS key rotation).
func (l *Log) Checkpoint(ctx context.Context) (*log.Checkpoint, []byte, error) {
	raw, err := l.reader.ReadCheckpoint(ctx)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil, ErrNoCheckpoint
	}
	if err != nil {
		return nil, nil, fmt.Errorf("receipt log checkpoint: %w", err)
	}
	cp, err := openCheckpoint(raw, l.origin, *l.verifiers.Load())
	if err != nil {
		return nil, nil, fmt.Errorf("receipt log checkpoint: %w", err)
	}
	return cp, raw, nil
}

// Open verifies a checkpoint note signed with one of the log's keys.
func (l *Log) Open(raw []byte) (*log.Checkpoint, error) {
	cp, err := openCheckpoint(raw, l.origin, *l.verifiers.Load())
	if err != nil {
		return nil, fmt.Errorf("receipt log checkpoint: %w", err)
	}
	return cp, nil
}

// openCheckpoint verifies a checkpoint note and parses its body.
func openCheckpoint(raw []byte, origin string, vs []note.Verifier) (*log.Checkpoint, error) {
	n, err := note.Open(raw, note.VerifierList(vs...))
	if err != nil {
		return nil, err
	}
	var cp log.Checkpoint
	if _, err := cp.Unmarshal([]byte(n.Text)); err != nil {
		return nil, err
	}
	if cp.Origin != origin {
		return nil, fmt.Errorf("origin %q, want %q", cp.Origin, origin)
	}
	return &cp, nil
}

// InclusionProof proves leaf index in the tree of the given size.
func (l *Log) InclusionProof(ctx context.Context, index, size uint64) ([][]byte, error) {
	if index >= size {
		return nil, fmt.Errorf("receipt %d is not in a tree of size %d yet", index, size)
	}
	pb, err := client.NewProofBuilder(ctx, size, l.reader.ReadTile)
	if err != nil {
		return nil, err
	}
	return pb.InclusionProof(ctx, index)
}

// Close flushes and stops the appender and its background work.
func (l *Log) Close(ctx context.Context) error {
	defer l.cancel()
	return l.shutdown(ctx)
}

// VerifyInclusion checks a proof of leaf at index against a root.
func VerifyInclusion(leaf [32]byte, index, size uint64, p [][]byte, root []byte) error {
	return proof.VerifyInclusion(rfc6962.DefaultHasher, index, size, leaf[:], p, root)
}

// ScanFrom calls f for every entry from from to below size, in order (to
// rebuild indexes).
func (l *Log) ScanFrom(ctx context.Context, from, size uint64, f func(index uint64, data []byte) error) error {
	for i := from; i < size; {
		bundleIdx := i / layoutWidth
		b, err := client.GetEntryBundle(ctx, l.reader.ReadEntryBundle, bundleIdx, size)
		if err != nil {
			return err
		}
		for j, e := range b.Entries {
			idx := bundleIdx*layoutWidth + uint64(j)
			if idx < i || idx >= size {
				continue
			}
			if err := f(idx, e); err != nil {
				return err
			}
		}
		i = (bundleIdx + 1) * layoutWidth
	}
	return nil
}

// Entry reads entry index from a tree of the given size (bundles are
// stored partial or full according to the tree size).
func (l *Log) Entry(ctx context.Context, index, size uint64) ([]byte, error) {
	if index >= size {
		return nil, fmt.Errorf("entry %d is not in a tree of size %d", index, size)
	}
	b, err := client.GetEntryBundle(ctx, l.reader.ReadEntryBundle, index/layoutWidth, size)
	if err != nil {
		return nil, err
	}
	j := index % layoutWidth
	if j >= uint64(len(b.Entries)) {
		return nil, fmt.Errorf("entry %d missing from its bundle", index)
	}
	return b.Entries[j], nil
}

// IntegratedSize is the size of the tree entries are integrated into.
func (l *Log) IntegratedSize(ctx context.Context) (uint64, error) {
	return l.reader.IntegratedSize(ctx)
}

const layoutWidth = 256 // tlog-tiles entry bundle width (and level-0 tile width)

// bundlePath is the file of full entry bundle n. Tessera writes it once,
// when the entry that fills it is sequenced, and never again once the tree
// is integrated past it: it sequences from the integrated size, reading
// back only the partial bundle there (storage/posix sequenceBatch).
func (l *Log) bundlePath(n uint64) string {
	return filepath.Join(l.dir, filepath.FromSlash(layout.EntriesPath(n, 0)))
}

// leafHashes are the leaf hashes of full bundle n's entries, from the
// level-0 tile above it: what the tree and every proof commit to.
func (l *Log) leafHashes(ctx context.Context, n uint64) ([][]byte, error) {
	raw, err := l.reader.ReadTile(ctx, 0, n, 0)
	if err != nil {
		return nil, err
	}
	var t api.HashTile
	if err := t.UnmarshalText(raw); err != nil {
		return nil, fmt.Errorf("tile 0/%d: %w", n, err)
	}
	if len(t.Nodes) != layoutWidth {
		return nil, fmt.Errorf("tile 0/%d: %d hashes, want %d", n, len(t.Nodes), layoutWidth)
	}
	return t.Nodes, nil
}

// ConsistencyProof proves that the tree of size smaller is a prefix of the
// tree of size larger (an append-only log never rewrites history). size is
// a published tree size, at least larger, whose tiles the proof is read
// from: tessera keeps tiles for the trees it integrated and published, not
// for every size in between, and every node a proof needs is a perfect
// subtree, whose hash is the same in every tree that contains it.
func (l *Log) ConsistencyProof(ctx context.Context, smaller, larger, size uint64) ([][]byte, error) {
	if smaller > larger || larger > size {
		return nil, fmt.Errorf("%w: want from ≤ to ≤ %d (the latest checkpoint), got from %d and to %d", ErrBadRange, size, smaller, larger)
	}
	if smaller == 0 {
		// Every tree extends the empty one: the proof is empty (merkle
		// v0.0.3 refuses to build it).
		return [][]byte{}, nil
	}
	pb, err := client.NewProofBuilder(ctx, size, l.reader.ReadTile)
	if err != nil {
		return nil, err
	}
	return pb.ConsistencyProof(ctx, smaller, larger)
}

// VerifyConsistency checks a consistency proof between two roots.
func VerifyConsistency(size1, size2 uint64, p [][]byte, root1, root2 []byte) error {
	if size1 == 0 {
		// Every tree extends the empty one; its root must still be the
		// empty tree's.
		empty := rfc6962.DefaultHasher.EmptyRoot()
		switch {
		case len(p) != 0:
			return errors.New("a consistency proof from the empty tree must be empty")
		case !bytes.Equal(root1, empty):
			return errors.New("a tree of size 0 must have the empty tree's root")
		case size2 == 0 && !bytes.Equal(root2, empty):
			return errors.New("a tree of size 0 must have the empty tree's root")
		}
		return nil
	}
	return proof.VerifyConsistency(rfc6962.DefaultHasher, size1, size2, p, root1, root2)
}
