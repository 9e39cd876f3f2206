// Package region makes knhk regions witness and mirror each other's
// receipt logs over the C2SP tlog-witness protocol.
package region

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	fnote "github.com/transparency-dev/formats/note"
	"github.com/transparency-dev/witness/witness"
	"golang.org/x/mod/sumdb/note"
)

// WitnessOptions configure the witness side of a region.
type WitnessOptions struct {
	// Key cosigns (tlog-cosignature/v1, Ed25519): LoadOrCreateKey.
	Key *Cosigner
	// Logs are the checkpoint verifier keys of the logs this region
	// witnesses, pinned in config (a witness never trusts keys the origin
	// itself publishes). Each key is named after its log's origin; an
	// origin may have several (a log whose KMS key rotated).
	Logs []string
	// Path is the witness's state file (bbolt, 0600).
	Path    string
	Log     *slog.Logger
	Metrics prometheus.Registerer
}

// Witness checks each new checkpoint of a peer's log against the last one
// it cosigned, and cosigns it when consistent.
type Witness struct {
	w         *witness.Witness
	st        *store
	log       *slog.Logger
	verifiers map[string][]note.Verifier // by origin; read-only after NewWitness
	results   *prometheus.CounterVec
	refused   *prometheus.CounterVec
	mirror    *Mirror // nil: this region does not mirror

	// recent are the last checkpoints cosigned per origin, newest last:
	// the pending checkpoints a mirror upload may end at (the spec's
	// "any of the last several"). The latest is also in the state.
	rmu    sync.Mutex
	recent map[string][][]byte
}

const maxRecent = 16

// AttachMirror has the witness's handler serve the mirror's add-entries
// too (one submission prefix, as the tlog-mirror spec allows). Call it
// before Handler.
func (w *Witness) AttachMirror(m *Mirror) { w.mirror = m }

// Pending is the checkpoint of size this region cosigned for origin
// recently (nil if none): what a mirror upload must end at.
func (w *Witness) Pending(ctx context.Context, origin string, size uint64) ([]byte, error) {
	w.rmu.Lock()
	for _, cp := range w.recent[origin] {
		if n, _ := checkpointSize(cp); n == size {
			w.rmu.Unlock()
			return cp, nil
		}
	}
	w.rmu.Unlock()
	cp, err := w.w.GetCheckpoint(ctx, origin)
	if err != nil || cp == nil {
		return nil, err
	}
	if n, _ := checkpointSize(cp); n != size {
		return nil, nil
	}
	return cp, nil
}

func (w *Witness) cosigned(origin string, cp []byte) {
	w.rmu.Lock()
	defer w.rmu.Unlock()
	r := append(w.recent[origin], cp)
	if len(r) > maxRecent {
		r = r[len(r)-maxRecent:]
	}
	w.recent[origin] = r
}

// NewWitness opens the witness state and builds the library's witness.
func NewWitness(ctx context.Context, o WitnessOptions) (*Witness, error) {
	vs := make(map[string][]note.Verifier, len(o.Logs))
	for _, vkey := range o.Logs {
		v, err := fnote.NewVerifier(vkey)
		if err != nil {
			return nil, fmt.Errorf("log key %q: %w", clip([]byte(vkey)), err)
		}
		vs[v.Name()] = append(vs[v.Name()], v)
	}
	st, err := openStore(o.Path)
	if err != nil {
		return nil, err
	}
	if err := st.bindKey(o.Key.Verifier, o.Key.Created); err != nil {
		_ = st.Close()
		return nil, fmt.Errorf("witness state %s: %w", o.Path, err)
	}
	if err := o.Key.commit(); err != nil {
		_ = st.Close()
		return nil, err
	}
	lw, err := witness.New(ctx, witness.Opts{
		Persistence: st,
		Signers:     []note.Signer{o.Key.Signer},
		// The library takes one verifier per origin: AddCheckpoint has
		// already found which pinned key signed this checkpoint.
		VerifierForLog: func(ctx context.Context, origin string) (note.Verifier, bool, error) {
			v, ok := ctx.Value(signedBy{}).(note.Verifier)
			if !ok || v.Name() != origin {
				return nil, false, nil
			}
			return v, true, nil
		},
	})
	if err != nil {
		_ = st.Close()
		return nil, err
	}
	log := o.Log
	if log == nil {
		log = slog.Default()
	}
	w := &Witness{w: lw, st: st, log: log, verifiers: vs, recent: map[string][][]byte{},
		results: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "knhk_region_witness_requests_total",
			Help: "add-checkpoint requests this region answered, by result (cosigned, stale, unknown_origin, bad_request, error, or a refusal kind: unknown_key, bad_signature, bad_proof, root_mismatch).",
		}, []string{"result"}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "knhk_region_inconsistency_total",
			Help: "Checkpoints refused and kept as evidence, by origin and kind (root_mismatch: rewritten history; unknown_key: a forgery or an unpinned rotated key; bad_signature; bad_proof).",
		}, []string{"origin", "kind"}),
	}
	if o.Metrics != nil {
		o.Metrics.MustRegister(w.results, w.refused)
	}
	return w, nil
}

