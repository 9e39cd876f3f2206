package region

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/binary"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	fnote "github.com/transparency-dev/formats/note"
	"github.com/transparency-dev/merkle/rfc6962"
	"github.com/transparency-dev/tessera/client"
	"golang.org/x/mod/sumdb/note"

	"github.com/knhk/knhk/pkg/receipt"
)

type testMirror struct {
	*Mirror
	w   *testWitness
	l   *plainLog
	key *Cosigner
}

// newTestMirror is a witness and mirror of a plain tessera log.
func newTestMirror(t testing.TB) *testMirror {
	t.Helper()
	l := newPlainLog(t)
	dir := t.TempDir()
	w := newTestWitness(t, []string{l.vkey}, dir)
	key, err := LoadOrCreateKey(filepath.Join(dir, "mirror.key"), "us-east"+MirrorSuffix)
	if err != nil {
		t.Fatal(err)
	}
	m, err := NewMirror(MirrorOptions{Key: key, Path: filepath.Join(dir, "mirror.db"), Witness: w.Witness, Log: discard(), Metrics: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Close() })
	w.AttachMirror(m)
	return &testMirror{m, w, l, key}
}

// witnessed grows the log by n and has the witness cosign the checkpoint.
func (m *testMirror) witnessed(t testing.TB, from uint64, n int) []byte {
	t.Helper()
	cp := m.l.grow(n)
	var p [][]byte
	if from > 0 {
		p = m.l.consistency(from, m.l.n)
	}
	if o := m.w.AddCheckpoint(context.Background(), body(from, p, cp)); o.Status != 200 {
		t.Fatalf("add-checkpoint: %d %s", o.Status, o.Body)
	}
	return cp
}

func (m *testMirror) entries(t testing.TB, from, to uint64) [][]byte {
	t.Helper()
	var out [][]byte
	for i := from; i < to; {
		bi := i / 256
		b, err := client.GetEntryBundle(context.Background(), m.l.reader.ReadEntryBundle, bi, m.l.n)
		if err != nil {
			t.Fatal(err)
		}
		for j, e := range b.Entries {
			if idx := bi*256 + uint64(j); idx >= i && idx < to {
				out = append(out, e)
			}
		}
		i = (bi + 1) * 256
	}
	return out
}

