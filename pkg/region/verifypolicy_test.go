package region_test

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"

	fnote "github.com/transparency-dev/formats/note"
	"github.com/transparency-dev/tessera"
	"golang.org/x/mod/sumdb/note"

	"github.com/knhk/knhk/pkg/region"
)

const vpOrigin = "knhk/us-east"

// vpWitness is a peer region's witness key, made as knhk makes one: an
// Ed25519 note key cosigning with formats' cosignature/v1 signer.
type vpWitness struct {
	vkey   string // cosignature/v1
	signer note.Signer
}

// vpFixture is a log key and witness keys, and checkpoints they sign.
type vpFixture struct {
	t         testing.TB
	logSigner note.Signer
	logVKey   string
	w         map[string]vpWitness
	root      []byte
}

func newVPFixture(t testing.TB, rnd io.Reader, witnesses ...string) *vpFixture {
	t.Helper()
	skey, vkey, err := note.GenerateKey(rnd, vpOrigin)
	if err != nil {
		t.Fatal(err)
	}
	s, err := note.NewSigner(skey)
	if err != nil {
		t.Fatal(err)
	}
	f := &vpFixture{t: t, logSigner: s, logVKey: vkey, w: map[string]vpWitness{}, root: bytes.Repeat([]byte{7}, 32)}
	for _, name := range witnesses {
		f.w[name] = newVPWitness(t, rnd, name)
	}
	return f
}

func newVPWitness(t testing.TB, rnd io.Reader, name string) vpWitness {
	t.Helper()
	skey, vkey, err := note.GenerateKey(rnd, name)
	if err != nil {
		t.Fatal(err)
	}
	cvkey, err := fnote.VKeyToCosignatureV1(vkey)
	if err != nil {
		t.Fatal(err)
	}
	s, err := fnote.NewSignerForCosignatureV1(skey)
	if err != nil {
		t.Fatal(err)
	}
	return vpWitness{vkey: cvkey, signer: s}
}

// policy is the log line, a witness line per witness given (with a URL,
// so tessera reads it too), then rest.
func (f *vpFixture) policy(witnesses []string, rest string) []byte {
	var b strings.Builder
	fmt.Fprintf(&b, "log %s\n", f.logVKey)
	for i, name := range witnesses {
		fmt.Fprintf(&b, "witness %s %s https://127.0.0.%d:9443\n", name, f.w[name].vkey, i+2)
	}
	b.WriteString(rest)
	return []byte(b.String())
}

func (f *vpFixture) body(size int) string {
	return fmt.Sprintf("%s\n%d\n%s\n", vpOrigin, size, base64.StdEncoding.EncodeToString(f.root))
}

// checkpoint is signed by the log and cosigned by the signers given.
func (f *vpFixture) checkpoint(cosigners ...note.Signer) []byte {
	f.t.Helper()
	cp, err := note.Sign(&note.Note{Text: f.body(10)}, append([]note.Signer{f.logSigner}, cosigners...)...)
	if err != nil {
		f.t.Fatal(err)
	}
	return cp
}

func (f *vpFixture) signers(names ...string) []note.Signer {
	out := make([]note.Signer, len(names))
	for i, n := range names {
		out[i] = f.w[n].signer
	}
	return out
}

func mustParse(t *testing.T, text []byte) *region.WitnessPolicy {
	t.Helper()
	p, err := region.ParseWitnessPolicy("test.policy", text)
	if err != nil {
		t.Fatalf("%v\n%s", err, text)
	}
	return p
}

// checkAgainstTessera: the policy's verdict on the checkpoint's quorum
// (met: Check returned nil, or not: ErrQuorumUnmet) is tessera's.
func checkAgainstTessera(t *testing.T, policy, cp []byte, err error) {
	t.Helper()
	if err != nil && !errors.Is(err, region.ErrQuorumUnmet) {
		t.Fatalf("not a quorum verdict: %v", err)
	}
	wg, terr := tessera.NewWitnessGroupFromPolicy(policy)
	if terr != nil {
		t.Fatalf("tessera refuses the policy: %v\n%s", terr, policy)
	}
	if got, want := err == nil, wg.Satisfied(cp); got != want {
		t.Fatalf("quorum met: %v, tessera says %v (%v)", got, want, err)
	}
}

