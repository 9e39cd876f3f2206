package e2e

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	fnote "github.com/transparency-dev/formats/note"
	"golang.org/x/mod/sumdb/note"

	"github.com/knhk/knhk/internal/harness"
	"github.com/knhk/knhk/pkg/config"
	"github.com/knhk/knhk/pkg/kms"
	"github.com/knhk/knhk/pkg/receipt"
)

// regionMetric reads one series (name with its labels) of a knhk's /metrics.
func regionMetric(t *testing.T, k *harness.Knhk, series string) float64 {
	t.Helper()
	v, err := metric(k.AdminURL(), series)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

type durability struct {
	Durable      bool   `json:"durable"`
	Index        uint64 `json:"index"`
	Cosignatures []struct {
		Region string `json:"region"`
		Role   string `json:"role"`
	} `json:"cosignatures"`
}

// mirroredBy lists the regions whose mirror cosigned.
func (d durability) mirroredBy() []string {
	var out []string
	for _, c := range d.Cosignatures {
		if c.Role == "mirror" {
			out = append(out, c.Region)
		}
	}
	return out
}

// mirrored is what a region's mirror holds of origin.
func mirrored(t *testing.T, k *harness.Knhk, origin string) (size uint64, root []byte) {
	t.Helper()
	b, err := k.Get("/v1/region/mirror")
	if err != nil {
		t.Fatal(err)
	}
	var ml struct {
		Logs []struct {
			Origin string `json:"origin"`
			Size   uint64 `json:"size"`
			Root   []byte `json:"root"`
		} `json:"logs"`
	}
	if err := json.Unmarshal(b, &ml); err != nil {
		t.Fatal(err)
	}
	for _, l := range ml.Logs {
		if l.Origin == origin {
			return l.Size, l.Root
		}
	}
	return 0, nil
}

func bundleOf(k *harness.Knhk, tok string) (durability, error) {
	var d durability
	b, err := k.Get("/v1/receipts/" + tok)
	if err != nil {
		return d, err
	}
	return d, json.Unmarshal(b, &d)
}

// receiptNow sends one request through us-east's Envoy and returns its
// receipt token.
func receiptNow(t *testing.T, s *harness.Stack, user string) string {
	t.Helper()
	r, err := get(s.URL+"/now", map[string]string{"x-user-id": user})
	if err != nil || r.status != http.StatusOK || r.header.Get("x-knhk-receipt") == "" {
		t.Fatalf("request through us-east: %+v %v", r, err)
	}
	return r.header.Get("x-knhk-receipt")
}

func postCheckpoint(url string, body []byte) (int, string, error) {
	resp, err := http.Post(url+"/add-checkpoint", "text/plain", bytes.NewReader(body))
	if err != nil {
		return 0, "", err
	}
	defer func() { _ = resp.Body.Close() }()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), nil
}

