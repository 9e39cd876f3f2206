package server

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	fnote "github.com/transparency-dev/formats/note"
	"golang.org/x/mod/sumdb/note"

	"github.com/knhk/knhk/internal/harness"
	"github.com/knhk/knhk/pkg/config"
	"github.com/knhk/knhk/pkg/receipt"
)

func getBody(t *testing.T, url string) (int, []byte) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

// TestRegionWitnessesAPeerKnhk: one knhk (us-east) cosigns another's
// (eu-west's) receipt-log checkpoint over listen.region, publishes its
// witness key beside its log keys, and the cosignature verifies with it.
func TestRegionWitnessesAPeerKnhk(t *testing.T) {
	pc := testConfig(t)
	pc.Receipts.Origin = "knhk/eu-west"
	peer, err := New(pc, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	peerBase := serve(t, peer)
	var cp []byte
	if err := harness.Poll(20*time.Second, 50*time.Millisecond, func() error {
		code, b := getBody(t, peerBase+"/v1/checkpoint")
		if code != 200 {
			return io.ErrUnexpectedEOF
		}
		cp = b
		return nil
	}); err != nil {
		t.Fatalf("the peer published no checkpoint: %v", err)
	}
	_, kb := getBody(t, peerBase+"/v1/keys")
	var peerKeys struct {
		LogVerifierKeys []string `json:"log_verifier_keys"`
	}
	if err := json.Unmarshal(kb, &peerKeys); err != nil || len(peerKeys.LogVerifierKeys) == 0 {
		t.Fatalf("peer keys %s: %v", kb, err)
	}
	_, wv, _ := note.GenerateKey(rand.Reader, "eu-west")
	peerWitness, _ := fnote.VKeyToCosignatureV1(wv)

	cfg := testConfig(t)
	cfg.Listen.Region = "127.0.0.1:0"
	cfg.Region = config.Region{Name: "us-east", Quorum: 2, Peers: []config.RegionPeer{{
		Name: "eu-west", URL: "http://127.0.0.2:9443", WitnessKey: peerWitness, LogKeys: peerKeys.LogVerifierKeys,
	}}}
	s, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	base := serve(t, s)
	_, kb = getBody(t, base+"/v1/keys")
	var keys struct {
		Witness string `json:"witness_verifier_key"`
	}
	if err := json.Unmarshal(kb, &keys); err != nil || !strings.HasPrefix(keys.Witness, "us-east+") {
		t.Fatalf("witness key not published: %s", kb)
	}

	resp, err := http.Post("http://"+s.RegionAddr()+"/add-checkpoint", "text/plain", bytes.NewReader(append([]byte("old 0\n\n"), cp...)))
	if err != nil {
		t.Fatal(err)
	}
	sigs, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("add-checkpoint: %d %s", resp.StatusCode, sigs)
	}
	cv, err := fnote.NewVerifierForCosignatureV1(keys.Witness)
	if err != nil {
		t.Fatal(err)
	}
	lv, _ := fnote.NewVerifier(peerKeys.LogVerifierKeys[0])
	if _, err := note.Open(append(bytes.Clone(cp), sigs...), note.VerifierList(lv, cv)); err != nil {
		t.Fatalf("cosignature does not verify with the published witness key: %v", err)
	}
	if code, b := getBody(t, base+"/v1/region/evidence"); code != 200 || !strings.Contains(string(b), `"evidence"`) {
		t.Fatalf("evidence: %d %s", code, b)
	}
	// Its own peer never cosigns (nothing listens at its URL): its
	// receipts are served, and say they are not durable.
	tok, err := s.receipts.Issue(context.Background(), &receipt.Receipt{Time: time.Now().UnixNano(), Method: "GET", Path: "/x", Status: 200})
	if err != nil {
		t.Fatal(err)
	}
	err = harness.Poll(30*time.Second, 100*time.Millisecond, func() error {
		code, b := getBody(t, base+"/v1/receipts/"+tok)
		if code != 200 {
			return fmt.Errorf("bundle: %d %s", code, b)
		}
		if !strings.Contains(string(b), `"durable": false`) || !strings.Contains(string(b), `"cosignatures": []`) {
			return fmt.Errorf("a receipt no peer cosigned: %s", b)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if page := metricsPage(t, base); !strings.Contains(page, `knhk_region_witness_requests_total{result="cosigned"} 1`) {
		t.Fatalf("no cosigned count in /metrics:\n%s", grepLines(page, "knhk_region"))
	}
}

// startServer runs a server on cfg until the test ends, or until stop.
func startServer(t *testing.T, cfg config.Config) (base string, stop func(), srv *Server) {
	t.Helper()
	s, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case <-done:
			case <-time.After(20 * time.Second):
				t.Error("server did not stop")
			}
		})
	}
	t.Cleanup(stop)
	base = "http://" + s.AdminAddr()
	if err := harness.Poll(10*time.Second, 10*time.Millisecond, func() error { return harness.HTTPOK(base + "/readyz") }); err != nil {
		t.Fatal(err)
	}
	return base, stop, s
}

