package e2e

import (
	"bytes"
	"crypto/rand"
	"crypto/tls"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/mod/sumdb/note"

	"github.com/knhk/knhk/internal/harness"
	"github.com/knhk/knhk/pkg/config"
)

// The regions-under-SPIRE test's trust domain and the IDs in it.
var (
	srOperator = spiffeid.RequireFromString("spiffe://example.org/operator")
	srEnvoy    = spiffeid.RequireFromString("spiffe://example.org/envoy")
	srIntruder = spiffeid.RequireFromString("spiffe://example.org/knhk/intruder")
	srAPSouth  = spiffeid.RequireFromString("spiffe://example.org/knhk/ap-south")
)

// spireRegion is one knhk region of the SPIRE test: its own copy of the
// knhk binary, so the SPIRE agent (which attests workloads by executable
// path) gives it its own SPIFFE ID, behind its own Envoy.
type spireRegion struct {
	name, ip   string
	id         spiffeid.ID
	binDir     string // holds this region's knhk
	cfg        config.Config
	envoyArgs  []string
	admin      *http.Client // the operator, accepting only this region's ID
	stack      *harness.Stack
	logKey     string
	witnessKey string
	mirrorKey  string
}

func (r *spireRegion) knhk() *harness.Knhk { return r.stack.Knhk }

// copyKnhk copies the knhk binary into a directory of its own.
func copyKnhk(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	in, err := os.Open(filepath.Join(binDir, "knhk"))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = in.Close() }()
	out, err := os.OpenFile(filepath.Join(dir, "knhk"), os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		_ = out.Close()
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
	return dir
}

// spireRegionConfig is a standalone knhk on r.ip with receipts,
// listen.region and identity from the SPIRE agent.
func spireRegionConfig(t *testing.T, r *spireRegion, ident config.Identity) config.Config {
	t.Helper()
	ports, err := harness.FreePorts(4)
	if err != nil {
		t.Fatal(err)
	}
	c := config.Default()
	c.Listen.GRPC = r.ip + ":" + strconv.Itoa(ports[0])
	c.Listen.Admin = r.ip + ":" + strconv.Itoa(ports[1])
	c.Listen.XDS = r.ip + ":" + strconv.Itoa(ports[2])
	c.Listen.Region = r.ip + ":" + strconv.Itoa(ports[3])
	c.DataDir = filepath.Join(t.TempDir(), "data")
	c.Upstreams.Stable, c.Upstreams.Canary = []string{"127.0.0.1:1"}, []string{"127.0.0.1:2"}
	c.Receipts.Enabled = true
	c.Receipts.Origin = "knhk/" + r.name
	c.Receipts.CheckpointInterval = config.Duration(500 * time.Millisecond)
	c.Envoy.MessageTimeout = config.Duration(2 * time.Second) // a slow journal fsync is not what this test is about
	c.Region = config.Region{Name: r.name}
	c.Identity = ident
	return c
}

// bootstrap starts the region once, alone and under identity, which mints
// its log, witness and mirror keys, and reads them from GET /v1/keys over
// mTLS.
func (r *spireRegion) bootstrap(t *testing.T, lg io.Writer) {
	t.Helper()
	k, err := harness.StartKnhk(filepath.Join(r.binDir, "knhk"), t.TempDir(), r.cfg, lg, r.admin)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = k.Stop(10 * time.Second) }()
	if err := k.WaitReady(30 * time.Second); err != nil {
		t.Fatalf("%s (bootstrap): %v", r.name, err)
	}
	var keys struct {
		Log     string `json:"log_verifier_key"`
		Witness string `json:"witness_verifier_key"`
		Mirror  string `json:"mirror_verifier_key"`
	}
	b, err := k.Get("/v1/keys")
	if err == nil {
		err = json.Unmarshal(b, &keys)
	}
	if err != nil || keys.Log == "" || keys.Witness == "" || keys.Mirror == "" {
		t.Fatalf("%s: /v1/keys %s: %v", r.name, b, err)
	}
	r.logKey, r.witnessKey, r.mirrorKey = keys.Log, keys.Witness, keys.Mirror
}

// peerEntry is the region.peers[] entry other regions keep for r.
func (r *spireRegion) peerEntry() config.RegionPeer {
	return config.RegionPeer{Name: r.name, URL: "https://" + r.cfg.Listen.Region, SpiffeID: r.id.String(),
		WitnessKey: r.witnessKey, LogKeys: []string{r.logKey}, MirrorKey: r.mirrorKey}
}

