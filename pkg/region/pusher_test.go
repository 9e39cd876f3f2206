package region

import (
	"bytes"
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

// fixedSource is a log of no entries past its checkpoint.
type fixedSource struct{ cp []byte }

func (f fixedSource) Checkpoint(context.Context) ([]byte, error) { return f.cp, nil }
func (f fixedSource) Entries(_ context.Context, from, to uint64) ([][]byte, error) {
	return make([][]byte, to-from), nil
}
func (f fixedSource) Consistency(context.Context, uint64, uint64) ([][]byte, error) { return nil, nil }

// TestPusherTakesOnlyOneVerifiedLine: a mirror's 200 is handed on only as
// one line its pinned key verifies over this checkpoint; anything else a
// peer sends back is refused and reaches nothing.
func TestPusherTakesOnlyOneVerifiedLine(t *testing.T) {
	p := newCosigningPeers(t, "eu-west")
	mk, err := LoadOrCreateKey(filepath.Join(t.TempDir(), "m"), "eu-west"+MirrorSuffix)
	if err != nil {
		t.Fatal(err)
	}
	cp := p.checkpoint(t, 5)
	m := &Mirror{key: mk}
	text, _, _ := splitNote(cp)
	good, err := m.cosign(string(text))
	if err != nil {
		t.Fatal(err)
	}
	other, _ := m.cosign(string(text[:len(text)-2]) + "A\n") // another checkpoint's
	for name, tc := range map[string]struct {
		reply []byte
		ok    bool
	}{
		"its cosignature":                  {good, true},
		"a blank line first":               {append([]byte("\n"), good...), false},
		"two lines":                        {append(append([]byte{}, good...), good...), false},
		"another checkpoint's cosignature": {other, false},
		"the witness key's line":           {lineOf(t, p.checkpoint(t, 5, 0)), false},
		"junk":                             {[]byte("— eu-west-mirror AAAA\n"), false},
	} {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write(tc.reply) }))
		var got [][]byte
		pu, err := NewPusher(PusherOptions{Peer: "eu-west", URL: srv.URL, MirrorKey: mk.Verifier, Origin: testOrigin, Client: srv.Client(),
			Source: fixedSource{cp}, Log: slog.New(slog.DiscardHandler), Metrics: NewPusherMetrics(prometheus.NewRegistry()),
			Cosigned: func(_, line []byte) { got = append(got, line) }})
		if err != nil {
			t.Fatal(err)
		}
		_, _, err = pu.push(context.Background(), cp, 5, 5)
		srv.Close()
		if tc.ok != (err == nil) || tc.ok != (len(got) == 1) || (tc.ok && !bytes.Equal(got[0], good)) {
			t.Fatalf("%s: err %v, handed on %q", name, err, got)
		}
	}
}