// upload is an add-entries body for [start, end), built by the pusher's
// own encoder; tamper may change an entry first.
func (m *testMirror) upload(t testing.TB, start, end uint64, tamper func(i uint64, e []byte) []byte) []byte {
	t.Helper()
	b, err := AddEntriesBody(testOrigin, start, end,
		func(from, to uint64) ([][]byte, error) {
			es := m.entries(t, from, to)
			if tamper != nil {
				for i := range es {
					es[i] = tamper(from+uint64(i), es[i])
				}
			}
			return es, nil
		},
		func(at uint64) ([][]byte, error) {
			if at == end {
				return nil, nil
			}
			return m.l.consistency(at, end), nil
		})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func (m *testMirror) held(t testing.TB) uint64 {
	t.Helper()
	st, err := m.state(testOrigin)
	if err != nil {
		t.Fatal(err)
	}
	return st.Next
}

// TestMirrorHoldsEntriesThenCosigns: entries checked against the
// checkpoint the witness cosigned are stored, and only once all are held
// does the mirror cosign, with a cosignature a C2SP verifier accepts; a
// replay stores nothing twice; a later upload continues from there.
func TestMirrorHoldsEntriesThenCosigns(t *testing.T) {
	m := newTestMirror(t)
	cp := m.witnessed(t, 0, 600)
	o := m.AddEntries(context.Background(), bytes.NewReader(m.upload(t, 0, 600, nil)))
	if o.Status != 200 {
		t.Fatalf("add-entries: %d %s", o.Status, o.Body)
	}
	v, _ := fnote.NewVerifierForCosignatureV1(m.key.Verifier)
	if _, err := note.Open(append(append([]byte{}, cp...), o.Body...), note.VerifierList(v)); err != nil {
		t.Fatalf("the mirror's cosignature does not verify: %v\n%s", err, o.Body)
	}
	want := m.entries(t, 0, 600)
	for i, w := range want {
		if got, _ := m.Entry(testOrigin, uint64(i)); !bytes.Equal(got, w) {
			t.Fatalf("entry %d: %q, want %q", i, got, w)
		}
	}
	// A replay: 200 again, nothing new.
	if o := m.AddEntries(context.Background(), bytes.NewReader(m.upload(t, 0, 600, nil))); o.Status != 200 || m.held(t) != 600 {
		t.Fatalf("replay: %d %s, holds %d", o.Status, o.Body, m.held(t))
	}
	// The log grows; the next upload starts where the mirror is.
	m.witnessed(t, 600, 100)
	if o := m.AddEntries(context.Background(), bytes.NewReader(m.upload(t, 600, 700, nil))); o.Status != 200 || m.held(t) != 700 {
		t.Fatalf("growth: %d %s, holds %d", o.Status, o.Body, m.held(t))
	}
	logs, err := m.Logs()
	if err != nil || len(logs) != 1 || logs[0].Size != 700 || !strings.Contains(logs[0].Checkpoint, "us-east-mirror") {
		t.Fatalf("logs: %+v %v", logs, err)
	}
	root, _ := checkpointRoot(strings.SplitN(logs[0].Checkpoint, "\n\n", 2)[0] + "\n")
	if !bytes.Equal(root, logs[0].Root) {
		t.Fatalf("the held entries' root %x is not the checkpoint's %x", logs[0].Root, root)
	}
}

// TestMirrorRefusesBadUploads: each bad upload gets its status and a
// message, and what is stored is only what was checked.
func TestMirrorRefusesBadUploads(t *testing.T) {
	m := newTestMirror(t)
	m.witnessed(t, 0, 600)
	ctx := context.Background()
	status := func(body []byte) (int, string) {
		o := m.AddEntries(ctx, bytes.NewReader(body))
		return o.Status, string(o.Body)
	}
	// A changed entry in the second package: the first is kept (422 ends
	// processing there).
	bad := m.upload(t, 0, 600, func(i uint64, e []byte) []byte {
		if i == 300 {
			return []byte("forged")
		}
		return e
	})
	if c, msg := status(bad); c != 422 || !strings.Contains(msg, "[256, 512)") || m.held(t) != 256 {
		t.Fatalf("a forged entry: %d %q, holds %d", c, msg, m.held(t))
	}
	if got, _ := m.Entry(testOrigin, 300); got != nil {
		t.Fatalf("the forged entry was stored: %q", got)
	}
	// upload_end that is no pending checkpoint: 409 with mirror-info.
	o := m.AddEntries(ctx, bytes.NewReader(m.upload(t, 256, 500, nil)))
	info, err := ParseMirrorInfo(o.Body)
	if o.Status != 409 || err != nil || info.Next != 256 || info.Pending != 600 || o.ContentType != "text/x.tlog.mirror-info" {
		t.Fatalf("a size not pending: %d %q %+v %v", o.Status, o.Body, info, err)
	}
	// upload_start past the next entry needed: 409.
	if c, _ := status(m.upload(t, 512, 600, nil)); c != 409 {
		t.Fatalf("a gap: %d", c)
	}
	// Cut off inside the third package: the second is kept (202).
	full := m.upload(t, 256, 600, nil)
	o = m.AddEntries(ctx, bytes.NewReader(full[:len(full)-40]))
	if info, err := ParseMirrorInfo(o.Body); o.Status != 202 || err != nil || info.Next != 512 || m.held(t) != 512 {
		t.Fatalf("a cut upload: %d %q %v, holds %d", o.Status, o.Body, err, m.held(t))
	}
	// Bad headers and origins.
	for name, b := range map[string][]byte{
		"empty":          {},
		"short origin":   {0, 9, 'a'},
		"start past end": header(testOrigin, 5, 4),
	} {
		if c, msg := status(b); c != 400 || msg == "" {
			t.Fatalf("%s: %d %q", name, c, msg)
		}
	}
	if c, _ := status(header("other.example/log", 0, 0)); c != 404 {
		t.Fatalf("unknown origin: %d", c)
	}
	// An entry length past the body: 400, nothing stored.
	b := append(header(testOrigin, 512, 600), 0xff, 0xff, 'x')
	if c, _ := status(b); c != 400 || m.held(t) != 512 {
		t.Fatalf("a truncated entry: %d, holds %d", c, m.held(t))
	}
	// The rest, gzip-compressed through the handler: 200.
	srv := httptest.NewServer(m.w.Handler())
	defer srv.Close()
	var z bytes.Buffer
	zw := gzip.NewWriter(&z)
	_, _ = zw.Write(m.upload(t, 512, 600, nil))
	_ = zw.Close()
	req, _ := http.NewRequest(http.MethodPost, srv.URL+"/add-entries", &z)
	req.Header.Set("Content-Encoding", "gzip")
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 200 || m.held(t) != 600 {
		t.Fatalf("gzip upload: %v %v, holds %d", resp, err, m.held(t))
	}
	_ = resp.Body.Close()
}

func header(origin string, start, end uint64) []byte {
	b := binary.BigEndian.AppendUint16(nil, uint16(len(origin)))
	b = append(b, origin...)
	b = binary.BigEndian.AppendUint64(b, start)
	b = binary.BigEndian.AppendUint64(b, end)
	return binary.BigEndian.AppendUint16(b, 0)
}

// TestMirrorStateIsBoundToItsKey: a mirror.db made for one key refuses
// another.
func TestMirrorStateIsBoundToItsKey(t *testing.T) {
	m := newTestMirror(t)
	path := m.db.Path()
	_ = m.Close()
	other, err := LoadOrCreateKey(filepath.Join(t.TempDir(), "k"), "us-east"+MirrorSuffix)
	if err != nil {
		t.Fatal(err)
	}
	other.Created = false // as if it had been in use
	if _, err := NewMirror(MirrorOptions{Key: other, Path: path, Witness: m.w.Witness, Log: discard()}); err == nil || !strings.Contains(err.Error(), "made for key") {
		t.Fatalf("another key: %v", err)
	}
}

// FuzzAddEntries: no input panics the mirror, and nothing but a valid
// upload moves what it holds.
func FuzzAddEntries(f *testing.F) {
	f.Add(header(testOrigin, 0, 0))
	f.Add(append(header(testOrigin, 0, 3), 0, 1, 'a', 0))
	f.Add([]byte{0, 1})
	m := newTestMirror(f)
	m.witnessed(f, 0, 3)
	f.Fuzz(func(t *testing.T, b []byte) {
		o := m.AddEntries(context.Background(), bytes.NewReader(b))
		if o.Status == 0 || len(o.Body) == 0 {
			t.Fatalf("status %d, body %q", o.Status, o.Body)
		}
		if st, _ := m.state(testOrigin); st.Next != 0 {
			t.Fatalf("random input stored entries up to %d", st.Next)
		}
	})
}

func discard() *slog.Logger { return slog.New(slog.DiscardHandler) }

// TestMirrorTakesTombstones: a mirror catching up past the origin's
// retention gets tombstones for pruned entries; it stores one when its
// leaf hash is the entry's, and refuses one that is not.
func TestMirrorTakesTombstones(t *testing.T) {
	m := newTestMirror(t)
	m.witnessed(t, 0, 300)
	stone := func(bad bool) func(i uint64, e []byte) []byte {
		return func(i uint64, e []byte) []byte {
			if i != 7 {
				return e
			}
			leaf := [32]byte(rfc6962.DefaultHasher.HashLeaf(e))
			if bad {
				leaf[0] ^= 1
			}
			return receipt.Tombstone([16]byte{7}, leaf)
		}
	}
	if o := m.AddEntries(context.Background(), bytes.NewReader(m.upload(t, 0, 300, stone(true)))); o.Status != 422 || m.held(t) != 0 {
		t.Fatalf("a tombstone with another leaf: %d %s, holds %d", o.Status, o.Body, m.held(t))
	}
	if o := m.AddEntries(context.Background(), bytes.NewReader(m.upload(t, 0, 300, stone(false)))); o.Status != 200 || m.held(t) != 300 {
		t.Fatalf("a tombstone with the entry's leaf: %d %s, holds %d", o.Status, o.Body, m.held(t))
	}
	if e, _ := m.Entry(testOrigin, 7); !bytes.HasPrefix(e, []byte("knhk-pruned/v1")) {
		t.Fatalf("entry 7: %q", e)
	}
}