// start runs the region behind its own Envoy, on its bootstrap data.
func (r *spireRegion) start(t *testing.T, lg io.Writer) {
	t.Helper()
	s, err := harness.StartStack(harness.StackOptions{BinDir: r.binDir, Dir: t.TempDir(), Logs: lg, AdminHTTP: r.admin,
		EnvoyArgs: r.envoyArgs,
		Configure: func(c *config.Config) {
			c.DataDir, c.Receipts, c.Region, c.Listen.Region, c.Identity = r.cfg.DataDir, r.cfg.Receipts, r.cfg.Region, r.cfg.Listen.Region, r.cfg.Identity
			c.Envoy.MessageTimeout = r.cfg.Envoy.MessageTimeout
		}})
	if err != nil {
		t.Fatalf("%s: %v", r.name, err)
	}
	r.stack = s
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("stopping %s: %v", r.name, err)
		}
	})
}

// metrics reads the region's /metrics page over mTLS.
func (r *spireRegion) metrics(t *testing.T) string {
	t.Helper()
	b, err := r.knhk().Get("/metrics")
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// metricSum adds the series of family on page whose result label is not
// one of skip.
func metricSum(page, family string, skip ...string) float64 {
	sum := 0.0
	for _, l := range strings.Split(page, "\n") {
		rest, ok := strings.CutPrefix(l, family+"{")
		if !ok {
			continue
		}
		labels, value, ok := strings.Cut(rest, "} ")
		if !ok {
			continue
		}
		skipped := false
		for _, s := range skip {
			if strings.Contains(labels, `result="`+s+`"`) {
				skipped = true
			}
		}
		var f float64
		if _, err := fmt.Sscan(value, &f); err == nil && !skipped {
			sum += f
		}
	}
	return sum
}

// witnessState is what a probe that reached a region's witness or mirror
// would change: the evidence kept, and the answers counted other than the
// ones its peer's own pushes get.
type witnessState struct {
	evidence         string
	witnessAnswers   float64 // knhk_region_witness_requests_total, but cosigned and stale
	refused          float64 // knhk_region_inconsistency_total
	mirrorAnswers    float64 // knhk_region_mirror_requests_total, but 200, 202 and 409
	unknownKeyResult float64
}

func (r *spireRegion) witnessState(t *testing.T) witnessState {
	t.Helper()
	ev, err := r.knhk().Get("/v1/region/evidence")
	if err != nil {
		t.Fatal(err)
	}
	page := r.metrics(t)
	return witnessState{
		evidence:         string(ev),
		witnessAnswers:   metricSum(page, "knhk_region_witness_requests_total", "cosigned", "stale"),
		refused:          metricSum(page, "knhk_region_inconsistency_total"),
		mirrorAnswers:    metricSum(page, "knhk_region_mirror_requests_total", "200", "202", "409"),
		unknownKeyResult: max(0, metricValue(page, `knhk_region_witness_requests_total{result="unknown_key"}`)),
	}
}

// forgedCheckpoint is a checkpoint of origin's log signed by a key no
// region pinned: a witness that reads it answers 403 and keeps it.
func forgedCheckpoint(t *testing.T, origin string) []byte {
	t.Helper()
	skey, _, err := note.GenerateKey(rand.Reader, origin)
	if err != nil {
		t.Fatal(err)
	}
	s, err := note.NewSigner(skey)
	if err != nil {
		t.Fatal(err)
	}
	signed, err := note.Sign(&note.Note{Text: fmt.Sprintf("%s\n%d\n%s\n", origin, 1<<20, base64.StdEncoding.EncodeToString(make([]byte, 32)))}, s)
	if err != nil {
		t.Fatal(err)
	}
	return append([]byte("old 0\n\n"), signed...)
}

// addEntriesHeader is a C2SP tlog-mirror add-entries body with no
// package: a mirror that reads it answers 404 for an origin it does not
// mirror.
func addEntriesHeader(origin string) []byte {
	var b bytes.Buffer
	_ = binary.Write(&b, binary.BigEndian, uint16(len(origin)))
	b.WriteString(origin)
	_ = binary.Write(&b, binary.BigEndian, uint64(0)) // upload_start
	_ = binary.Write(&b, binary.BigEndian, uint64(1)) // upload_end
	_ = binary.Write(&b, binary.BigEndian, uint16(0)) // no ticket
	return b.Bytes()
}

// regionPost POSTs body to url+path with c on a connection of its own.
func regionPost(c *tls.Config, url, path string, body []byte) (int, string, error) {
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: c, DisableKeepAlives: true}}
	resp, err := hc.Post(url+path, "application/octet-stream", bytes.NewReader(body))
	if err != nil {
		return 0, "", err
	}
	defer func() { _ = resp.Body.Close() }()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, strings.TrimSpace(string(b)), nil
}