// TestRegionsWitnessEachOther: three knhk processes on 127.0.0.1, .2 and
// .3 witness each other's receipt logs, every push going through a real
// Toxiproxy so the test can cut and restore each link. Under load through
// us-east's Envoy:
//   - every receipt becomes durable (quorum 2 of 3) and `knhk receipt
//     verify --policy` passes against a policy the test writes itself;
//   - eu-west partitioned for 30 s: quorum continues with ap-south, and
//     eu-west catches up once healed;
//   - both peers cut off: receipts are still served, and read durable:
//     false until one peer returns;
//   - eu-west killed (-9) while pushes flow: after its restart it refuses
//     a checkpoint older than what it cosigned, and cosigns on;
//   - a slow (200 ms) link to one peer and a thin (64 KB/s) one to the
//     other: both mirrors keep up;
//   - a forged checkpoint, and one that rewrites history (signed with
//     us-east's own key), are refused, kept as evidence and counted;
//   - no receipt issued during the test is lost.
func TestRegionsWitnessEachOther(t *testing.T) {
	needEnvoy(t)
	lg := logs(t)
	rs, err := harness.StartRegions(harness.RegionsOptions{BinDir: binDir, Dir: t.TempDir(), Logs: lg, Quorum: 2,
		Names: []string{"us-east", "eu-west", "ap-south"}, IPs: []string{"127.0.0.1", "127.0.0.2", "127.0.0.3"},
		// The journal waits ¾ of message_timeout for its sync: at the
		// 200 ms default, one slow fsync among four processes on two
		// cores served a request without its receipt (fail-open), which is
		// not what this test is about.
		Configure: func(c *config.Config) { c.Envoy.MessageTimeout = config.Duration(2 * time.Second) }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(rs.Close)
	us, eu, ap := rs.List[0], rs.List[1], rs.List[2]
	setLinks := func(r *harness.Region, on bool, others ...*harness.Region) {
		t.Helper()
		if err := rs.SetLinks(r, on, others...); err != nil {
			t.Fatal(err)
		}
	}
	usK := us.Knhk

	const rate = 100
	load := harness.StartLoad(us.Stack.URL, rate, "region")
	loadStart := time.Now()
	defer load.Stop()

	// Normal: durable by both peers, and verified against our own policy.
	first := receiptNow(t, us.Stack, "first")
	err = harness.Poll(30*time.Second, 200*time.Millisecond, func() error {
		d, err := bundleOf(usK, first)
		if err != nil || !d.Durable || len(d.mirroredBy()) != 2 {
			return fmt.Errorf("not held by both peers' mirrors yet: %+v (%w)", d, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	policy := filepath.Join(t.TempDir(), "policy")
	pol := fmt.Sprintf("log %s\nwitness eu-west %s\nwitness ap-south %s\ngroup peers 1 eu-west ap-south\nquorum peers\n", us.LogKey, eu.WitnessKey, ap.WitnessKey)
	if err := os.WriteFile(policy, []byte(pol), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := runCmd(binDir+"/knhk", "receipt", "verify", "--policy", policy, "--admin", usK.AdminURL(), first); err != nil || !strings.Contains(out, "✓ policy") {
		t.Fatalf("receipt verify --policy: %v\n%s", err, out)
	}
	// A verifier that wants the entries held in both other regions pins
	// their mirror keys.
	held := filepath.Join(t.TempDir(), "held")
	if err := os.WriteFile(held, []byte(fmt.Sprintf("log %s\nwitness eu-west-mirror %s\nwitness ap-south-mirror %s\ngroup mirrors all eu-west-mirror ap-south-mirror\nquorum mirrors\n", us.LogKey, eu.MirrorKey, ap.MirrorKey)), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := runCmd(binDir+"/knhk", "receipt", "verify", "--policy", held, "--admin", usK.AdminURL(), first); err != nil || !strings.Contains(out, "✓ policy") {
		t.Fatalf("receipt verify --policy (both mirrors): %v\n%s", err, out)
	}
	// The policy `knhk region policy` prints counts peers as durability
	// does (by their mirror keys), so a durable receipt meets it.
	printed, err := runCmd(binDir+"/knhk", "region", "policy", "--admin", usK.AdminURL())
	if err != nil || !strings.Contains(printed, "eu-west-mirror") {
		t.Fatalf("knhk region policy: %v\n%s", err, printed)
	}
	own := filepath.Join(t.TempDir(), "printed")
	if err := os.WriteFile(own, []byte(printed), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := runCmd(binDir+"/knhk", "receipt", "verify", "--policy", own, "--admin", usK.AdminURL(), first); err != nil || !strings.Contains(out, "✓ policy") {
		t.Fatalf("receipt verify --policy with knhk region policy's: %v\n%s", err, out)
	}
	// A policy that needs a witness that never cosigned names the check.
	_, stranger, _ := note.GenerateKey(rand.Reader, "stranger")
	strict := filepath.Join(t.TempDir(), "strict")
	if err := os.WriteFile(strict, []byte(fmt.Sprintf("log %s\nwitness stranger %s\nquorum stranger\n", us.LogKey, cosigKey(t, stranger))), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := runCmd(binDir+"/knhk", "receipt", "verify", "--policy", strict, "--admin", usK.AdminURL(), first); err == nil || !strings.Contains(out, "policy") {
		t.Fatalf("receipt verify with a policy its cosignatures cannot meet passed: %v\n%s", err, out)
	}
	oldCheckpoint, err := usK.Get("/v1/checkpoint")
	if err != nil {
		t.Fatal(err)
	}

	// eu-west partitioned for 30 s under load.
	setLinks(eu, false, us, ap)
	partitioned := time.Now()
	during := ""
	err = harness.Poll(60*time.Second, 500*time.Millisecond, func() error {
		if during == "" && time.Since(partitioned) > 5*time.Second {
			during = receiptNow(t, us.Stack, "during")
		}
		if during == "" {
			return fmt.Errorf("partition just began")
		}
		d, err := bundleOf(usK, during)
		if err != nil || !d.Durable {
			return fmt.Errorf("a receipt logged during the partition is not durable by ap-south: %+v (%w)", d, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// Hold the partition for its 30 s: its length is the point, not a
	// wait for some state.
	time.Sleep(time.Until(partitioned.Add(30 * time.Second)))
	if lag := regionMetric(t, usK, `knhk_region_peer_lag_entries{peer="eu-west"}`); lag <= 0 {
		t.Fatalf("eu-west lag %v after 30 s cut off under load", lag)
	}
	healedAt := regionMetric(t, usK, "knhk_region_checkpoint_size")
	setLinks(eu, true, us, ap)
	err = harness.Poll(60*time.Second, 250*time.Millisecond, func() error {
		if got := regionMetric(t, usK, `knhk_region_peer_cosigned_size{peer="eu-west"}`); got < healedAt {
			return fmt.Errorf("eu-west's mirror has cosigned size %v, the log was %v at the heal", got, healedAt)
		}
		if n, _ := mirrored(t, eu.Knhk, us.Config.Receipts.Origin); float64(n) < healedAt {
			return fmt.Errorf("eu-west's mirror holds %d entries, the log was %v at the heal", n, healedAt)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("eu-west did not catch up: %v", err)
	}

	// A slow link to eu-west (200 ms each way) and a thin one to ap-south
	// (64 KB/s): quorum continues, both mirrors keep up.
	if err := errors.Join(rs.Toxi.Latency(harness.Link(us, eu), 200*time.Millisecond, 20*time.Millisecond), rs.Toxi.Bandwidth(harness.Link(us, ap), 64)); err != nil {
		t.Fatal(err)
	}
	slow := receiptNow(t, us.Stack, "slow")
	err = harness.Poll(60*time.Second, 250*time.Millisecond, func() error {
		d, err := bundleOf(usK, slow)
		if err != nil || !d.Durable || len(d.mirroredBy()) != 2 {
			return fmt.Errorf("over a slow and a thin link, not held by both mirrors yet: %+v (%w)", d, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := errors.Join(rs.Toxi.Clear(harness.Link(us, eu)), rs.Toxi.Clear(harness.Link(us, ap))); err != nil {
		t.Fatal(err)
	}

	// Both peers cut off from us-east: still served, durable: false.
	setLinks(us, false, eu, ap)
	alone := receiptNow(t, us.Stack, "alone")
	err = harness.Poll(30*time.Second, 250*time.Millisecond, func() error {
		b, err := usK.Get("/v1/receipts/" + alone)
		if err != nil {
			return err
		}
		var d durability
		if err := json.Unmarshal(b, &d); err != nil {
			return err
		}
		if d.Durable {
			t.Fatalf("a receipt logged with both peers cut off reads durable: %s", b)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	setLinks(us, true, ap)
	err = harness.Poll(30*time.Second, 250*time.Millisecond, func() error {
		if d, err := bundleOf(usK, alone); err != nil || !d.Durable {
			return fmt.Errorf("not durable once ap-south is back: %+v (%w)", d, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	setLinks(us, true, eu)

	// kill -9 eu-west while pushes flow; after restart it neither cosigns
	// an older checkpoint nor forgets what it cosigned.
	before := regionMetric(t, usK, `knhk_region_peer_cosigned_size{peer="eu-west"}`)
	eu.Knhk.Kill()
	if err := eu.Knhk.Restart(false); err != nil {
		t.Fatal(err)
	}
	direct := "http://" + eu.Config.Listen.Region
	code, msg, err := postCheckpoint(direct, append([]byte("old 0\n\n"), oldCheckpoint...))
	if err != nil || code != http.StatusConflict {
		t.Fatalf("eu-west after kill -9, an old checkpoint with old 0: %d %q %v (want 409: it cosigned newer)", code, msg, err)
	}
	err = harness.Poll(30*time.Second, 250*time.Millisecond, func() error {
		if got := regionMetric(t, usK, `knhk_region_peer_cosigned_size{peer="eu-west"}`); got <= before {
			return fmt.Errorf("eu-west cosigned size %v, %v before its kill", got, before)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}

	// A forged checkpoint of us-east's log: refused, kept, counted.
	forger, _, _ := note.GenerateKey(rand.Reader, us.Config.Receipts.Origin)
	fs, _ := note.NewSigner(forger)
	forged, _ := note.Sign(&note.Note{Text: fmt.Sprintf("%s\n%d\n%s\n", us.Config.Receipts.Origin, 1<<20, base64.StdEncoding.EncodeToString(make([]byte, 32)))}, fs)
	if code, msg, err := postCheckpoint(direct, append([]byte("old 0\n\n"), forged...)); err != nil || code != http.StatusForbidden {
		t.Fatalf("a forged checkpoint: %d %q %v, want 403", code, msg, err)
	}
	ev, err := eu.Knhk.Get("/v1/region/evidence")
	if err != nil || !strings.Contains(string(ev), "unknown_key") {
		t.Fatalf("evidence: %s %v", ev, err)
	}
	if n := regionMetric(t, eu.Knhk, `knhk_region_inconsistency_total{kind="unknown_key",origin="knhk/us-east"}`); n != 1 {
		t.Fatalf("knhk_region_inconsistency_total for the forgery: %v", n)
	}

	// Nothing lost: every request was served with a receipt, and every
	// receipt is in the log.
	samples := load.Stop()
	offered := int(0.8 * rate * time.Since(loadStart).Seconds())
	var missing, failed int
	for _, s := range samples {
		if s.Code != http.StatusOK || s.Receipt == "" {
			failed++
			continue
		}
		if _, err := usK.Get("/v1/receipts/" + s.Receipt); err != nil {
			missing++
		}
	}
	t.Logf("%d requests under load; %d not served with a receipt, %d receipts not found", len(samples), failed, missing)
	// Every mirror holds the same entries as the log: the same root at
	// the same size, once they have caught up.
	err = harness.Poll(60*time.Second, 250*time.Millisecond, func() error {
		size := regionMetric(t, usK, "knhk_region_checkpoint_size")
		for _, r := range []*harness.Region{eu, ap} {
			if n, _ := mirrored(t, r.Knhk, us.Config.Receipts.Origin); float64(n) != size {
				return fmt.Errorf("%s's mirror holds %d of %v entries", r.Name, n, size)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	cp, err := usK.Get("/v1/checkpoint")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.SplitN(string(cp), "\n", 4)
	for _, r := range []*harness.Region{eu, ap} {
		n, root := mirrored(t, r.Knhk, us.Config.Receipts.Origin)
		if strconv.FormatUint(n, 10) != lines[1] || base64.StdEncoding.EncodeToString(root) != lines[2] {
			t.Fatalf("%s's mirror holds %d entries with root %x; the log's checkpoint is %s / %s", r.Name, n, root, lines[1], lines[2])
		}
	}
	if failed > 0 || missing > 0 || len(samples) < offered {
		t.Fatalf("%d of %d requests not served with a receipt, %d receipts missing from the log (at least %d expected)", failed, len(samples), missing, offered)
	}

	// Rewritten history: a checkpoint signed with us-east's own key, of
	// the size eu-west cosigned, with another root. Refused (409, not the
	// size), kept and counted; eu-west's state stays.
	kmsKey, err := kms.OpenLocal(filepath.Join(us.Config.DataDir, "keys", "kms-ed25519.key"))
	if err != nil {
		t.Fatal(err)
	}
	ns, _, err := receipt.NewNoteSigner(us.Config.Receipts.Origin, kmsKey)
	if err != nil {
		t.Fatal(err)
	}
	code, sizeBody, err := postCheckpoint(direct, append([]byte("old 0\n\n"), cp...))
	if err != nil || code != http.StatusConflict {
		t.Fatalf("asking eu-west's size: %d %q %v", code, sizeBody, err)
	}
	size := strings.TrimSpace(sizeBody)
	other := make([]byte, 32)
	_, _ = rand.Read(other)
	rewritten, err := note.Sign(&note.Note{Text: fmt.Sprintf("%s\n%s\n%s\n", us.Config.Receipts.Origin, size, base64.StdEncoding.EncodeToString(other))}, ns)
	if err != nil {
		t.Fatal(err)
	}
	code, msg, err = postCheckpoint(direct, append([]byte("old "+size+"\n\n"), rewritten...))
	if err != nil || code != http.StatusConflict || !strings.Contains(msg, "rewritten") {
		t.Fatalf("a rewritten history of size %s: %d %q %v, want 409 naming it", size, code, msg, err)
	}
	if n := regionMetric(t, eu.Knhk, `knhk_region_inconsistency_total{kind="root_mismatch",origin="knhk/us-east"}`); n != 1 {
		t.Fatalf("knhk_region_inconsistency_total for the rewritten history: %v", n)
	}
	if code, again, _ := postCheckpoint(direct, append([]byte("old 0\n\n"), cp...)); code != http.StatusConflict || strings.TrimSpace(again) != size {
		t.Fatalf("eu-west's cosigned size moved: %d %q, was %s", code, again, size)
	}
}

// cosigKey is a note verifier key as a cosignature/v1 key.
func cosigKey(t *testing.T, vkey string) string {
	t.Helper()
	k, err := fnote.VKeyToCosignatureV1(vkey)
	if err != nil {
		t.Fatal(err)
	}
	return k
}
