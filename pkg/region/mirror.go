package region

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"path/filepath"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/transparency-dev/merkle/compact"
	"github.com/transparency-dev/merkle/proof"
	"github.com/transparency-dev/merkle/rfc6962"
	bolt "go.etcd.io/bbolt"
	"golang.org/x/mod/sumdb/note"

	"github.com/knhk/knhk/internal/fsutil"
	"github.com/knhk/knhk/pkg/receipt"
)

// MirrorSuffix names a region's mirror key: the tlog-mirror spec wants
// the mirror a cosigner distinct from the witness, under its own name,
// since an Ed25519 cosignature does not say which role signed.
const MirrorSuffix = "-mirror"

const (
	maxMirrorBody = 64 << 20 // decompressed; the spec's 8192 entries of ~2 KiB receipts fit with room
	// maxBehind is how far below the next entry an upload may start:
	// further is a client resending what is held (the spec's "too far below").
	maxBehind = maxPackages * bundleWidth
)

var (
	bucketMirrorMeta = []byte("mirror")
	keyMirrorKey     = []byte("\x00key") // the vkey this state was made for
)

// mirrorState is a mirrored log's progress, kept in one bbolt value.
type mirrorState struct {
	Next   uint64   `json:"next"`  // the first entry not held; all below are
	Range  [][]byte `json:"range"` // the compact range [0, Next)
	Size   uint64   `json:"size"`  // of the newest checkpoint the mirror cosigned
	Signed []byte   `json:"signed,omitempty"`
}

// MirrorOptions configure a Mirror.
type MirrorOptions struct {
	Key     *Cosigner // named <region>-mirror
	Path    string    // bbolt, 0600
	Witness *Witness  // whose cosigned checkpoints are the pending ones
	Log     *slog.Logger
	Metrics prometheus.Registerer
}

// Mirror stores the entries of the logs this region witnesses, checked
// against their checkpoints, and cosigns a checkpoint once it holds every
// entry it covers (C2SP tlog-mirror's add-entries).
type Mirror struct {
	key *Cosigner
	db  *bolt.DB
	w   *Witness
	log *slog.Logger
	rf  compact.RangeFactory
	mu  sync.Mutex // serialises uploads: one owner of each origin's state
	// buffers bounds the request bodies read into memory at once.
	buffers chan struct{}
	held    *prometheus.GaugeVec
	res     *prometheus.CounterVec
}

// NewMirror opens the mirror state, bound to its key as the witness's is.
func NewMirror(o MirrorOptions) (*Mirror, error) {
	db, err := bolt.Open(o.Path, 0o600, &bolt.Options{Timeout: 5 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("mirror state %s: %w", o.Path, err)
	}
	m := &Mirror{key: o.Key, db: db, w: o.Witness, log: o.Log, rf: compact.RangeFactory{Hash: rfc6962.DefaultHasher.HashChildren}, buffers: make(chan struct{}, 2)}
	err = fsutil.SyncDir(filepath.Dir(o.Path))
	if err == nil {
		err = db.Update(func(tx *bolt.Tx) error {
			b, err := tx.CreateBucketIfNotExists(bucketMirrorMeta)
			if err != nil {
				return err
			}
			switch k := b.Get(keyMirrorKey); {
			case k == nil && !o.Key.Created && b.Stats().KeyN > 0:
				return errors.New("the mirror state records no key but holds entries")
			case k == nil:
				return b.Put(keyMirrorKey, []byte(o.Key.Verifier))
			case string(k) != o.Key.Verifier:
				return fmt.Errorf("the mirror state was made for key %q, not %q: restore the key, or start a fresh mirror.db", k, o.Key.Verifier)
			}
			return nil
		})
	}
	if err == nil {
		err = o.Key.commit()
	}
	if err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("mirror state %s: %w", o.Path, err)
	}
	m.held = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "knhk_region_mirror_entries", Help: "Entries of each peer's log this region holds as its mirror."}, []string{"origin"})
	m.res = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "knhk_region_mirror_requests_total", Help: "add-entries requests by result."}, []string{"result"})
	if o.Metrics != nil {
		o.Metrics.MustRegister(m.held, m.res)
	}
	return m, nil
}

