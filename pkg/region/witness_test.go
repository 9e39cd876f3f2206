package region

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	fnote "github.com/transparency-dev/formats/note"
	"github.com/transparency-dev/tessera"
	"github.com/transparency-dev/tessera/client"
	"github.com/transparency-dev/tessera/storage/posix"
	"golang.org/x/mod/sumdb/note"
)

const testOrigin = "example.com/plain-tessera"

// plainLog is a log written by tessera alone, not by knhk: the interop
// case of a knhk witness cosigning any C2SP log.
type plainLog struct {
	t      testing.TB
	add    func(context.Context, *tessera.Entry) tessera.IndexFuture
	reader tessera.LogReader
	vkey   string
	skey   string
	n      uint64
}

func newPlainLog(t testing.TB) *plainLog {
	t.Helper()
	skey, vkey, err := note.GenerateKey(rand.Reader, testOrigin)
	if err != nil {
		t.Fatal(err)
	}
	signer, err := note.NewSigner(skey)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	driver, err := posix.New(ctx, posix.Config{Path: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	app, shutdown, reader, err := tessera.NewAppender(ctx, driver, tessera.NewAppendOptions().
		WithCheckpointSigner(signer).WithBatching(64, 10*time.Millisecond).WithCheckpointInterval(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = shutdown(context.Background()); cancel() })
	return &plainLog{t: t, add: app.Add, reader: reader, vkey: vkey, skey: skey}
}

// grow appends n entries and returns the first checkpoint that covers them.
func (l *plainLog) grow(n int) []byte {
	l.t.Helper()
	ctx := context.Background()
	futures := make([]tessera.IndexFuture, 0, n)
	for range n { // queued together, so they share batches
		futures = append(futures, l.add(ctx, tessera.NewEntry(fmt.Appendf(nil, "entry %d", l.n))))
		l.n++
	}
	for _, f := range futures {
		if _, err := f(); err != nil {
			l.t.Fatal(err)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		raw, err := l.reader.ReadCheckpoint(ctx)
		if err == nil {
			if size, err := checkpointSize(raw); err == nil && size == l.n {
				return raw
			}
		}
		time.Sleep(10 * time.Millisecond) // polling tessera's checkpoint file, with a deadline
	}
	l.t.Fatalf("no checkpoint of size %d within 10 s", l.n)
	return nil
}

func (l *plainLog) consistency(from, to uint64) [][]byte {
	l.t.Helper()
	pb, err := client.NewProofBuilder(context.Background(), to, l.reader.ReadTile)
	if err != nil {
		l.t.Fatal(err)
	}
	p, err := pb.ConsistencyProof(context.Background(), from, to)
	if err != nil {
		l.t.Fatal(err)
	}
	return p
}

func body(old uint64, proof [][]byte, cp []byte) []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "old %d\n", old)
	for _, h := range proof {
		b.WriteString(base64.StdEncoding.EncodeToString(h) + "\n")
	}
	b.WriteString("\n")
	b.Write(cp)
	return b.Bytes()
}

type testWitness struct {
	*Witness
	reg    *prometheus.Registry
	cosign *Cosigner
	path   string
}

func newTestWitness(t testing.TB, logs []string, dir string) *testWitness {
	t.Helper()
	c, err := LoadOrCreateKey(filepath.Join(dir, "witness.key"), "us-east")
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	path := filepath.Join(dir, "witness.db")
	w, err := NewWitness(context.Background(), WitnessOptions{Key: c, Logs: logs, Path: path, Metrics: reg})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = w.Close() })
	return &testWitness{w, reg, c, path}
}