// TestWitnessPolicyQuorumMet reads the policy knhk prints and checks a
// checkpoint cosigned to its quorum.
func TestWitnessPolicyQuorumMet(t *testing.T) {
	f := newVPFixture(t, rand.Reader, "eu-west", "ap-south")
	text := region.Policy(vpOrigin, f.logVKey, []region.PeerWitness{
		{Name: "eu-west", Key: f.w["eu-west"].vkey, URL: "https://127.0.0.2:9443"},
		{Name: "ap-south", Key: f.w["ap-south"].vkey, URL: "https://127.0.0.3:9443"},
	}, 2)
	p := mustParse(t, text)
	cp := f.checkpoint(f.signers("ap-south")...)
	vc, err := p.OpenCheckpoint(cp)
	if err != nil {
		t.Fatal(err)
	}
	if vc.Origin != vpOrigin || vc.Size != 10 || !bytes.Equal(vc.Hash, f.root) || vc.LogKey != f.logVKey {
		t.Fatalf("opened %+v", vc)
	}
	err = p.Check(cp)
	if err != nil {
		t.Fatal(err)
	}
	checkAgainstTessera(t, text, cp, err)
	if got := p.LogKeys(); len(got) != 1 || got[0] != f.logVKey {
		t.Fatalf("log keys %q", got)
	}
}

// TestWitnessPolicyQuorumUnmetNamesWitnesses: the error names the group,
// its threshold, the witnesses that cosigned and those that did not.
func TestWitnessPolicyQuorumUnmetNamesWitnesses(t *testing.T) {
	f := newVPFixture(t, rand.Reader, "eu-west", "ap-south")
	for _, c := range []struct {
		group     string
		cosigners []string
		want      string
	}{
		{"group peers 2 eu-west ap-south", []string{"eu-west"},
			"group peers needs 2 of eu-west, ap-south; only eu-west cosigned (ap-south: no cosignature)"},
		{"group peers any eu-west ap-south", nil,
			"group peers needs 1 of eu-west, ap-south; none cosigned (eu-west: no cosignature; ap-south: no cosignature)"},
		{"group peers all eu-west ap-south", []string{"ap-south"},
			"group peers needs 2 of eu-west, ap-south; only ap-south cosigned (eu-west: no cosignature)"},
	} {
		text := f.policy([]string{"eu-west", "ap-south"}, c.group+"\nquorum peers\n")
		cp := f.checkpoint(f.signers(c.cosigners...)...)
		err := mustParse(t, text).Check(cp)
		if !errors.Is(err, region.ErrQuorumUnmet) || err.Error() != c.want {
			t.Errorf("%s, cosigned by %v:\n got %v\nwant %s", c.group, c.cosigners, err, c.want)
		}
		checkAgainstTessera(t, text, cp, err)
	}
	// A single witness as the quorum.
	text := f.policy([]string{"eu-west", "ap-south"}, "quorum eu-west\n")
	cp := f.checkpoint(f.signers("ap-south")...)
	err := mustParse(t, text).Check(cp)
	if !errors.Is(err, region.ErrQuorumUnmet) || err.Error() != "witness eu-west: no cosignature" {
		t.Fatalf("got %v", err)
	}
	checkAgainstTessera(t, text, cp, err)
}

// TestWitnessPolicyIgnoresOtherCosigners: a cosignature by a key the
// policy does not list counts for nothing and is not reported.
func TestWitnessPolicyIgnoresOtherCosigners(t *testing.T) {
	f := newVPFixture(t, rand.Reader, "eu-west", "ap-south", "sa-east")
	text := f.policy([]string{"eu-west", "ap-south"}, "group peers 1 eu-west ap-south\nquorum peers\n")
	p := mustParse(t, text)

	cp := f.checkpoint(f.signers("sa-east")...)
	err := p.Check(cp)
	want := "group peers needs 1 of eu-west, ap-south; none cosigned (eu-west: no cosignature; ap-south: no cosignature)"
	if !errors.Is(err, region.ErrQuorumUnmet) || err.Error() != want {
		t.Fatalf("got %v\nwant %s", err, want)
	}
	checkAgainstTessera(t, text, cp, err)

	cp = f.checkpoint(f.signers("sa-east", "eu-west")...)
	err = p.Check(cp)
	if err != nil {
		t.Fatal(err)
	}
	checkAgainstTessera(t, text, cp, err)
}