// Close releases the state file.
func (w *Witness) Close() error { return w.st.Close() }

// Latest is the checkpoint last cosigned for origin (nil if none).
func (w *Witness) Latest(ctx context.Context, origin string) ([]byte, error) {
	return w.w.GetCheckpoint(ctx, origin)
}

// Outcome is the answer to one add-checkpoint request.
type Outcome struct {
	Status int    // HTTP status, as the C2SP spec assigns them
	Body   []byte // the cosignature lines on 200; the size on 409; a message otherwise
	// ContentType is text/x.tlog.size on 409.
	ContentType string
}

// Evidence is a refused checkpoint kept for the operator.
type Evidence struct {
	Time       time.Time `json:"time"`
	Origin     string    `json:"origin"`
	Kind       string    `json:"kind"` // unknown_key | bad_signature | bad_proof | root_mismatch
	Reason     string    `json:"reason"`
	OldSize    uint64    `json:"old_size"`
	Proof      []string  `json:"proof,omitempty"`
	Checkpoint string    `json:"checkpoint"`
	// Cosigned is what this region had cosigned when it refused.
	Cosigned string `json:"cosigned,omitempty"`
}

// AddCheckpoint answers one tlog-witness add-checkpoint body.
func (w *Witness) AddCheckpoint(ctx context.Context, body []byte) Outcome {
	req, err := parseAddCheckpoint(body)
	if err != nil {
		w.results.WithLabelValues("bad_request").Inc()
		return message(400, "add-checkpoint: %v", err)
	}
	origin, _, _ := strings.Cut(string(req.checkpoint), "\n")
	vs, ok := w.verifiers[origin]
	if !ok {
		w.results.WithLabelValues("unknown_origin").Inc()
		return message(404, "add-checkpoint: origin %q is not a log this region witnesses (region.peers[].log_keys)", clip([]byte(origin)))
	}
	// The library reports a signature failure only as text; checking the
	// note first tells a forgery (403, kept as evidence) from a malformed
	// body (400).
	n, err := note.Open(req.checkpoint, note.VerifierList(vs...))
	if err != nil {
		var unverified *note.UnverifiedNoteError
		var invalid *note.InvalidSignatureError
		switch {
		case errors.As(err, &unverified):
			// Signed, but by no pinned key: a forgery, or a log whose key
			// rotated before its new key was pinned here.
			w.refuse(ctx, origin, KindUnknownKey, err, req)
			return message(403, "add-checkpoint: no signature by a key pinned for %q (a forgery, or a rotated key not yet in region.peers[].log_keys)", clip([]byte(origin)))
		case errors.As(err, &invalid):
			w.refuse(ctx, origin, KindBadSignature, err, req)
			return message(403, "add-checkpoint: a signature by the key pinned for %q does not verify", clip([]byte(origin)))
		}
		w.results.WithLabelValues("bad_request").Inc()
		return message(400, "add-checkpoint: the checkpoint is not a signed note: %v", err)
	}
	size, err := checkpointBody(n.Text, origin)
	if err != nil {
		w.results.WithLabelValues("bad_request").Inc()
		return message(400, "add-checkpoint: %v", err)
	}
	// The spec's rules that hold whatever was cosigned before. The library
	// skips them for a log it has not seen (trust on first use).
	switch {
	case req.oldSize > size:
		w.results.WithLabelValues("bad_request").Inc()
		return message(400, "add-checkpoint: old size %d is larger than the checkpoint's size %d", req.oldSize, size)
	case req.oldSize == 0 && len(req.proof) > 0:
		w.results.WithLabelValues("bad_request").Inc()
		return message(400, "add-checkpoint: old size 0 needs an empty consistency proof, got %d hashes", len(req.proof))
	}
	if req.oldSize != 0 {
		// A witness that never cosigned this log answers 409 with size 0,
		// so the log proves consistency from the start. Losing a race to
		// a first update only makes this a stale 409, which the log
		// retries; the library re-checks under its transaction otherwise.
		prev, err := w.w.GetCheckpoint(ctx, origin)
		if err != nil {
			w.results.WithLabelValues("error").Inc()
			w.log.Error("witness state unreadable", "origin", origin, "error", err.Error())
			return message(500, "add-checkpoint: the witness could not read its state")
		}
		if prev == nil {
			w.results.WithLabelValues("stale").Inc()
			return Outcome{Status: 409, Body: []byte("0\n"), ContentType: "text/x.tlog.size"}
		}
	}
	ctx = context.WithValue(ctx, signedBy{}, signer(vs, n))
	sigs, trusted, err := w.w.Update(ctx, req.oldSize, req.checkpoint, req.proof)
	switch {
	case err == nil:
		w.results.WithLabelValues("cosigned").Inc()
		w.cosigned(origin, req.checkpoint)
		return Outcome{Status: 200, Body: sigs}
	case errors.Is(err, witness.ErrCheckpointStale):
		w.results.WithLabelValues("stale").Inc()
		return Outcome{Status: 409, Body: fmt.Appendf(nil, "%d\n", trusted), ContentType: "text/x.tlog.size"}
	case errors.Is(err, witness.ErrOldSizeInvalid):
		w.results.WithLabelValues("bad_request").Inc()
		return message(400, "add-checkpoint: old size %d is not a size this region cosigned", req.oldSize)
	case errors.Is(err, witness.ErrRootMismatch) && size > 0:
		// The same size with another root, both signed by the log: the
		// history was rewritten. The spec's answer is a 409 without the
		// size content type.
		w.refuse(ctx, origin, KindRootMismatch, err, req)
		return message(409, "add-checkpoint: a checkpoint of size %d with another root than the one this region cosigned: the log's history was rewritten", size)
	case errors.Is(err, witness.ErrRootMismatch):
		w.results.WithLabelValues("bad_request").Inc()
		return message(422, "add-checkpoint: a checkpoint of size 0 must have the empty tree's root")
	case errors.Is(err, witness.ErrInvalidProof):
		w.refuse(ctx, origin, KindBadProof, err, req)
		return message(422, "add-checkpoint: the consistency proof from size %d does not verify", req.oldSize)
	default:
		w.results.WithLabelValues("error").Inc()
		w.log.Error("witness update failed", "origin", string(clip([]byte(origin))), "error", err.Error())
		return message(500, "add-checkpoint: the witness could not store the checkpoint")
	}
}