// TestWitnessCosignsAPlainTesseraLog: the spec's answers, against a log
// knhk did not write, and cosignatures a C2SP verifier other than knhk's
// (formats' cosignature/v1 verifier through x/mod's note) accepts.
func TestWitnessCosignsAPlainTesseraLog(t *testing.T) {
	l := newPlainLog(t)
	// The log's key rotated: an older key for the same origin is pinned
	// first, and checkpoints signed by the newer one still cosign.
	_, older, _ := note.GenerateKey(rand.Reader, testOrigin)
	w := newTestWitness(t, []string{older, l.vkey}, t.TempDir())
	ctx := context.Background()

	cp5 := l.grow(5)
	o := w.AddCheckpoint(ctx, body(0, nil, cp5))
	if o.Status != 200 {
		t.Fatalf("first checkpoint: %d %s", o.Status, o.Body)
	}
	cv, err := fnote.NewVerifierForCosignatureV1(w.cosign.Verifier)
	if err != nil {
		t.Fatal(err)
	}
	logV, _ := fnote.NewVerifier(l.vkey)
	n, err := note.Open(append(bytes.Clone(cp5), o.Body...), note.VerifierList(logV, cv))
	if err != nil {
		t.Fatalf("cosigned checkpoint does not verify: %v\n%s%s", err, cp5, o.Body)
	}
	if len(n.Sigs) != 2 {
		t.Fatalf("want the log's signature and the cosignature, got %d", len(n.Sigs))
	}

	cp12 := l.grow(7)
	if o := w.AddCheckpoint(ctx, body(5, l.consistency(5, 12), cp12)); o.Status != 200 {
		t.Fatalf("consistent growth: %d %s", o.Status, o.Body)
	}
	// Stale: the old size is not the one last cosigned.
	if o := w.AddCheckpoint(ctx, body(5, l.consistency(5, 12), cp12)); o.Status != 409 || string(o.Body) != "12\n" || o.ContentType != "text/x.tlog.size" {
		t.Fatalf("stale old size: %d %q %q", o.Status, o.Body, o.ContentType)
	}
	// Old size above the checkpoint's size.
	if o := w.AddCheckpoint(ctx, body(13, nil, cp12)); o.Status != 400 {
		t.Fatalf("old > new: %d %s", o.Status, o.Body)
	}
	// A bad proof.
	cp20 := l.grow(8)
	bad := l.consistency(12, 20)
	bad[0][0] ^= 1
	if o := w.AddCheckpoint(ctx, body(12, bad, cp20)); o.Status != 422 {
		t.Fatalf("bad proof: %d %s", o.Status, o.Body)
	}
	// Unknown origin.
	skey, _, _ := note.GenerateKey(rand.Reader, "other.example/log")
	other := signCheckpoint(t, skey, "other.example/log", 1, make([]byte, 32))
	if o := w.AddCheckpoint(ctx, body(0, nil, other)); o.Status != 404 {
		t.Fatalf("unknown origin: %d %s", o.Status, o.Body)
	}
	if got := testutil.ToFloat64(w.results.WithLabelValues("cosigned")); got != 2 {
		t.Fatalf("cosigned count %v, want 2", got)
	}
}