// TestRegionsCosignEachOther: two knhk regions on loopback push their
// checkpoints to each other; each one's published checkpoint carries the
// other's cosignature, verified with the witness key it publishes, and
// `knhk region policy`'s source names the peer.
func TestRegionsCosignEachOther(t *testing.T) {
	tr := twoRegions(t)
	names, bases, servers, logKeys, witnessKeys := tr.names, tr.bases, tr.servers, tr.logKeys, tr.witnessKeys
	// Checkpoints are published as the log grows: log a few receipts.
	tokens := make([]string, 2)
	for j, s := range servers {
		for i := range 3 {
			tok, err := s.receipts.Issue(context.Background(), &receipt.Receipt{Time: time.Now().UnixNano(), Method: "GET", Path: fmt.Sprint("/r", i), Status: 200})
			if err != nil {
				t.Fatal(err)
			}
			tokens[j] = tok
		}
	}
	for i := range names {
		o := 1 - i
		lv, _ := fnote.NewVerifier(logKeys[i])
		cv, _ := fnote.NewVerifierForCosignatureV1(witnessKeys[o])
		err := harness.Poll(30*time.Second, 100*time.Millisecond, func() error {
			code, cp := getBody(t, bases[i]+"/v1/checkpoint")
			if code != 200 {
				return fmt.Errorf("checkpoint: %d %s", code, cp)
			}
			n, err := note.Open(cp, note.VerifierList(lv, cv))
			if err != nil {
				return err
			}
			if len(n.Sigs) != 2 {
				return fmt.Errorf("%s's checkpoint has %d verified signatures, want its own and %s's:\n%s", names[i], len(n.Sigs), names[o], cp)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		// The receipt's bundle says it is durable, and which region cosigned.
		err = harness.Poll(30*time.Second, 100*time.Millisecond, func() error {
			code, b := getBody(t, bases[i]+"/v1/receipts/"+tokens[i])
			var rb struct {
				Durable      bool `json:"durable"`
				Cosignatures []struct {
					Region string `json:"region"`
				} `json:"cosignatures"`
			}
			if err := json.Unmarshal(b, &rb); err != nil || code != 200 {
				return fmt.Errorf("bundle: %d %s", code, b)
			}
			if !rb.Durable || len(rb.Cosignatures) != 1 || rb.Cosignatures[0].Region != names[o] {
				return fmt.Errorf("bundle not durable by %s: %s", names[o], b)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		code, pol := getBody(t, bases[i]+"/v1/region/policy")
		if code != 200 || !strings.Contains(string(pol), "witness "+names[o]+" "+witnessKeys[o]) || !strings.Contains(string(pol), "group peers 1 "+names[o]) {
			t.Fatalf("policy: %d\n%s", code, pol)
		}
	}
}

// twoRegions runs two regions, quorum 2, that witness each other.
type regionPair struct {
	names, bases, logKeys, witnessKeys, mirrorKeys []string
	servers                                        []*Server
	stops                                          []func()
	cfgs                                           []config.Config
}

func twoRegions(t *testing.T) regionPair { return regionsOf(t, false) }

// regionsOf runs two regions, quorum 2; with mirror, each also mirrors
// the other's log (its peer entry pins the mirror key).
func regionsOf(t *testing.T, mirror bool) regionPair {
	t.Helper()
	names := []string{"us-east", "eu-west"}
	ports, err := harness.FreePorts(2)
	if err != nil {
		t.Fatal(err)
	}
	cfgs := make([]config.Config, 2)
	logKeys, witnessKeys, mirrorKeys := make([]string, 2), make([]string, 2), make([]string, 2)
	for i, n := range names {
		c := testConfig(t)
		c.Receipts.Origin = "knhk/" + n
		c.Receipts.CheckpointInterval = config.Duration(200 * time.Millisecond)
		c.Listen.Region = fmt.Sprintf("127.0.0.1:%d", ports[i])
		// A first start with no peers makes the log's, the witness's and
		// the mirror's keys, as an operator's would.
		c.Region = config.Region{Name: n}
		base, stop, _ := startServer(t, c)
		_, kb := getBody(t, base+"/v1/keys")
		var k struct {
			Log     string `json:"log_verifier_key"`
			Witness string `json:"witness_verifier_key"`
			Mirror  string `json:"mirror_verifier_key"`
		}
		if err := json.Unmarshal(kb, &k); err != nil || k.Log == "" || k.Witness == "" || k.Mirror == "" {
			t.Fatalf("keys %s: %v", kb, err)
		}
		stop()
		logKeys[i], witnessKeys[i], mirrorKeys[i] = k.Log, k.Witness, k.Mirror
		cfgs[i] = c
	}
	p := regionPair{names: names, logKeys: logKeys, witnessKeys: witnessKeys, mirrorKeys: mirrorKeys, bases: make([]string, 2), servers: make([]*Server, 2), stops: make([]func(), 2), cfgs: cfgs}
	for i, n := range names {
		o := 1 - i
		peer := config.RegionPeer{Name: names[o], URL: fmt.Sprintf("http://127.0.0.1:%d", ports[o]), WitnessKey: witnessKeys[o], LogKeys: []string{logKeys[o]}}
		if mirror {
			peer.MirrorKey = mirrorKeys[o]
		}
		cfgs[i].Region = config.Region{Name: n, Quorum: 2, Peers: []config.RegionPeer{peer}}
		p.bases[i], p.stops[i], p.servers[i] = startServer(t, cfgs[i])
	}
	return p
}

type durability struct {
	Durable      bool   `json:"durable"`
	Index        uint64 `json:"index"`
	Checkpoint   string `json:"checkpoint"`
	Cosignatures []struct {
		Region string `json:"region"`
		Role   string `json:"role"`
	} `json:"cosignatures"`
}

func durableOf(t *testing.T, base, tok string) (durability, error) {
	t.Helper()
	code, b := getBody(t, base+"/v1/receipts/"+tok)
	var d durability
	if err := json.Unmarshal(b, &d); err != nil || code != 200 {
		return d, fmt.Errorf("bundle: %d %s", code, b)
	}
	return d, nil
}

// TestDurableStaysDurable: a receipt once durable stays durable, proved
// against the newest checkpoint that met the quorum, while the peer is
// down and after a restart; receipts logged since read durable: false, and
// /metrics shows the peer's lag. Without the kept checkpoint every receipt
// reads false as soon as a checkpoint goes out without the peer.
func TestDurableStaysDurable(t *testing.T) {
	tr := twoRegions(t)
	us := tr.servers[0]
	issue := func(s *Server, path string) string {
		tok, err := s.receipts.Issue(context.Background(), &receipt.Receipt{Time: time.Now().UnixNano(), Method: "GET", Path: path, Status: 200})
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	early := issue(us, "/early")
	_ = issue(tr.servers[1], "/theirs")
	if err := harness.Poll(30*time.Second, 100*time.Millisecond, func() error {
		if d, err := durableOf(t, tr.bases[0], early); err != nil || !d.Durable {
			return fmt.Errorf("not durable yet: %+v: %w", d, err)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	tr.stops[1]() // eu-west goes down
	late := issue(us, "/late")
	// Wait for a checkpoint without eu-west's cosignature that covers late.
	if err := harness.Poll(30*time.Second, 100*time.Millisecond, func() error {
		d, err := durableOf(t, tr.bases[0], late)
		if err != nil {
			return err
		}
		if d.Durable {
			t.Fatalf("a receipt logged while the only peer is down reads durable: %+v", d)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	checkStillDurable := func(base string) {
		t.Helper()
		d, err := durableOf(t, base, early)
		if err != nil {
			t.Fatal(err)
		}
		if !d.Durable || len(d.Cosignatures) != 1 || d.Cosignatures[0].Region != "eu-west" {
			t.Fatalf("a durable receipt lost its durability while the peer is down: %+v", d)
		}
		lv, _ := fnote.NewVerifier(tr.logKeys[0])
		cv, _ := fnote.NewVerifierForCosignatureV1(tr.witnessKeys[1])
		if n, err := note.Open([]byte(d.Checkpoint), note.VerifierList(lv, cv)); err != nil || len(n.Sigs) != 2 {
			t.Fatalf("its checkpoint does not carry the log's and eu-west's signatures: %v\n%s", err, d.Checkpoint)
		}
		var b receipt.Bundle
		var k receipt.PublishedKeys
		_, bb := getBody(t, base+"/v1/receipts/"+early)
		_, kb := getBody(t, base+"/v1/keys")
		if err := errors.Join(json.Unmarshal(bb, &b), json.Unmarshal(kb, &k)); err != nil {
			t.Fatal(err)
		}
		b.Token = early
		if cs := receipt.Verify(b, k); cs[len(cs)-1].Err != nil || cs[len(cs)-1].Name != "inclusion" {
			t.Fatalf("the bundle against the quorum checkpoint does not verify: %+v", cs)
		}
	}
	checkStillDurable(tr.bases[0])
	// The metrics follow the published checkpoints a moment later.
	if err := harness.Poll(10*time.Second, 50*time.Millisecond, func() error {
		page := metricsPage(t, tr.bases[0])
		for _, want := range []string{"knhk_region_quorum_met 0", `knhk_region_peer_lag_entries{peer="eu-west"} 1`, "knhk_region_durable_lag_entries 1"} {
			if !strings.Contains(page, want) {
				return fmt.Errorf("/metrics lacks %q:\n%s", want, grepLines(page, "knhk_region"))
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	// After a restart, still durable: the quorum checkpoint was kept.
	tr.stops[0]()
	base, _, _ := startServer(t, tr.cfgs[0])
	checkStillDurable(base)
}

// TestRegionsMirrorEachOther: with mirror keys pinned, each region pushes
// its entries to the other's mirror, which checks them against the
// checkpoint its witness cosigned and then cosigns as a mirror; receipts
// are durable by the mirror's cosignature, and the mirror holds exactly
// the origin's entries (the same root at the same size).
func TestRegionsMirrorEachOther(t *testing.T) {
	tr := regionsOf(t, true)
	us, eu := tr.servers[0], tr.servers[1]
	var last string
	for i := range 600 { // a few bundles, one partial
		tok, err := us.receipts.Issue(context.Background(), &receipt.Receipt{Time: time.Now().UnixNano(), Method: "GET", Path: fmt.Sprint("/m", i), Status: 200})
		if err != nil {
			t.Fatal(err)
		}
		last = tok
	}
	err := harness.Poll(30*time.Second, 100*time.Millisecond, func() error {
		d, err := durableOf(t, tr.bases[0], last)
		if err != nil {
			return err
		}
		for _, c := range d.Cosignatures {
			if c.Region == "eu-west" && c.Role == "mirror" && d.Durable {
				return nil
			}
		}
		return fmt.Errorf("not durable by eu-west's mirror yet: %+v", d)
	})
	if err != nil {
		t.Fatal(err)
	}
	code, b := getBody(t, tr.bases[1]+"/v1/region/mirror")
	var ml struct {
		Logs []struct {
			Origin string `json:"origin"`
			Size   uint64 `json:"size"`
			Root   []byte `json:"root"`
		} `json:"logs"`
	}
	if err := json.Unmarshal(b, &ml); err != nil || code != 200 {
		t.Fatalf("mirror: %d %s", code, b)
	}
	var held uint64
	for _, l := range ml.Logs {
		if l.Origin == "knhk/us-east" {
			held = l.Size
		}
	}
	if held < 600 {
		t.Fatalf("eu-west holds %d of us-east's entries: %s", held, b)
	}
	want, err := us.receipts.Entries(context.Background(), 0, held)
	if err != nil {
		t.Fatal(err)
	}
	for i, w := range want {
		got, err := eu.region.mirror.Entry("knhk/us-east", uint64(i))
		if err != nil || !bytes.Equal(got, w) {
			t.Fatalf("entry %d: the mirror holds %q (%v), the origin %q", i, got, err, w)
		}
	}
	if page := metricsPage(t, tr.bases[0]); !strings.Contains(page, `knhk_region_mirror_push_total{peer="eu-west",result="cosigned"}`) {
		t.Fatalf("no cosigned pushes in /metrics:\n%s", grepLines(page, "knhk_region_mirror"))
	}
}