// TestWitnessPolicyForgedCosignatures: a cosignature under a policy
// witness's name by another key, or by its key but over something else,
// does not count, and the error says which.
func TestWitnessPolicyForgedCosignatures(t *testing.T) {
	f := newVPFixture(t, rand.Reader, "eu-west", "ap-south")
	impostor := newVPWitness(t, rand.Reader, "ap-south") // right name, wrong key
	text := f.policy([]string{"eu-west", "ap-south"}, "group peers 1 eu-west ap-south\nquorum peers\n")
	p := mustParse(t, text)

	cp := f.checkpoint(impostor.signer)
	err := p.Check(cp)
	want := fmt.Sprintf("group peers needs 1 of eu-west, ap-south; none cosigned (eu-west: no cosignature; "+
		"ap-south: cosigned by another key named ap-south (key hash %08x, not the policy's %08x))",
		impostor.signer.KeyHash(), f.w["ap-south"].signer.KeyHash())
	if !errors.Is(err, region.ErrQuorumUnmet) || err.Error() != want {
		t.Fatalf("got %v\nwant %s", err, want)
	}
	checkAgainstTessera(t, text, cp, err)

	// ap-south's real key, but its signature is over another checkpoint.
	other, err := note.Sign(&note.Note{Text: f.body(11)}, f.w["ap-south"].signer)
	if err != nil {
		t.Fatal(err)
	}
	spliced := append(f.checkpoint(), sigLines(t, other)...)
	err = p.Check(spliced)
	want = "group peers needs 1 of eu-west, ap-south; none cosigned (eu-west: no cosignature; ap-south: signature does not verify)"
	if !errors.Is(err, region.ErrQuorumUnmet) || err.Error() != want {
		t.Fatalf("got %v\nwant %s", err, want)
	}
	checkAgainstTessera(t, text, spliced, err)

	// A bad cosignature does not undo a good one that meets the quorum.
	good := append(f.checkpoint(f.signers("eu-west")...), sigLines(t, other)...)
	err = p.Check(good)
	if err != nil {
		t.Fatal(err)
	}
	checkAgainstTessera(t, text, good, err)
}

// sigLines are a signed note's signature lines.
func sigLines(t *testing.T, signed []byte) []byte {
	t.Helper()
	i := bytes.LastIndex(signed, []byte("\n\n"))
	if i < 0 {
		t.Fatalf("not a note: %q", signed)
	}
	return signed[i+2:]
}

// TestWitnessPolicyLogKey: the checkpoint is trusted only with the
// policy's log keys.
func TestWitnessPolicyLogKey(t *testing.T) {
	f := newVPFixture(t, rand.Reader, "eu-west")
	other := newVPFixture(t, rand.Reader) // another key, named after the same origin
	rest := "quorum eu-west\n"
	cp := f.checkpoint(f.signers("eu-west")...)

	witnesses := fmt.Sprintf("witness eu-west %s\n", f.w["eu-west"].vkey)
	p := mustParse(t, []byte("log "+other.logVKey+"\n"+witnesses+rest))
	if _, err := p.OpenCheckpoint(cp); !errors.Is(err, region.ErrLogSignature) ||
		!strings.Contains(err.Error(), fmt.Sprintf("signed by %s+%08x", vpOrigin, f.logSigner.KeyHash())) ||
		!strings.Contains(err.Error(), fmt.Sprintf("the policy's log keys are %s+%08x", vpOrigin, other.logSigner.KeyHash())) {
		t.Fatalf("OpenCheckpoint: %v", err)
	}
	// Check refuses it too, cosigned to the quorum as it is.
	if err := p.Check(cp); !errors.Is(err, region.ErrLogSignature) {
		t.Fatalf("Check: %v", err)
	}

	// The policy's key, but a signature over another checkpoint.
	forged, err := note.Sign(&note.Note{Text: f.body(11)}, f.logSigner)
	if err != nil {
		t.Fatal(err)
	}
	spliced := append([]byte(f.body(10)+"\n"), sigLines(t, forged)...)
	p = mustParse(t, f.policy([]string{"eu-west"}, rest))
	if _, err := p.OpenCheckpoint(spliced); !errors.Is(err, region.ErrLogSignature) || !strings.Contains(err.Error(), "does not verify") {
		t.Fatalf("spliced: %v", err)
	}

	// The policy's key, over a checkpoint of another origin.
	foreign, err := note.Sign(&note.Note{Text: strings.Replace(f.body(10), vpOrigin, "knhk/elsewhere", 1)}, f.logSigner)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.OpenCheckpoint(foreign); !errors.Is(err, region.ErrLogSignature) || !strings.Contains(err.Error(), `origin is "knhk/elsewhere"`) {
		t.Fatalf("foreign origin: %v", err)
	}

	// Two logs: the checkpoint's own key is found, whichever line it is on.
	two := []byte("log " + other.logVKey + "\n" + string(f.policy([]string{"eu-west"}, rest)))
	vc, err := mustParse(t, two).OpenCheckpoint(cp)
	if err != nil || vc.LogKey != f.logVKey {
		t.Fatalf("two logs: %+v, %v", vc, err)
	}
}