// signCheckpoint makes a C2SP checkpoint body signed by skey.
func signCheckpoint(t *testing.T, skey, origin string, size uint64, root []byte) []byte {
	t.Helper()
	s, err := note.NewSigner(skey)
	if err != nil {
		t.Fatal(err)
	}
	text := fmt.Sprintf("%s\n%d\n%s\n", origin, size, base64.StdEncoding.EncodeToString(root))
	b, err := note.Sign(&note.Note{Text: text}, s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestForgedAndInconsistentCheckpointsAreEvidence: a checkpoint no pinned
// key signed is 403, one that rewrites history is 422; both are kept,
// counted, and leave the cosigned state as it was.
func TestForgedAndInconsistentCheckpointsAreEvidence(t *testing.T) {
	l := newPlainLog(t)
	w := newTestWitness(t, []string{l.vkey}, t.TempDir())
	ctx := context.Background()
	cp3 := l.grow(3)
	if o := w.AddCheckpoint(ctx, body(0, nil, cp3)); o.Status != 200 {
		t.Fatalf("%d %s", o.Status, o.Body)
	}
	// Same origin, another key: a forgery.
	forger, _, _ := note.GenerateKey(rand.Reader, testOrigin)
	forged := signCheckpoint(t, forger, testOrigin, 9, bytes.Repeat([]byte{7}, 32))
	if o := w.AddCheckpoint(ctx, body(3, nil, forged)); o.Status != 403 {
		t.Fatalf("forged: %d %s", o.Status, o.Body)
	}
	// The real key, the same size, another root: rewritten history, which
	// the spec answers 409 without the size content type.
	rewritten := signCheckpoint(t, l.skey, testOrigin, 3, bytes.Repeat([]byte{9}, 32))
	if o := w.AddCheckpoint(ctx, body(3, nil, rewritten)); o.Status != 409 || o.ContentType == "text/x.tlog.size" {
		t.Fatalf("rewritten history: %d %q %s", o.Status, o.ContentType, o.Body)
	}
	ev, err := w.Evidence()
	if err != nil {
		t.Fatal(err)
	}
	kinds := map[string]Evidence{}
	for _, e := range ev {
		kinds[e.Kind] = e
	}
	if len(ev) != 2 || kinds[KindUnknownKey].Checkpoint != string(forged) || !strings.HasPrefix(kinds[KindRootMismatch].Cosigned, string(cp3)) ||
		kinds[KindRootMismatch].Checkpoint != string(rewritten) {
		t.Fatalf("evidence = %+v", ev)
	}
	if got := testutil.ToFloat64(w.refused.WithLabelValues(testOrigin, KindRootMismatch)); got != 1 {
		t.Fatalf("knhk_region_inconsistency_total{kind=root_mismatch} = %v", got)
	}
	if latest, _ := w.Latest(ctx, testOrigin); !bytes.Equal(latest[:len(cp3)], cp3) {
		t.Fatalf("the cosigned state moved:\n%s", latest)
	}
	// Growth from what was really cosigned still works.
	cp6 := l.grow(3)
	if o := w.AddCheckpoint(ctx, body(3, l.consistency(3, 6), cp6)); o.Status != 200 {
		t.Fatalf("after refusals: %d %s", o.Status, o.Body)
	}
}

// TestWitnessStateSurvivesRestart: what was cosigned is durable, so a
// restarted witness never cosigns an older size.
func TestWitnessStateSurvivesRestart(t *testing.T) {
	l := newPlainLog(t)
	dir := t.TempDir()
	logs := []string{l.vkey}
	w := newTestWitness(t, logs, dir)
	ctx := context.Background()
	cp4 := l.grow(4)
	if o := w.AddCheckpoint(ctx, body(0, nil, cp4)); o.Status != 200 {
		t.Fatalf("%d %s", o.Status, o.Body)
	}
	key := w.cosign.Verifier
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	w2 := newTestWitness(t, logs, dir)
	if w2.cosign.Verifier != key {
		t.Fatal("the witness key changed across a restart")
	}
	if o := w2.AddCheckpoint(ctx, body(0, nil, cp4)); o.Status != 409 || string(o.Body) != "4\n" {
		t.Fatalf("after restart, old size 0: %d %q (want 409 4)", o.Status, o.Body)
	}
}

func TestWitnessKeyFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "witness.key")
	c, err := LoadOrCreateKey(path, "us-east")
	if err != nil {
		t.Fatal(err)
	}
	if !c.Created {
		t.Fatal("a new key is not marked as never bound")
	}
	if err := c.commit(); err != nil {
		t.Fatal(err)
	}
	fi, _ := os.Stat(path)
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode %04o", fi.Mode().Perm())
	}
	if !strings.HasPrefix(c.Verifier, "us-east+") {
		t.Fatalf("verifier key %q", c.Verifier)
	}
	if _, err := fnote.NewVerifierForCosignatureV1(c.Verifier); err != nil {
		t.Fatalf("verifier key is not a cosignature/v1 vkey: %v", err)
	}
	if _, err := LoadOrCreateKey(path, "eu-west"); err == nil || !strings.Contains(err.Error(), "region.name") {
		t.Fatalf("a key named for another region: %v", err)
	}
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadOrCreateKey(path, "us-east"); err == nil || !strings.Contains(err.Error(), "0600") {
		t.Fatalf("a world-readable key: %v", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		t.Fatal(err)
	}
	// A damaged key (its last character cut) is refused without echoing
	// what it holds.
	skey, _ := os.ReadFile(path)
	secret := strings.TrimSpace(string(skey))
	damaged := secret[:len(secret)-1]
	if err := os.WriteFile(path, []byte(damaged+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = LoadOrCreateKey(path, "us-east")
	material := strings.SplitN(damaged, "+", 5)[4] // the base64 key itself
	if err == nil || strings.Contains(err.Error(), material[:16]) {
		t.Fatalf("damaged key file: %v", err)
	}
	if err := os.Symlink(path, path+".link"); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadOrCreateKey(path+".link", "us-east"); err == nil {
		t.Fatal("a symlinked key file was read")
	}
}

// TestHandlerRefusesBadInput: wrong method, oversized and unparsable
// bodies get a 4xx with a message, and the state is unchanged.
func TestHandlerRefusesBadInput(t *testing.T) {
	l := newPlainLog(t)
	w := newTestWitness(t, []string{l.vkey}, t.TempDir())
	cp2 := l.grow(2)
	h := w.Handler()
	post := func(b []byte) *httptest.ResponseRecorder {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/add-checkpoint", bytes.NewReader(b)))
		return rec
	}
	if r := post(body(0, nil, cp2)); r.Code != 200 {
		t.Fatalf("%d %s", r.Code, r.Body)
	}
	full := body(2, nil, cp2)
	for name, c := range map[string]struct {
		b    []byte
		want int
	}{
		"10 MB":                  {bytes.Repeat([]byte("a"), 10<<20), 413},
		"truncated in the sig":   {full[:len(full)-10], 400},
		"truncated to an origin": {full[:8], 404},
		"no checkpoint":          {[]byte("old 2\n\n"), 400},
		"bad size":               {append([]byte("old -1\n\n"), cp2...), 400},
		"bad proof line":         {append([]byte("old 2\nnot-base64!\n\n"), cp2...), 400},
		"replay of the first":    {body(0, nil, cp2), 409},
	} {
		r := post(c.b)
		if r.Code != c.want || r.Body.Len() == 0 {
			t.Errorf("%s: %d %q, want %d with a message", name, r.Code, r.Body, c.want)
		}
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/add-checkpoint", nil))
	if rec.Code != http.StatusMethodNotAllowed {
		t.Fatalf("GET: %d", rec.Code)
	}
	if latest, _ := w.Latest(context.Background(), testOrigin); !bytes.HasPrefix(latest, cp2) {
		t.Fatalf("bad input moved the state:\n%s", latest)
	}
}

// TestFirstContactKeepsTheSizeRules: the rules that do not depend on what
// was cosigned hold for a log the witness has never seen (the library's
// trust on first use skips them).
func TestFirstContactKeepsTheSizeRules(t *testing.T) {
	l := newPlainLog(t)
	w := newTestWitness(t, []string{l.vkey}, t.TempDir())
	ctx := context.Background()
	cp5 := l.grow(5)
	if o := w.AddCheckpoint(ctx, body(3, l.consistency(3, 5), cp5)); o.Status != 409 || string(o.Body) != "0\n" || o.ContentType != "text/x.tlog.size" {
		t.Fatalf("old 3 to a witness that cosigned nothing: %d %q %q, want 409 0", o.Status, o.Body, o.ContentType)
	}
	if o := w.AddCheckpoint(ctx, body(10, nil, cp5)); o.Status != 400 {
		t.Fatalf("old 10 > size 5: %d %s", o.Status, o.Body)
	}
	if o := w.AddCheckpoint(ctx, body(0, [][]byte{make([]byte, 32)}, cp5)); o.Status != 400 {
		t.Fatalf("old 0 with a proof: %d %s", o.Status, o.Body)
	}
	if latest, _ := w.Latest(ctx, testOrigin); latest != nil {
		t.Fatalf("a refused first contact was stored:\n%s", latest)
	}
	// Signed by the pinned key, but not a strict checkpoint: refused with
	// 400 before the library could store it.
	signer, err := note.NewSigner(l.skey)
	if err != nil {
		t.Fatal(err)
	}
	for name, text := range map[string]string{
		"size 07":    fmt.Sprintf("%s\n07\n%s\n", testOrigin, base64.StdEncoding.EncodeToString(make([]byte, 32))),
		"short root": fmt.Sprintf("%s\n7\n%s\n", testOrigin, base64.StdEncoding.EncodeToString([]byte{1, 2, 3})),
	} {
		signed, err := note.Sign(&note.Note{Text: text}, signer)
		if err != nil {
			t.Fatal(err)
		}
		if o := w.AddCheckpoint(ctx, body(0, nil, signed)); o.Status != 400 {
			t.Errorf("%s: %d %s", name, o.Status, o.Body)
		}
	}
	if o := w.AddCheckpoint(ctx, body(0, nil, cp5)); o.Status != 200 {
		t.Fatalf("then the real first checkpoint: %d %s", o.Status, o.Body)
	}
}

// TestStateIsBoundToTheKey: a witness whose state is lost but whose key
// is kept would trust the next checkpoint on first use again, and could
// cosign a fork under the same identity; it refuses to start instead.
func TestStateIsBoundToTheKey(t *testing.T) {
	l := newPlainLog(t)
	dir := t.TempDir()
	w := newTestWitness(t, []string{l.vkey}, dir)
	if o := w.AddCheckpoint(context.Background(), body(0, nil, l.grow(2))); o.Status != 200 {
		t.Fatalf("%d %s", o.Status, o.Body)
	}
	_ = w.Close()
	if err := os.Remove(w.path); err != nil {
		t.Fatal(err)
	}
	c, err := LoadOrCreateKey(filepath.Join(dir, "witness.key"), "us-east")
	if err != nil {
		t.Fatal(err)
	}
	_, err = NewWitness(context.Background(), WitnessOptions{Key: c, Logs: []string{l.vkey}, Path: w.path})
	if err == nil || !strings.Contains(err.Error(), "restore witness.db") {
		t.Fatalf("a kept key with lost state: %v", err)
	}
	// Nor does a state made for another key open.
	other := t.TempDir()
	c2, err := LoadOrCreateKey(filepath.Join(other, "witness.key"), "us-east")
	if err != nil {
		t.Fatal(err)
	}
	w2, err := NewWitness(context.Background(), WitnessOptions{Key: c2, Path: filepath.Join(other, "witness.db")})
	if err != nil {
		t.Fatal(err)
	}
	_ = w2.Close()
	_, err = NewWitness(context.Background(), WitnessOptions{Key: c, Path: filepath.Join(other, "witness.db")})
	if err == nil || !strings.Contains(err.Error(), "made for the witness key") {
		t.Fatalf("a state made for another key: %v", err)
	}
}

// TestEvidenceIsBoundedPerKind: junk of one kind cannot push out another
// kind, nor rewritten history at all; rewritten history keeps its first
// records.
func TestEvidenceIsBoundedPerKind(t *testing.T) {
	st, err := openStore(filepath.Join(t.TempDir(), "w.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if err := st.Init(context.Background()); err != nil {
		t.Fatal(err)
	}
	for i := range maxRootMismatch + 20 {
		if err := st.addEvidence(KindRootMismatch, fmt.Appendf(nil, `"keep %d"`, i)); err != nil {
			t.Fatal(err)
		}
	}
	for i := range maxEvidence + 50 {
		if err := st.addEvidence(KindUnknownKey, fmt.Appendf(nil, "%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	ev, err := st.evidence()
	if err != nil {
		t.Fatal(err)
	}
	// The first root mismatches are kept (later ones only counted), then
	// the newest unknown-key records.
	if len(ev) != maxRootMismatch+maxEvidence || string(ev[0]) != `"keep 0"` || string(ev[maxRootMismatch-1]) != fmt.Sprintf(`"keep %d"`, maxRootMismatch-1) ||
		string(ev[maxRootMismatch]) != "50" || string(ev[len(ev)-1]) != fmt.Sprint(maxEvidence+49) {
		t.Fatalf("%d entries, first %q, at %d %q, last %q", len(ev), ev[0], maxRootMismatch, ev[maxRootMismatch], ev[len(ev)-1])
	}
}

// TestKeyMadeButNeverBoundIsAdopted: a crash between making the witness
// key and binding it to a state leaves a key that never signed; the next
// start binds it rather than refusing to start.
func TestKeyMadeButNeverBoundIsAdopted(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "witness.key")
	c, err := LoadOrCreateKey(path, "us-east") // then "crash": no NewWitness
	if err != nil {
		t.Fatal(err)
	}
	again, err := LoadOrCreateKey(path, "us-east")
	if err != nil {
		t.Fatal(err)
	}
	if again.Verifier != c.Verifier || !again.Created {
		t.Fatalf("the pending key was not picked up: %q created=%v", again.Verifier, again.Created)
	}
	w, err := NewWitness(context.Background(), WitnessOptions{Key: again, Path: filepath.Join(dir, "witness.db")})
	if err != nil {
		t.Fatalf("a never-bound key was refused: %v", err)
	}
	_ = w.Close()
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("the bound key is not at its path: %v", err)
	}
	if _, err := os.Stat(path + pendingSuffix); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("the pending key is still there: %v", err)
	}
	bound, err := LoadOrCreateKey(path, "us-east")
	if err != nil || bound.Created || bound.Verifier != c.Verifier {
		t.Fatalf("after binding: %+v %v", bound, err)
	}
}