// impostor is a TLS server standing at a peer's URL that presents
// whichever SVID it holds (and accepts any client SVID of the trust
// domain). It counts the handshakes it began and the requests that came
// through one.
type impostor struct {
	addr     string
	svid     atomic.Pointer[x509svid.SVID]
	hellos   atomic.Int64
	requests atomic.Int64
}

// GetX509SVID implements [x509svid.Source]; it is asked once per handshake.
func (m *impostor) GetX509SVID() (*x509svid.SVID, error) {
	m.hellos.Add(1)
	return m.svid.Load(), nil
}

func startImpostor(t *testing.T, ip string, svid *x509svid.SVID, bundles *x509bundle.Set, lg io.Writer) *impostor {
	t.Helper()
	m := &impostor{}
	m.svid.Store(svid)
	l, err := net.Listen("tcp", ip+":0")
	if err != nil {
		t.Fatal(err)
	}
	m.addr = l.Addr().String()
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			m.requests.Add(1)
			http.Error(w, "impostor", http.StatusServiceUnavailable)
		}),
		ReadHeaderTimeout: 5 * time.Second,
		ErrorLog:          log.New(lg, "impostor at "+m.addr+": ", 0),
	}
	go func() {
		_ = srv.Serve(tls.NewListener(l, tlsconfig.MTLSServerConfig(m, bundles, tlsconfig.AuthorizeAny())))
	}()
	t.Cleanup(func() { _ = srv.Close() })
	return m
}