// Kinds of refused checkpoint kept as evidence.
const (
	KindUnknownKey   = "unknown_key"   // signed by no pinned key
	KindBadSignature = "bad_signature" // a pinned key's signature that does not verify
	KindBadProof     = "bad_proof"     // a consistency proof that does not verify
	KindRootMismatch = "root_mismatch" // the same size, another root: rewritten history
)

// checkpointBody checks a C2SP checkpoint body strictly (origin, a size
// without leading zeros, a 32-byte root) and returns its size. The
// library is laxer, and a malformed checkpoint it stored would refuse
// every later one.
func checkpointBody(text, origin string) (uint64, error) {
	lines := strings.SplitN(text, "\n", 4)
	if len(lines) < 4 || lines[0] != origin {
		return 0, errors.New("the checkpoint body must be origin, size and root hash lines")
	}
	sz := lines[1]
	if sz == "" || (sz[0] == '0' && len(sz) > 1) {
		return 0, fmt.Errorf("checkpoint size %q: a decimal without leading zeros", clip([]byte(sz)))
	}
	size, err := strconv.ParseUint(sz, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("checkpoint size %q: a decimal that fits 64 bits", clip([]byte(sz)))
	}
	root, err := base64.StdEncoding.Strict().DecodeString(lines[2])
	if err != nil || len(root) != 32 {
		return 0, fmt.Errorf("checkpoint root %q: want a base64 SHA-256 hash", clip([]byte(lines[2])))
	}
	return size, nil
}

// signedBy carries, to the library's VerifierForLog, the pinned key that
// signed the checkpoint being updated.
type signedBy struct{}

// signer is the pinned key behind the note's first verified signature.
func signer(vs []note.Verifier, n *note.Note) note.Verifier {
	for _, v := range vs {
		if v.KeyHash() == n.Sigs[0].Hash {
			return v
		}
	}
	return vs[0] // unreachable: Open verified a signature by one of vs
}

func message(status int, format string, args ...any) Outcome {
	return Outcome{Status: status, Body: fmt.Appendf(nil, format+"\n", args...), ContentType: "text/plain; charset=utf-8"}
}

// refuse counts a refused checkpoint, keeps it as evidence with its proof
// and what was cosigned, and logs it.
func (w *Witness) refuse(ctx context.Context, origin, kind string, reason error, req addCheckpoint) {
	w.results.WithLabelValues(kind).Inc()
	w.refused.WithLabelValues(origin, kind).Inc()
	prev, _ := w.w.GetCheckpoint(ctx, origin)
	proof := make([]string, len(req.proof))
	for i, h := range req.proof {
		proof[i] = base64.StdEncoding.EncodeToString(h)
	}
	e := Evidence{Time: time.Now().UTC(), Origin: origin, Kind: kind, Reason: reason.Error(), OldSize: req.oldSize,
		Proof: proof, Checkpoint: string(req.checkpoint), Cosigned: string(prev)}
	b, _ := json.Marshal(e)
	if err := w.st.addEvidence(kind, b); err != nil {
		w.log.Error("witness evidence not stored", "origin", origin, "error", err.Error())
	}
	w.log.Warn("checkpoint refused and kept as evidence", "origin", origin, "kind", kind, "reason", reason.Error())
}

// Evidence lists the refused checkpoints kept, oldest first.
func (w *Witness) Evidence() ([]Evidence, error) {
	raw, err := w.st.evidence()
	if err != nil {
		return nil, err
	}
	out := make([]Evidence, 0, len(raw))
	for _, b := range raw {
		var e Evidence
		if json.Unmarshal(b, &e) == nil {
			out = append(out, e)
		}
	}
	return out, nil
}