// Close releases the state file.
func (m *Mirror) Close() error { return m.db.Close() }

func entriesBucket(origin string) []byte { return append([]byte("entries/"), origin...) }

func (m *Mirror) state(origin string) (mirrorState, error) {
	var st mirrorState
	err := m.db.View(func(tx *bolt.Tx) error {
		if v := tx.Bucket(bucketMirrorMeta).Get([]byte(origin)); v != nil {
			return json.Unmarshal(v, &st)
		}
		return nil
	})
	return st, err
}

func (m *Mirror) info(origin string, st mirrorState) Outcome {
	pending := uint64(0)
	if cp, _ := m.w.Latest(context.Background(), origin); cp != nil {
		pending, _ = checkpointSize(cp)
	}
	return Outcome{Status: http.StatusConflict, Body: MirrorInfo{Pending: pending, Next: st.Next}.body(), ContentType: "text/x.tlog.mirror-info"}
}

// AddEntries answers one add-entries request body.
func (m *Mirror) AddEntries(ctx context.Context, body io.Reader) Outcome {
	o := m.addEntries(ctx, body)
	m.res.WithLabelValues(fmt.Sprint(o.Status)).Inc()
	return o
}

func (m *Mirror) addEntries(ctx context.Context, body io.Reader) Outcome {
	br := bufio.NewReader(io.LimitReader(body, maxMirrorBody))
	h, err := readHeader(br)
	if err != nil {
		return message(400, "add-entries: %v", err)
	}
	vs, ok := m.w.verifiers[h.origin]
	if !ok {
		return message(404, "add-entries: origin %q is not a log this region mirrors (region.peers[].log_keys)", clip([]byte(h.origin)))
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	st, err := m.state(h.origin)
	if err != nil {
		m.log.Error("mirror state unreadable", "origin", h.origin, "error", err.Error())
		return message(500, "add-entries: the mirror could not read its state")
	}
	pending, err := m.w.Pending(ctx, h.origin, h.end)
	switch {
	case err != nil:
		m.log.Error("witness state unreadable", "origin", h.origin, "error", err.Error())
		return message(500, "add-entries: the mirror could not read its state")
	case pending == nil, h.end < st.Size, h.start > st.Next, st.Next-min(st.Next, h.start) > maxBehind:
		return m.info(h.origin, st)
	}
	n, err := note.Open(pending, note.VerifierList(vs...))
	if err != nil {
		return message(500, "add-entries: the pending checkpoint no longer verifies: %v", err)
	}
	root, err := checkpointRoot(n.Text)
	if err != nil {
		return message(500, "add-entries: the pending checkpoint: %v", err)
	}
	rng, err := m.rf.NewRange(0, st.Next, st.Range)
	if err != nil {
		return message(500, "add-entries: the mirror's range: %v", err)
	}
	next, added, authenticated := st.Next, [][]byte{}, 0
	var failure *Outcome
	for i := range numPackages(h.start, h.end) {
		if i == maxPackages {
			break // the rest in another request (202)
		}
		s, e := packageBounds(h.start, h.end, i)
		p, err := readPackage(br, s, e)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			o := message(400, "add-entries: %v", err)
			failure = &o
			break
		}
		if e <= next {
			continue // held already: a replay stores nothing twice
		}
		tmp, err := m.rf.NewRange(0, rng.End(), rng.Hashes())
		if err != nil {
			return message(500, "add-entries: %v", err)
		}
		for _, x := range p.entries[next-s:] {
			if err := tmp.Append(leafOf(x), nil); err != nil {
				return message(500, "add-entries: %v", err)
			}
		}
		rootE, err := tmp.GetRootHash(nil)
		if err == nil {
			err = proof.VerifyConsistency(rfc6962.DefaultHasher, e, h.end, p.proof, rootE, root)
		}
		if err != nil {
			o := message(422, "add-entries: package [%d, %d): its entries and proof do not match the checkpoint of size %d: %v", s, e, h.end, err)
			failure = &o
			break
		}
		added = append(added, p.entries[next-s:]...)
		rng, next = tmp, e
		authenticated++
	}
	if failure == nil && next == h.end {
		if _, err := br.Peek(1); !errors.Is(err, io.EOF) {
			o := message(400, "add-entries: bytes after the last package")
			failure = &o
		}
	}
	if failure != nil && failure.Status == 400 && authenticated > 0 {
		failure = nil // a cut request: what was authenticated is kept (202)
	}
	var sig []byte
	if failure == nil && next >= h.end {
		if sig, err = m.cosign(n.Text); err != nil {
			m.log.Error("mirror cosignature failed", "origin", h.origin, "error", err.Error())
			return message(500, "add-entries: the mirror could not cosign")
		}
	}
	if err := m.commit(h.origin, st, next, rng, added, h.end, pending, sig); err != nil {
		m.log.Error("mirror state not stored", "origin", h.origin, "error", err.Error())
		return message(500, "add-entries: the mirror could not store the entries")
	}
	m.held.WithLabelValues(h.origin).Set(float64(next))
	switch {
	case failure != nil:
		return *failure
	case next < h.end:
		return Outcome{Status: http.StatusAccepted, Body: MirrorInfo{Pending: h.end, Next: next}.body(), ContentType: "text/x.tlog.mirror-info"}
	}
	return Outcome{Status: http.StatusOK, Body: sig}
}