// TestWitnessPolicyWithoutLogLine: no log line, no trusted checkpoint,
// whatever the cosignatures.
func TestWitnessPolicyWithoutLogLine(t *testing.T) {
	f := newVPFixture(t, rand.Reader, "eu-west")
	text := []byte(fmt.Sprintf("witness eu-west %s\nquorum eu-west\n", f.w["eu-west"].vkey))
	p := mustParse(t, text)
	cp := f.checkpoint(f.signers("eu-west")...)
	for _, err := range []error{p.Check(cp), func() error { _, err := p.OpenCheckpoint(cp); return err }()} {
		if !errors.Is(err, region.ErrPolicyNoLog) || !strings.HasPrefix(err.Error(), `test.policy: the policy has no "log" line`) {
			t.Fatalf("got %v", err)
		}
	}
	if len(p.LogKeys()) != 0 {
		t.Fatal(p.LogKeys())
	}
}

// TestWitnessPolicyGroupOfGroups: groups may be members of groups, and
// the error follows the unmet ones down.
func TestWitnessPolicyGroupOfGroups(t *testing.T) {
	f := newVPFixture(t, rand.Reader, "eu-west", "eu-central", "ap-south", "ap-east")
	text := f.policy([]string{"eu-west", "eu-central", "ap-south", "ap-east"}, `
group eu any eu-west eu-central
group asia 1 ap-south ap-east
group regions all eu asia
quorum regions
`)
	p := mustParse(t, text)
	cp := f.checkpoint(f.signers("eu-central")...)
	err := p.Check(cp)
	want := "group regions needs 2 of eu, asia; only eu met (asia: needs 1 of ap-south, ap-east; none cosigned (ap-south: no cosignature; ap-east: no cosignature))"
	if !errors.Is(err, region.ErrQuorumUnmet) || err.Error() != want {
		t.Fatalf("got %v\nwant %s", err, want)
	}
	checkAgainstTessera(t, text, cp, err)

	cp = f.checkpoint(f.signers("eu-central", "ap-east")...)
	err = p.Check(cp)
	if err != nil {
		t.Fatal(err)
	}
	checkAgainstTessera(t, text, cp, err)

	// A group shared by two others is told about once.
	text = f.policy([]string{"eu-west", "ap-south"}, `
group a any eu-west
group b 2 a ap-south
group c 2 a b
quorum c
`)
	cp = f.checkpoint()
	err = mustParse(t, text).Check(cp)
	want = "group c needs 2 of a, b; none met (a: needs 1 of eu-west; none cosigned (eu-west: no cosignature); " +
		"b: needs 2 of a, ap-south; none met (a: not met (see above); ap-south: no cosignature))"
	if !errors.Is(err, region.ErrQuorumUnmet) || err.Error() != want {
		t.Fatalf("got %v\nwant %s", err, want)
	}
	checkAgainstTessera(t, text, cp, err)
}

// TestWitnessPolicyNeedsNoCosignature: "quorum none", and the policy knhk
// prints for a region with no peers (a group of none), need nothing.
func TestWitnessPolicyNeedsNoCosignature(t *testing.T) {
	f := newVPFixture(t, rand.Reader)
	cp := f.checkpoint()
	for _, text := range [][]byte{
		f.policy(nil, "quorum none\n"),
		region.Policy(vpOrigin, f.logVKey, nil, 1),
	} {
		err := mustParse(t, text).Check(cp)
		if err != nil {
			t.Fatalf("%v\n%s", err, text)
		}
		checkAgainstTessera(t, text, cp, err)
	}
}

