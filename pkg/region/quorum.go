package region

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"sort"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/mod/sumdb/note"

	"github.com/knhk/knhk/internal/fsutil"
)

// Quorum follows this region's own published checkpoints: which peers
// cosigned each, how far each peer lags, and the newest checkpoint that
// met region.quorum. It keeps that one on disk, so a receipt once durable
// stays durable (proved against it) while a peer is down or after a
// restart. One goroutine calls Observe; State is safe from any.
type Quorum struct {
	cos   *Cosigners
	need  int
	path  string
	log   *slog.Logger
	state atomic.Pointer[QuorumState]

	// pending are sizes seen in a checkpoint not yet covered by a quorum
	// one, oldest first, for the delay histogram; bounded, since a long
	// partition must not grow it without end.
	pending []seen
	last    []byte      // the latest checkpoint, as gathered
	recent  []*gathered // the last maxGathered checkpoints, oldest first
	peers   []string

	size, durable, durableLag, met prometheus.Gauge
	peerSize, peerLag, peerAt      *prometheus.GaugeVec
	delay                          prometheus.Histogram
}

type seen struct {
	size uint64
	at   time.Time
}

const maxPending = 1024

// QuorumState is a snapshot; its fields are never modified once shared.
type QuorumState struct {
	Size uint64 // the latest checkpoint's
	Met  bool   // the latest checkpoint met the quorum
	// Durable is the newest checkpoint that met the quorum (nil: none yet),
	// with its size.
	Durable     []byte
	DurableSize uint64
	Peers       map[string]PeerProgress
}

// PeerProgress is the newest of this region's checkpoints a peer cosigned.
type PeerProgress struct {
	Size uint64
	At   time.Time // when this region saw it
}

// QuorumOptions configure a Quorum.
type QuorumOptions struct {
	Cosigners *Cosigners
	Peers     []string // every peer's name, for their metrics from the start
	Need      int      // region.quorum: regions, this one included
	Path      string   // where the newest quorum checkpoint is kept (0600)
	Log       *slog.Logger
	Metrics   prometheus.Registerer
}