// TestRegionsUnderSPIREMTLS: two knhk regions, us-east (127.0.0.1) and
// eu-west (127.0.0.2), each behind its own Envoy and each with its own
// SPIFFE ID from a real SPIRE 1.13.3, witness and mirror each other over
// mTLS on listen.region:
//   - a receipt in either region becomes durable by the other's mirror
//     cosignature;
//   - a client whose SVID is not a peer's (an intruder, the operator who
//     may use the admin API, no certificate at all) or a plaintext client
//     cannot push add-checkpoint or add-entries to eu-west, and eu-west's
//     witness and mirror state do not change; the same requests from
//     us-east's ID do reach them;
//   - us-east refuses a server at ap-south's URL that presents eu-west's
//     SVID, and pushes to it once it presents ap-south's.
func TestRegionsUnderSPIREMTLS(t *testing.T) {
	needEnvoy(t)
	lg := logs(t)
	us := &spireRegion{name: "us-east", ip: "127.0.0.1"}
	eu := &spireRegion{name: "eu-west", ip: "127.0.0.2"}
	regions := []*spireRegion{us, eu}
	for _, r := range regions {
		r.id = spiffeid.RequireFromString("spiffe://example.org/knhk/" + r.name)
		r.binDir = copyKnhk(t) // before any process is forked: no ETXTBSY
	}
	sp, err := harness.StartSpire("example.org", lg)
	if err != nil {
		t.Fatal(err) // never skipped: the error says how to install SPIRE
	}
	t.Cleanup(sp.Close)
	envoyBin, err := harness.EnvoyPath()
	if err != nil {
		t.Fatal(err)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	// This test process also holds the operator's and the intruder's
	// SVIDs, and us-east's, eu-west's and ap-south's, to act as each.
	entries := []struct {
		id  spiffeid.ID
		bin string
	}{
		{us.id, filepath.Join(us.binDir, "knhk")}, {eu.id, filepath.Join(eu.binDir, "knhk")}, {srEnvoy, envoyBin},
		{srOperator, self}, {srIntruder, self}, {us.id, self}, {eu.id, self}, {srAPSouth, self},
	}
	for _, e := range entries {
		if _, err := sp.Register(e.id, e.bin, time.Hour); err != nil {
			t.Fatal(err)
		}
	}
	svids, bundles, err := sp.FetchSVIDs(60*time.Second, srOperator, srIntruder, us.id, eu.id, srAPSouth)
	if err != nil {
		t.Fatalf("this process got no SVIDs from the SPIRE agent: %v", err)
	}
	for _, r := range regions {
		var ident config.Identity
		ident, r.envoyArgs = sp.IdentityFor(r.id, srEnvoy, srOperator)
		r.cfg = spireRegionConfig(t, r, ident)
		r.admin = harness.AdminClient(harness.ClientTLS(svids[srOperator], bundles, r.id))
		r.bootstrap(t, lg)
	}

	// ap-south is a peer of us-east only, and nobody runs it: at its URL
	// stands an impostor presenting eu-west's SVID.
	imp := startImpostor(t, "127.0.0.3", svids[eu.id], bundles, lg)
	_, apWitness, _ := note.GenerateKey(rand.Reader, "ap-south")
	_, apMirror, _ := note.GenerateKey(rand.Reader, "ap-south-mirror")
	_, apLog, _ := note.GenerateKey(rand.Reader, "knhk/ap-south")
	us.cfg.Region.Peers = []config.RegionPeer{eu.peerEntry(), {Name: "ap-south", URL: "https://" + imp.addr, SpiffeID: srAPSouth.String(),
		WitnessKey: cosigKey(t, apWitness), LogKeys: []string{apLog}, MirrorKey: cosigKey(t, apMirror)}}
	eu.cfg.Region.Peers = []config.RegionPeer{us.peerEntry()}
	for _, r := range regions {
		r.cfg.Region.Quorum = 2
		r.start(t, lg)
	}
	started := time.Now()

	t.Run("each region's receipts are durable by the other's mirror over mTLS", func(t *testing.T) {
		for _, c := range []struct{ at, by *spireRegion }{{us, eu}, {eu, us}} {
			tok := receiptNow(t, c.at.stack, "spire-"+c.at.name)
			var d durability
			err := harness.Poll(60*time.Second, 250*time.Millisecond, func() error {
				var err error
				if d, err = bundleOf(c.at.knhk(), tok); err != nil {
					return err
				}
				for _, cs := range d.Cosignatures {
					if cs.Region == "ap-south" {
						t.Fatalf("%s's receipt carries a cosignature of ap-south, whose URL only an impostor answers: %+v", c.at.name, d)
					}
				}
				if !d.Durable || !slices.Contains(d.mirroredBy(), c.by.name) {
					return fmt.Errorf("%s's receipt not durable by %s's mirror yet: %+v", c.at.name, c.by.name, d)
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if n, _ := mirrored(t, c.by.knhk(), c.at.cfg.Receipts.Origin); n <= d.Index {
				t.Fatalf("%s's mirror holds %d entries of %s's log; the receipt is entry %d", c.by.name, n, c.at.name, d.Index)
			}
		}
		t.Logf("durable both ways %s after the regions started", time.Since(started).Round(time.Millisecond))
	})

	// A probe is the pair of pushes an admitted client would change
	// eu-west's state with: a forged checkpoint of us-east's log (403,
	// kept as evidence) and add-entries for a log nobody mirrors (404).
	euURL := "https://" + eu.cfg.Listen.Region
	forged := forgedCheckpoint(t, us.cfg.Receipts.Origin)
	entriesBody := addEntriesHeader("knhk/nowhere")

	t.Run("a client whose SPIFFE ID is no peer's cannot push", func(t *testing.T) {
		before := eu.witnessState(t)
		for name, svid := range map[string]*x509svid.SVID{
			"an intruder of the trust domain": svids[srIntruder],
			"the operator (allowed on admin)": svids[srOperator],
			"a client without certificate":    nil,
		} {
			c := harness.ClientTLS(svid, bundles, eu.id)
			for path, body := range map[string][]byte{"/add-checkpoint": forged, "/add-entries": entriesBody} {
				code, msg, err := regionPost(c, euURL, path, body)
				if err == nil {
					t.Fatalf("%s: POST %s to eu-west's listen.region was answered %d %q, want the TLS handshake refused", name, path, code, msg)
				}
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					t.Fatalf("%s: POST %s got no answer at all rather than a refusal: %v", name, path, err)
				}
				t.Logf("%s: POST %s refused: %v", name, path, err)
			}
		}
		if after := eu.witnessState(t); after != before {
			t.Fatalf("eu-west's witness or mirror state changed under refused pushes:\nbefore %+v\nafter  %+v", before, after)
		}
		// And the refusals are seen: counted (and logged as JSON).
		err := harness.Poll(10*time.Second, 100*time.Millisecond, func() error {
			page, err := eu.knhk().Get("/metrics")
			if err != nil {
				return err
			}
			if n := metricValue(string(page), "knhk_region_handshakes_refused_total"); n < 6 {
				return fmt.Errorf("knhk_region_handshakes_refused_total %v after 6 refused pushes", n)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	})

	t.Run("a plaintext client cannot push", func(t *testing.T) {
		before := eu.witnessState(t)
		for path, body := range map[string][]byte{"/add-checkpoint": forged, "/add-entries": entriesBody} {
			code, msg, err := regionPost(nil, "http://"+eu.cfg.Listen.Region, path, body)
			// Go's TLS server answers a plaintext HTTP request with its own
			// 400; the witness would have answered 403 or 404.
			if err == nil && (code != http.StatusBadRequest || !strings.Contains(msg, "HTTPS server")) {
				t.Fatalf("plaintext POST %s to eu-west's listen.region was answered %d %q", path, code, msg)
			}
			t.Logf("plaintext POST %s: %d %q %v", path, code, msg, err)
		}
		if after := eu.witnessState(t); after != before {
			t.Fatalf("eu-west's witness or mirror state changed under plaintext pushes:\nbefore %+v\nafter  %+v", before, after)
		}
	})

	t.Run("the same pushes from us-east's ID reach the witness and the mirror", func(t *testing.T) {
		// The probes above would have been seen: from a peer's ID they are.
		before := eu.witnessState(t)
		c := harness.ClientTLS(svids[us.id], bundles, eu.id)
		if code, msg, err := regionPost(c, euURL, "/add-checkpoint", forged); err != nil || code != http.StatusForbidden {
			t.Fatalf("a forged checkpoint from us-east's ID: %d %q %v, want 403", code, msg, err)
		}
		if code, msg, err := regionPost(c, euURL, "/add-entries", entriesBody); err != nil || code != http.StatusNotFound {
			t.Fatalf("add-entries for an unmirrored log from us-east's ID: %d %q %v, want 404", code, msg, err)
		}
		after := eu.witnessState(t)
		if after.evidence == before.evidence || !strings.Contains(after.evidence, "unknown_key") ||
			after.unknownKeyResult != before.unknownKeyResult+1 || after.refused != before.refused+1 || after.mirrorAnswers != before.mirrorAnswers+1 {
			t.Fatalf("eu-west's state after a peer's probes:\nbefore %+v\nafter  %+v", before, after)
		}
	})

	t.Run("us-east refuses a peer URL whose server presents another peer's ID", func(t *testing.T) {
		pushErrors := `knhk_region_mirror_push_total{peer="ap-south",result="error"}`
		err := harness.Poll(60*time.Second, 250*time.Millisecond, func() error {
			if n := imp.requests.Load(); n > 0 {
				t.Fatalf("us-east sent %d requests to a server at ap-south's URL presenting eu-west's SVID", n)
			}
			if n := imp.hellos.Load(); n < 3 {
				return fmt.Errorf("us-east began %d handshakes with ap-south's URL", n)
			}
			if n := metricValue(us.metrics(t), pushErrors); n < 1 {
				return fmt.Errorf("%s = %v", pushErrors, n)
			}
			for _, l := range strings.Split(lg.String(), "\n") {
				if strings.Contains(l, "mirror push failed") && strings.Contains(l, `"peer":"ap-south"`) &&
					strings.Contains(l, "unexpected ID") && strings.Contains(l, eu.id.String()) {
					return nil
				}
			}
			return errors.New("us-east logged no mirror push to ap-south refused for eu-west's ID")
		})
		if err != nil {
			t.Fatal(err)
		}
		if n := imp.requests.Load(); n > 0 {
			t.Fatalf("us-east sent %d requests to a server at ap-south's URL presenting eu-west's SVID", n)
		}
		if n := metricValue(us.metrics(t), `knhk_region_peer_cosigned_size{peer="ap-south"}`); n > 0 {
			t.Fatalf("us-east counts ap-south's cosigned size %v", n)
		}
		// The same server presenting ap-south's own SVID is pushed to: the
		// ID was the only thing refused.
		imp.svid.Store(svids[srAPSouth])
		receiptNow(t, us.stack, "spire-ap-south")
		err = harness.Poll(60*time.Second, 250*time.Millisecond, func() error {
			if imp.requests.Load() == 0 {
				return errors.New("no request from us-east at ap-south's URL")
			}
			return nil
		})
		if err != nil {
			t.Fatalf("us-east never pushed to ap-south presenting its own SVID: %v", err)
		}
		t.Logf("%d handshakes at ap-south's URL; %d requests once it presented ap-south's SVID", imp.hellos.Load(), imp.requests.Load())
	})
}