// TestParseWitnessPolicyFormatting: comments, blank lines, tabs, CRLF and
// optional URLs are the grammar's.
func TestParseWitnessPolicyFormatting(t *testing.T) {
	f := newVPFixture(t, rand.Reader, "eu-west")
	text := fmt.Sprintf("# a comment\r\n\r\nlog\t%s   https://log.example/ # the log\r\n  witness eu-west %s\r\nquorum eu-west#trailing\r\n",
		f.logVKey, f.w["eu-west"].vkey)
	if err := mustParse(t, []byte(text)).Check(f.checkpoint(f.signers("eu-west")...)); err != nil {
		t.Fatal(err)
	}
}

// TestParseWitnessPolicyRefuses: each refusal names the file, the line
// and the reason.
func TestParseWitnessPolicyRefuses(t *testing.T) {
	f := newVPFixture(t, rand.Reader, "eu-west", "ap-south")
	logl := "log " + f.logVKey + "\n"
	eu := "witness eu-west " + f.w["eu-west"].vkey + "\n"
	ap := "witness ap-south " + f.w["ap-south"].vkey + "\n"
	// eu-west's key under another stated hash.
	parts := strings.SplitN(f.w["eu-west"].vkey, "+", 3)
	badHash := parts[0] + "+00000000+" + parts[2]
	for _, c := range []struct {
		text string
		line int
		want string
	}{
		{logl + eu + "witnes ap-south x\nquorum eu-west\n", 3, `unknown keyword "witnes"`},
		{logl + "witness eu-west\nquorum eu-west\n", 2, "want: witness <name> <vkey> [<url>]"},
		{logl + "witness eu-west " + f.w["eu-west"].vkey + " https://x/ extra\nquorum eu-west\n", 2, "want: witness"},
		{logl + "witness eu-west eu-west+1234+AAAA\nquorum eu-west\n", 2, "witness eu-west: key"},
		{logl + "witness eu-west " + badHash + "\nquorum eu-west\n", 2, "key hash does not match"},
		{logl + "witness eu-west " + f.w["eu-west"].vkey + " ftp://x/\nquorum eu-west\n", 2, "want an http(s) URL"},
		{logl + eu + "witness eu-west " + f.w["ap-south"].vkey + "\nquorum eu-west\n", 3, `"eu-west" is already defined on line 2`},
		{logl + eu + "witness again " + f.w["eu-west"].vkey + "\nquorum eu-west\n", 3, "the same key as witness eu-west"},
		{logl + "witness all " + f.w["eu-west"].vkey + "\nquorum all\n", 2, `"all" is a reserved word`},
		{logl + eu + "group none any eu-west\nquorum eu-west\n", 3, `"none" is a reserved word`},
		{logl + eu + "group peers any eu-west ap-south\n" + ap + "quorum peers\n", 3, `"ap-south" is not a witness or group defined on an earlier line`},
		{logl + eu + ap + "group peers 1 eu-west eu-west\nquorum peers\n", 4, "lists eu-west twice"},
		{logl + eu + ap + "group peers 3 eu-west ap-south\nquorum peers\n", 4, "needs 3 of 2 members"},
		{logl + eu + ap + "group peers 01 eu-west ap-south\nquorum peers\n", 4, `threshold "01"`},
		{logl + eu + ap + "group peers -1 eu-west ap-south\nquorum peers\n", 4, `threshold "-1"`},
		{logl + eu + ap + "group peers some eu-west ap-south\nquorum peers\n", 4, `threshold "some"`},
		{logl + "group peers any\nquorum peers\n", 2, "needs 1 of 0 members"},
		{logl + "group peers\nquorum none\n", 2, "want: group"},
		{logl + eu + "quorum ap-south\n", 3, `quorum "ap-south" is not a witness or group defined on an earlier line`},
		{logl + "quorum eu-west\n" + eu, 2, `quorum "eu-west" is not`},
		{logl + eu + "quorum eu-west\nquorum none\n", 4, "a second quorum line (the first is line 3)"},
		{logl + eu + "quorum\n", 3, "want: quorum <name>|none"},
		{logl + eu, 0, "no quorum line"},
		{"log " + f.w["eu-west"].vkey + "\n" + eu + "quorum eu-west\n", 1, "a cosignature/v1 (witness) key"},
		{"log knhk/us-east+00000000+AAAA\nquorum none\n", 1, "log key"},
		{logl + logl + "quorum none\n", 2, "is already listed on line 1"},
		{"log\nquorum none\n", 1, "want: log <vkey> [<url>]"},
		{"log " + f.logVKey + " notaurl\nquorum none\n", 1, "want an http(s) URL"},
	} {
		_, err := region.ParseWitnessPolicy("bad.policy", []byte(c.text))
		var pe *region.PolicyError
		if !errors.As(err, &pe) || !errors.Is(err, region.ErrBadPolicy) {
			t.Errorf("%q: got %v, want a PolicyError", c.text, err)
			continue
		}
		prefix := fmt.Sprintf("bad.policy:%d: ", c.line)
		if c.line == 0 {
			prefix = "bad.policy: "
		}
		if pe.File != "bad.policy" || pe.Line != c.line || !strings.HasPrefix(err.Error(), prefix) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q:\n got %v (line %d)\nwant %s…%s", c.text, err, pe.Line, prefix, c.want)
		}
	}
}