// NewQuorum loads the kept checkpoint, if any. One that no longer meets
// the quorum under the current peers (a peer removed from config) is set
// aside with a warning rather than trusted.
func NewQuorum(o QuorumOptions) (*Quorum, error) {
	q := &Quorum{cos: o.Cosigners, need: o.Need, path: o.Path, log: o.Log, peers: o.Peers}
	st := &QuorumState{Peers: map[string]PeerProgress{}}
	raw, err := os.ReadFile(o.Path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return nil, fmt.Errorf("quorum checkpoint %s: %w", o.Path, err)
	default:
		size, perr := checkpointSize(raw)
		switch {
		case perr != nil:
			return nil, fmt.Errorf("quorum checkpoint %s: %w", o.Path, perr)
		case 1+q.cos.Counted(q.cos.Of(raw)) < q.need:
			q.log.Warn("region: the kept quorum checkpoint no longer meets region.quorum under the configured peers; receipts are durable again from the next checkpoint that does",
				"path", o.Path, "size", size, "quorum", q.need)
		default:
			st.Durable, st.DurableSize = raw, size
		}
	}
	q.state.Store(st)
	q.size = prometheus.NewGauge(prometheus.GaugeOpts{Name: "knhk_region_checkpoint_size", Help: "Size of this region's latest published checkpoint."})
	q.durable = prometheus.NewGauge(prometheus.GaugeOpts{Name: "knhk_region_durable_size", Help: "Size of this region's newest checkpoint cosigned by region.quorum regions: receipts below it are durable."})
	q.durableLag = prometheus.NewGauge(prometheus.GaugeOpts{Name: "knhk_region_durable_lag_entries", Help: "Receipts in the latest checkpoint not yet in a quorum checkpoint."})
	q.met = prometheus.NewGauge(prometheus.GaugeOpts{Name: "knhk_region_quorum_met", Help: "1 when the latest checkpoint met region.quorum, else 0."})
	q.peerSize = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "knhk_region_peer_cosigned_size", Help: "Size of the newest of this region's checkpoints the peer cosigned."}, []string{"peer"})
	q.peerLag = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "knhk_region_peer_lag_entries", Help: "Entries between this region's latest checkpoint and the newest the peer cosigned."}, []string{"peer"})
	q.peerAt = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "knhk_region_peer_cosigned_timestamp_seconds", Help: "When this region last saw a new cosignature from the peer (0: not since start)."}, []string{"peer"})
	q.delay = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "knhk_region_quorum_delay_seconds",
		Help:    "From a checkpoint size first being published to a checkpoint covering it meeting region.quorum.",
		Buckets: []float64{.01, .025, .05, .1, .2, .3, .5, .75, 1, 1.5, 2, 3, 5, 10, 30, 60, 120, 300, 1800},
	})
	for _, p := range o.Peers {
		q.peerSize.WithLabelValues(p)
		q.peerLag.WithLabelValues(p)
		q.peerAt.WithLabelValues(p)
	}
	q.durable.Set(float64(st.DurableSize))
	if o.Metrics != nil {
		for _, c := range []prometheus.Collector{q.size, q.durable, q.durableLag, q.met, q.peerSize, q.peerLag, q.peerAt, q.delay} {
			if err := o.Metrics.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return q, nil
}

// State is the latest snapshot.
func (q *Quorum) State() *QuorumState { return q.state.Load() }

// gathered is one checkpoint of this region's log with the peer
// cosignatures that came for it after it was published.
type gathered struct {
	text  []byte            // the checkpoint body
	base  []byte            // the published note, read from this region's log
	extra map[string][]byte // peer cosignature lines since, by key name, each verified on its own
}

// note is the published note with the cosignatures gathered since.
func (g *gathered) note() []byte {
	out := append([]byte{}, g.base...)
	names := make([]string, 0, len(g.extra))
	for n := range g.extra {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if !bytes.Contains(g.base, []byte("\n\u2014 "+n+" ")) {
			out = append(out, g.extra[n]...)
		}
	}
	return out
}

// maxGathered is how many recent checkpoints cosignatures add up on: a
// mirror behind by more than that cosigns one the quorum has passed.
const maxGathered = 16

func (q *Quorum) find(text []byte, base []byte) *gathered {
	for _, g := range q.recent {
		if bytes.Equal(g.text, text) {
			return g
		}
	}
	g := &gathered{text: text, base: base, extra: map[string][]byte{}}
	if len(q.recent) == maxGathered {
		q.recent = q.recent[1:]
	}
	q.recent = append(q.recent, g)
	return g
}

// splitNote is a signed note's text and its signature lines, split where
// note.Open splits it: at the last blank line.
func splitNote(n []byte) (text, sigs []byte, ok bool) {
	i := bytes.LastIndex(n, []byte("\n\n"))
	if i < 0 {
		return nil, nil, false
	}
	return n[:i+1], n[i+2:], true
}

// Observe takes this region's latest published checkpoint, as read from
// its own log. A newer one that meets the quorum is kept on disk before
// it is used, so what a reader was told is durable stays so after a
// crash.
func (q *Quorum) Observe(raw []byte, now time.Time) error {
	text, _, ok := splitNote(raw)
	if !ok {
		return errors.New("not a signed checkpoint")
	}
	g := q.find(text, raw)
	g.base = raw // republished, perhaps with more witness cosignatures
	return q.evaluate(g, now)
}

// Cosigned takes a peer's cosignature line on checkpoint, a note read
// from this region's own log. The line is kept only if it verifies, on its
// own, with a pinned peer key: what a peer sends cannot touch the rest.
func (q *Quorum) Cosigned(checkpoint, line []byte, now time.Time) error {
	text, _, ok := splitNote(checkpoint)
	if !ok {
		return errors.New("not a signed checkpoint")
	}
	if bytes.Count(line, []byte("\n")) != 1 || !bytes.HasSuffix(line, []byte("\n")) {
		return errors.New("a cosignature is one line")
	}
	n, err := note.Open(append(append(append([]byte{}, text...), '\n'), line...), note.VerifierList(q.cos.vs...))
	if err != nil || len(n.Sigs) != 1 {
		return fmt.Errorf("a cosignature that no pinned peer key verifies (%d signatures): %w", sigCount(n), err)
	}
	g := q.find(text, checkpoint)
	g.extra[n.Sigs[0].Name] = append([]byte{}, line...)
	return q.evaluate(g, now)
}

func (q *Quorum) evaluate(g *gathered, now time.Time) error {
	raw := g.note()
	size, err := checkpointSize(raw)
	if err != nil {
		return err
	}
	old := q.State()
	durableText, _, _ := splitNote(old.Durable)
	more := size == old.DurableSize && bytes.Equal(durableText, g.text) && len(raw) > len(old.Durable) // the kept one, cosigned by more
	newer := size >= old.Size && !bytes.Equal(raw, q.last)
	if !newer && size <= old.DurableSize && !more {
		return nil // nothing new
	}
	cs := q.cos.Of(raw)
	met := 1+q.cos.Counted(cs) >= q.need
	st := &QuorumState{Size: old.Size, Met: old.Met, Durable: old.Durable, DurableSize: old.DurableSize, Peers: make(map[string]PeerProgress, len(old.Peers))}
	for k, v := range old.Peers {
		st.Peers[k] = v
	}
	if newer {
		// The latest: it sets the lag.
		q.last = raw
		st.Size, st.Met = size, met
		for _, c := range cs {
			if (c.Role == RoleMirror) != q.cos.mirrored[c.Region] {
				continue // a mirroring peer's progress is what it holds
			}
			if p := st.Peers[c.Region]; size > p.Size || p.At.IsZero() {
				st.Peers[c.Region] = PeerProgress{Size: size, At: now}
			}
		}
		if size > 0 && (len(q.pending) == 0 || q.pending[len(q.pending)-1].size < size) {
			if len(q.pending) == maxPending {
				q.pending = q.pending[1:]
			}
			q.pending = append(q.pending, seen{size, now})
		}
	}
	if met && (size > old.DurableSize || more) {
		if err := fsutil.WriteFileAtomic(q.path, raw, 0o600); err != nil {
			// Still report the peers' progress; durability waits for a write.
			st.Met = false
			q.publish(st)
			return fmt.Errorf("quorum checkpoint %s: %w", q.path, err)
		}
		st.Durable, st.DurableSize = raw, size
		n := 0
		for _, p := range q.pending {
			if p.size > size {
				q.pending[n] = p
				n++
				continue
			}
			q.delay.Observe(now.Sub(p.at).Seconds())
		}
		q.pending = q.pending[:n]
	}
	q.publish(st)
	return nil
}

func (q *Quorum) publish(st *QuorumState) {
	q.state.Store(st)
	q.size.Set(float64(st.Size))
	q.durable.Set(float64(st.DurableSize))
	q.durableLag.Set(float64(st.Size - min(st.Size, st.DurableSize)))
	if st.Met {
		q.met.Set(1)
	} else {
		q.met.Set(0)
	}
	for _, name := range q.peers {
		p, ok := st.Peers[name]
		q.peerSize.WithLabelValues(name).Set(float64(p.Size))
		q.peerLag.WithLabelValues(name).Set(float64(st.Size - min(st.Size, p.Size)))
		if ok {
			q.peerAt.WithLabelValues(name).Set(float64(p.At.UnixNano()) / 1e9)
		}
	}
}

// checkpointSize reads a signed checkpoint's size (its second line),
// strictly: digits, no leading zeros.
func checkpointSize(raw []byte) (uint64, error) {
	_, rest, ok := bytes.Cut(raw, []byte("\n"))
	line, _, ok2 := bytes.Cut(rest, []byte("\n"))
	if !ok || !ok2 || len(line) == 0 || (len(line) > 1 && line[0] == '0') {
		return 0, errors.New("not a checkpoint: no size on its second line")
	}
	n, err := strconv.ParseUint(string(line), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("not a checkpoint: size %q", clip(line))
	}
	return n, nil
}

// sigCount is how many signatures a note opened with (0 when it did not).
func sigCount(n *note.Note) int {
	if n == nil {
		return 0
	}
	return len(n.Sigs)
}
