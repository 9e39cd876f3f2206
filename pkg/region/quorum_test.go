package region

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/mod/sumdb/note"
)

// cosigningPeers are peer witness keys for quorum tests.
type cosigningPeers struct {
	names       []string
	signers     []note.Signer
	vkeys       []string
	logKey      string
	logVerifier string
}

func newCosigningPeers(t *testing.T, names ...string) *cosigningPeers {
	t.Helper()
	p := &cosigningPeers{names: names}
	logKey, logVerifier, err := note.GenerateKey(rand.Reader, testOrigin)
	if err != nil {
		t.Fatal(err)
	}
	p.logKey, p.logVerifier = logKey, logVerifier
	for _, n := range names {
		ck, err := LoadOrCreateKey(filepath.Join(t.TempDir(), "witness.key"), n)
		if err != nil {
			t.Fatal(err)
		}
		p.signers = append(p.signers, ck.Signer)
		p.vkeys = append(p.vkeys, ck.Verifier)
	}
	return p
}

// checkpoint signs a checkpoint of size with the log's key, cosigned by
// the peers at the given indexes.
func (p *cosigningPeers) checkpoint(t *testing.T, size uint64, by ...int) []byte {
	t.Helper()
	ls, err := note.NewSigner(p.logKey)
	if err != nil {
		t.Fatal(err)
	}
	signers := []note.Signer{ls}
	for _, i := range by {
		signers = append(signers, p.signers[i])
	}
	root := bytes.Repeat([]byte{byte(size)}, 32)
	text := fmt.Sprintf("%s\n%d\n%s\n", testOrigin, size, base64.StdEncoding.EncodeToString(root))
	b, err := note.Sign(&note.Note{Text: text}, signers...)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// quorum is a Quorum of 2 (this region and one peer) over the given peers.
func (p *cosigningPeers) quorum(t *testing.T, path string, reg prometheus.Registerer, peers ...int) *Quorum {
	return p.quorumWith(t, path, 2, reg, peers...)
}

func (p *cosigningPeers) quorumOf(t *testing.T, path string, need int, peers ...int) *Quorum {
	return p.quorumWith(t, path, need, nil, peers...)
}

func (p *cosigningPeers) quorumWith(t *testing.T, path string, need int, reg prometheus.Registerer, peers ...int) *Quorum {
	t.Helper()
	var keys []PeerKeys
	var names []string
	for _, i := range peers {
		keys, names = append(keys, PeerKeys{Name: p.names[i], Witness: p.vkeys[i]}), append(names, p.names[i])
	}
	cos, err := NewCosigners(keys)
	if err != nil {
		t.Fatal(err)
	}
	q, err := NewQuorum(QuorumOptions{Cosigners: cos, Peers: names, Need: need, Path: path, Log: slog.New(slog.DiscardHandler), Metrics: reg})
	if err != nil {
		t.Fatal(err)
	}
	return q
}

// TestQuorumKeepsTheNewestDurableCheckpoint: the newest checkpoint that
// met the quorum is kept (0600) and survives a restart; a later one that
// missed it does not replace it; lag is per peer.
func TestQuorumKeepsTheNewestDurableCheckpoint(t *testing.T) {
	p := newCosigningPeers(t, "eu-west", "ap-south")
	path := filepath.Join(t.TempDir(), "quorum.checkpoint")
	reg := prometheus.NewRegistry()
	q := p.quorum(t, path, reg, 0, 1)
	now := time.Unix(1000, 0)

	cp5 := p.checkpoint(t, 5, 0)
	if err := q.Observe(cp5, now); err != nil {
		t.Fatal(err)
	}
	st := q.State()
	if !st.Met || st.DurableSize != 5 || !bytes.Equal(st.Durable, cp5) {
		t.Fatalf("after a checkpoint cosigned by one peer of two, quorum 2: %+v", st)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("kept checkpoint: %v %v", fi, err)
	}
	// ap-south never cosigned: its lag is the whole log.
	if got := testutil.ToFloat64(q.peerLag.WithLabelValues("ap-south")); got != 5 {
		t.Fatalf("ap-south lag %v, want 5", got)
	}

	cp9 := p.checkpoint(t, 9) // no peer cosigned
	if err := q.Observe(cp9, now.Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	st = q.State()
	if st.Met || st.Size != 9 || st.DurableSize != 5 || !bytes.Equal(st.Durable, cp5) {
		t.Fatalf("after a checkpoint no peer cosigned: %+v", st)
	}
	if got := testutil.ToFloat64(q.peerLag.WithLabelValues("eu-west")); got != 4 {
		t.Fatalf("eu-west lag %v, want 4", got)
	}
	if got := testutil.ToFloat64(q.durableLag); got != 4 {
		t.Fatalf("durable lag %v, want 4", got)
	}
	// An older read changes nothing.
	if err := q.Observe(p.checkpoint(t, 3, 0, 1), now); err != nil || q.State().Size != 9 {
		t.Fatalf("an older checkpoint moved the state: %v %+v", err, q.State())
	}

	// Restart: still durable up to 5.
	q2 := p.quorum(t, path, nil, 0, 1)
	if st := q2.State(); st.DurableSize != 5 || !bytes.Equal(st.Durable, cp5) {
		t.Fatalf("after a restart: %+v", st)
	}
	// A restart with eu-west no longer a peer does not trust what it cosigned.
	q3 := p.quorum(t, path, nil, 1)
	if st := q3.State(); st.Durable != nil {
		t.Fatalf("a checkpoint cosigned by a removed peer still counts: %+v", st)
	}

	// Size 9 waited 2 s for a quorum checkpoint; 5 and 12 none.
	if err := q.Observe(p.checkpoint(t, 12, 1), now.Add(3*time.Second)); err != nil {
		t.Fatal(err)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "knhk_region_quorum_delay_seconds" {
			h := mf.GetMetric()[0].GetHistogram()
			if h.GetSampleCount() != 3 || h.GetSampleSum() != 2 {
				t.Fatalf("delay histogram: %d samples summing %v s, want 3 summing 2", h.GetSampleCount(), h.GetSampleSum())
			}
		}
	}
	if st := q.State(); st.DurableSize != 12 || !st.Met {
		t.Fatalf("after ap-south cosigned 12: %+v", st)
	}
}

// TestQuorumRefusesJunk: what is not a checkpoint is an error and changes
// nothing; a kept file that is not one stops the start with its path.
func TestQuorumRefusesJunk(t *testing.T) {
	p := newCosigningPeers(t, "eu-west")
	path := filepath.Join(t.TempDir(), "quorum.checkpoint")
	q := p.quorum(t, path, nil, 0)
	for _, junk := range []string{"", "origin", "origin\n", "origin\n007\n", "origin\n-1\n", "origin\n99999999999999999999\n"} {
		if err := q.Observe([]byte(junk), time.Now()); err == nil {
			t.Fatalf("%q observed", junk)
		}
	}
	if st := q.State(); st.Size != 0 || st.Durable != nil {
		t.Fatalf("junk moved the state: %+v", st)
	}
	if err := os.WriteFile(path, []byte("junk"), 0o600); err != nil {
		t.Fatal(err)
	}
	cos, _ := NewCosigners([]PeerKeys{{Name: p.names[0], Witness: p.vkeys[0]}})
	if _, err := NewQuorum(QuorumOptions{Cosigners: cos, Need: 2, Path: path, Log: slog.New(slog.DiscardHandler)}); err == nil || !strings.Contains(err.Error(), path) {
		t.Fatalf("a junk kept checkpoint: %v", err)
	}
}

// TestQuorumPendingIsBounded: a long partition does not grow the delay
// bookkeeping without end.
func TestQuorumPendingIsBounded(t *testing.T) {
	p := newCosigningPeers(t, "eu-west")
	q := p.quorum(t, filepath.Join(t.TempDir(), "q"), nil, 0)
	for size := uint64(1); size <= maxPending+50; size++ {
		if err := q.Observe(p.checkpoint(t, size), time.Now()); err != nil {
			t.Fatal(err)
		}
	}
	if len(q.pending) != maxPending {
		t.Fatalf("%d pending, want %d", len(q.pending), maxPending)
	}
}

// lineOf is the last signature line of a signed note.
func lineOf(t *testing.T, n []byte) []byte {
	t.Helper()
	_, sigs, ok := splitNote(n)
	lines := bytes.SplitAfter(sigs, []byte("\n"))
	if !ok || len(lines) < 2 {
		t.Fatalf("no signature lines in %q", n)
	}
	return lines[len(lines)-2]
}

// TestQuorumAddsUpCosignatures: peer cosignatures that arrive apart, on
// the same checkpoint, add up in the checkpoint kept, even once newer
// ones are out; at quorum 3 too, where one alone is not enough.
func TestQuorumAddsUpCosignatures(t *testing.T) {
	p := newCosigningPeers(t, "eu-west", "ap-south")
	for _, need := range []int{2, 3} {
		q := p.quorumOf(t, filepath.Join(t.TempDir(), "q"), need, 0, 1)
		now := time.Now()
		cp5 := p.checkpoint(t, 5)
		steps := []func() error{
			func() error { return q.Observe(cp5, now) },
			func() error { return q.Cosigned(cp5, lineOf(t, p.checkpoint(t, 5, 0)), now) },
			func() error { return q.Observe(p.checkpoint(t, 7), now) },
			func() error { return q.Observe(p.checkpoint(t, 9), now) },
			func() error { return q.Cosigned(cp5, lineOf(t, p.checkpoint(t, 5, 1)), now) },
		}
		for _, f := range steps {
			if err := f(); err != nil {
				t.Fatal(err)
			}
		}
		st := q.State()
		if st.Size != 9 || st.DurableSize != 5 {
			t.Fatalf("quorum %d: %+v", need, st)
		}
		if cs := q.cos.Of(st.Durable); len(cs) != 2 {
			t.Fatalf("quorum %d: the kept checkpoint has %d cosignatures, want both peers':\n%s", need, len(cs), st.Durable)
		}
		lv, _ := note.NewVerifier(p.logVerifier)
		if _, err := note.Open(st.Durable, note.VerifierList(lv)); err != nil {
			t.Fatalf("quorum %d: the kept checkpoint does not open with the log's key: %v", need, err)
		}
	}
}

// TestQuorumKeepsOnlyVerifiedCosignatures: what a peer sends back cannot
// reach the checkpoint kept unless it is one line that a pinned peer key
// verifies: a blank line, a forged line under a peer's name, or many
// lines are refused, and the real cosignature still counts after them.
func TestQuorumKeepsOnlyVerifiedCosignatures(t *testing.T) {
	p := newCosigningPeers(t, "eu-west", "ap-south")
	q := p.quorumOf(t, filepath.Join(t.TempDir(), "q"), 3, 0, 1)
	now := time.Now()
	cp := p.checkpoint(t, 5)
	if err := q.Observe(cp, now); err != nil {
		t.Fatal(err)
	}
	good0, good1 := lineOf(t, p.checkpoint(t, 5, 0)), lineOf(t, p.checkpoint(t, 5, 1))
	forged := append([]byte{}, good1...)
	forged[len(forged)-3] ^= 1 // ap-south's name and key hash, a bad signature
	for name, line := range map[string][]byte{
		"a blank line first": append([]byte("\n"), good0...),
		"two lines":          append(append([]byte{}, good0...), good1...),
		"a forged signature": forged,
		"no newline":         good0[:len(good0)-1],
		"another checkpoint": lineOf(t, p.checkpoint(t, 6, 0)),
		"the log's own line": lineOf(t, cp),
	} {
		if err := q.Cosigned(cp, line, now); err == nil {
			t.Fatalf("%s: kept", name)
		}
	}
	if st := q.State(); st.Durable != nil {
		t.Fatalf("refused lines made a checkpoint durable: %+v", st)
	}
	for _, l := range [][]byte{good0, good1} {
		if err := q.Cosigned(cp, l, now); err != nil {
			t.Fatal(err)
		}
	}
	if st := q.State(); st.DurableSize != 5 {
		t.Fatalf("both real cosignatures: %+v", st)
	}
}