// fuzzReader makes the same keys every run, so a corpus entry found once
// names the same witnesses the next time.
func fuzzReader(seed string) io.Reader {
	var b bytes.Buffer
	for i := range 64 {
		h := sha256.Sum256([]byte(fmt.Sprintf("%s/%d", seed, i)))
		b.Write(h[:])
	}
	return &b
}

// FuzzParseWitnessPolicy: the parser never panics, refuses with a
// PolicyError naming a line of the input, and what it accepts means to
// tessera what it means here.
func FuzzParseWitnessPolicy(f *testing.F) {
	fx := newVPFixture(f, fuzzReader("knhk-fuzz"), "w1", "w2", "w3")
	forger := newVPWitness(f, fuzzReader("knhk-fuzz-forger"), "w3")
	cp := fx.checkpoint(fx.w["w1"].signer, fx.w["w2"].signer, forger.signer)
	ws := []string{"w1", "w2", "w3"}
	for _, rest := range []string{
		"quorum w1\n",
		"quorum w3\n",
		"quorum none\n",
		"group g 2 w1 w2 w3\nquorum g\n",
		"group g all w1 w2 w3\nquorum g\n",
		"group g any w3\ngroup h 2 g w1\nquorum h\n",
		"group a any w1\ngroup b 2 a w2\ngroup c 2 a b\nquorum c\n",
		"group g 0\nquorum g\n",
		"# comment\ngroup g 1 w1 # x\nquorum g\n",
	} {
		f.Add(fx.policy(ws, rest))
	}
	f.Add([]byte("log x\nwitness\ngroup\nquorum\n"))
	f.Add([]byte("group g 1\n\x00\xff"))
	f.Fuzz(func(t *testing.T, text []byte) {
		p, err := region.ParseWitnessPolicy("fuzz.policy", text)
		if err != nil {
			var pe *region.PolicyError
			if !errors.As(err, &pe) || pe.File != "fuzz.policy" || pe.Line < 0 || pe.Line > bytes.Count(text, []byte("\n"))+1 {
				t.Fatalf("refused with %v", err)
			}
			return
		}
		if _, err := region.ParseWitnessPolicy("fuzz.policy", text); err != nil {
			t.Fatalf("accepted once, then %v", err)
		}
		err = p.Check(cp)
		if _, oerr := p.OpenCheckpoint(cp); oerr != nil {
			if !errors.Is(err, region.ErrLogSignature) && !errors.Is(err, region.ErrPolicyNoLog) {
				t.Fatalf("OpenCheckpoint: %v, Check: %v", oerr, err)
			}
			return
		}
		if err != nil && !errors.Is(err, region.ErrQuorumUnmet) {
			t.Fatalf("Check: %v", err)
		}
		// Tessera has no memo, so keep the groups it walks few.
		if bytes.Count(text, []byte("group")) > 12 {
			return
		}
		wg, terr := tessera.NewWitnessGroupFromPolicy(text)
		if terr != nil {
			return // it wants URLs, and refuses some names and lines knhk takes
		}
		if got, want := err == nil, wg.Satisfied(cp); got != want {
			t.Fatalf("quorum met: %v, tessera says %v (%v)\n%s", got, want, err, text)
		}
	})
}