// commit stores the entries authenticated and the new state in one
// transaction (fsynced by bbolt) before any answer goes out.
func (m *Mirror) commit(origin string, st mirrorState, next uint64, rng *compact.Range, added [][]byte, size uint64, pending, sig []byte) error {
	if next == st.Next && sig == nil {
		return nil
	}
	return m.db.Update(func(tx *bolt.Tx) error {
		eb, err := tx.CreateBucketIfNotExists(entriesBucket(origin))
		if err != nil {
			return err
		}
		for i, x := range added {
			k := binary.BigEndian.AppendUint64(nil, st.Next+uint64(i))
			if err := eb.Put(k, x); err != nil {
				return err
			}
		}
		if err := applyHolds(tx, origin, added); err != nil {
			return err
		}
		st.Next, st.Range = next, rng.Hashes()
		if sig != nil && size >= st.Size {
			st.Size, st.Signed = size, append(append([]byte{}, pending...), sig...)
		}
		v, err := json.Marshal(st)
		if err != nil {
			return err
		}
		return tx.Bucket(bucketMirrorMeta).Put([]byte(origin), v)
	})
}

// cosign signs a checkpoint body with the mirror key and returns the
// signature line.
func (m *Mirror) cosign(text string) ([]byte, error) {
	signed, err := note.Sign(&note.Note{Text: text}, m.key.Signer)
	if err != nil {
		return nil, err
	}
	_, sig, ok := bytes.Cut(signed[len(text):], []byte("\n"))
	if !ok {
		return nil, errors.New("note.Sign wrote no signature line")
	}
	return sig, nil
}

// checkpointRoot is a checkpoint body's root hash (checked strictly when
// the witness took it).
func checkpointRoot(text string) ([]byte, error) {
	lines := bytes.SplitN([]byte(text), []byte("\n"), 4)
	if len(lines) < 4 {
		return nil, errors.New("not a checkpoint body")
	}
	root, err := base64.StdEncoding.Strict().DecodeString(string(lines[2]))
	if err != nil || len(root) != 32 {
		return nil, errors.New("not a checkpoint root")
	}
	return root, nil
}

// MirroredLog is what a mirror holds of one log, for GET /v1/region/mirror.
type MirroredLog struct {
	Origin string `json:"origin"`
	Size   uint64 `json:"size"` // entries held: [0, size)
	Root   []byte `json:"root"` // of the tree of those entries
	// Checkpoint is the newest checkpoint the mirror cosigned, with its
	// cosignature.
	Checkpoint string `json:"checkpoint,omitempty"`
}

// Logs lists the mirrored logs.
func (m *Mirror) Logs() ([]MirroredLog, error) {
	out := []MirroredLog{}
	err := m.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketMirrorMeta).ForEach(func(k, v []byte) error {
			if k[0] == 0 {
				return nil // the key binding, prune cursors
			}
			var st mirrorState
			if err := json.Unmarshal(v, &st); err != nil {
				return err
			}
			r, err := m.rf.NewRange(0, st.Next, st.Range)
			if err != nil {
				return err
			}
			root, err := r.GetRootHash(nil)
			if err != nil {
				return err
			}
			out = append(out, MirroredLog{Origin: string(k), Size: st.Next, Root: root, Checkpoint: string(st.Signed)})
			return nil
		})
	})
	return out, err
}

// Entry returns entry i of origin's log as mirrored (nil if not held).
func (m *Mirror) Entry(origin string, i uint64) ([]byte, error) {
	var out []byte
	err := m.db.View(func(tx *bolt.Tx) error {
		if b := tx.Bucket(entriesBucket(origin)); b != nil {
			if v := b.Get(binary.BigEndian.AppendUint64(nil, i)); v != nil {
				out = append([]byte{}, v...)
			}
		}
		return nil
	})
	return out, err
}

// Handler serves POST /add-entries, gzip or not (the spec's MUST).
func (m *Mirror) register(mux *http.ServeMux) {
	mux.HandleFunc("POST /add-entries", func(rw http.ResponseWriter, r *http.Request) {
		rw.Header().Set("Accept-Encoding", "gzip")
		var body io.Reader = http.MaxBytesReader(rw, r.Body, maxMirrorBody)
		switch r.Header.Get("Content-Encoding") {
		case "", "identity":
		case "gzip":
			zr, err := gzip.NewReader(body)
			if err != nil {
				writeOutcome(rw, message(400, "add-entries: gzip: %v", err))
				return
			}
			defer func() { _ = zr.Close() }()
			body = zr
		default:
			writeOutcome(rw, message(415, "add-entries: Content-Encoding %q: want gzip or none", clip([]byte(r.Header.Get("Content-Encoding")))))
			return
		}
		// Read whole before the mirror's lock, so a slow peer holds up
		// nobody; at most two bodies are buffered at once.
		select {
		case m.buffers <- struct{}{}:
			defer func() { <-m.buffers }()
		case <-r.Context().Done():
			return
		}
		b, err := io.ReadAll(io.LimitReader(body, maxMirrorBody+1))
		if err != nil && len(b) == 0 {
			writeOutcome(rw, message(400, "add-entries: reading the body: %v", err))
			return
		}
		// A body cut short (or past the limit) is what the spec's 202
		// is for: the packages that arrived whole are kept.
		writeOutcome(rw, m.AddEntries(r.Context(), bytes.NewReader(b[:min(len(b), maxMirrorBody)])))
	})
}

// leafOf is an entry's leaf hash. An entry the origin's retention pruned
// is a tombstone carrying its leaf hash: a mirror that catches up past
// pruning stores the tombstone, proved like any entry by the hash it
// carries (so it holds what the origin holds, and no more).
func leafOf(entry []byte) []byte {
	if _, leaf, ok := receipt.ParseTombstone(entry); ok {
		return leaf[:]
	}
	return rfc6962.DefaultHasher.HashLeaf(entry)
}
