package receipt

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// retentionLog is a service with 300 receipts issued one after another, so
// receipt i is log entry i: bundle 0 (0–255) is full, bundle 1 partial.
// Receipt i is dated base + i ns, two hours ago, except those in young,
// dated now; those in callers carry that caller.
type retentionLog struct {
	dir    string
	s      *Service
	toks   []string
	ids    [][16]byte
	base   time.Time
	cutoff time.Time // an hour ago: the old ones are before it
}

const retentionEntries = 300

func newRetentionLog(t *testing.T, young map[int]bool, callers map[int]string) *retentionLog {
	t.Helper()
	dir, _, s := localTestService(t)
	rl := &retentionLog{dir: dir, s: s, base: time.Now().Add(-2 * time.Hour), cutoff: time.Now().Add(-time.Hour)}
	t.Cleanup(func() {
		if rl.s != nil {
			_ = rl.s.Close(context.Background())
		}
	})
	for i := range retentionEntries {
		r := Receipt{Time: rl.base.Add(time.Duration(i)).UnixNano(), Method: "GET", Path: fmt.Sprintf("/person/%d", i), Status: 200, Caller: callers[i]}
		if young[i] {
			r.Time = time.Now().UnixNano()
		}
		tok, err := s.Issue(context.Background(), &r)
		if err != nil {
			t.Fatal(err)
		}
		rl.toks = append(rl.toks, tok)
		rl.ids = append(rl.ids, r.ID)
	}
	bundleWhenIntegrated(t, s, rl.ids[retentionEntries-1])
	for i, id := range rl.ids {
		if b := bundleWhenIntegrated(t, s, id); b.Index != uint64(i) {
			t.Fatalf("receipt %d is entry %d: issued one at a time, it should be entry %d", i, b.Index, i)
		}
	}
	return rl
}

// snapshot maps every file under root (relative path) to its SHA-256.
func snapshot(t *testing.T, root string, skip func(rel string) bool) map[string][32]byte {
	t.Helper()
	out := map[string][32]byte{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if skip(rel) {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		out[rel] = sha256.Sum256(b)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// tileFiles skips all but the full Merkle tiles (tessera's garbage
// collection may remove partial ones at any time).
func tileFiles(rel string) bool {
	return !strings.HasPrefix(rel, "tile/") || strings.HasPrefix(rel, "tile/entries/") || strings.Contains(rel, ".p/")
}

func sameFiles(t *testing.T, what string, before, after map[string][32]byte) {
	t.Helper()
	for k, v := range before {
		if w, ok := after[k]; !ok || w != v {
			t.Errorf("%s: %s changed or went missing", what, k)
		}
	}
	for k := range after {
		if _, ok := before[k]; !ok {
			t.Errorf("%s: %s appeared", what, k)
		}
	}
}

// mustProve checks a kept receipt's body is there, is the receipt and is
// in the tree. (Verify would refuse it: these receipts are dated hours
// before the delegated key that signed them was certified.)
func mustProve(t *testing.T, what string, s *Service, b Bundle, id [16]byte) {
	t.Helper()
	r, err := Decode(b.Receipt)
	if err != nil || b.Pruned || r.ID != id {
		t.Fatalf("%s: body %v, pruned %v", what, err, b.Pruned)
	}
	cp, err := s.rlog.Open([]byte(b.Checkpoint))
	if err != nil {
		t.Fatal(err)
	}
	if err := VerifyInclusion(LeafHash(b.Receipt), b.Index, cp.Size, b.Proof, cp.Hash); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

func checkNamed(cs []Check, name string) (Check, bool) {
	for _, c := range cs {
		if c.Name == name {
			return c, true
		}
	}
	return Check{}, false
}

// mustVerifyPruned verifies a pruned receipt's bundle with the client's
// token and makes sure the verdict says the body is gone.
func mustVerifyPruned(t *testing.T, what string, b Bundle, tok string, keys PublishedKeys) {
	t.Helper()
	if !b.Pruned || len(b.Receipt) != 0 || len(b.Decoded) != 0 {
		t.Fatalf("%s: not served as pruned: pruned=%v, %d body bytes", what, b.Pruned, len(b.Receipt))
	}
	b.Token = tok
	cs := Verify(b, keys)
	if last := cs[len(cs)-1]; last.Err != nil || last.Name != "inclusion" {
		t.Fatalf("%s: check %s failed: %v", what, last.Name, last.Err)
	}
	c, ok := checkNamed(cs, "pruned")
	if !ok || !strings.Contains(c.Note, "body deleted under retention") {
		t.Fatalf("%s: the verdict does not say the body was pruned: %+v", what, cs)
	}
	if _, ok := checkNamed(cs, "receipt"); ok {
		t.Fatalf("%s: a receipt check passed on a pruned body: %+v", what, cs)
	}
}

// TestRetentionPrunesWhatNoHoldKeeps: a pass prunes the old bodies of the
// full bundle and keeps held and young ones; pruned receipts are still
// found and their inclusion verifies with the client's token; the tiles
// and the partial bundle are untouched, the partial copies of the pruned
// bundle are gone, and a second pass changes nothing.
func TestRetentionPrunesWhatNoHoldKeeps(t *testing.T) {
	ctx := context.Background()
	const (
		byID, byCaller1, byCaller2, young, expired = 5, 10, 11, 30, 40
		rangeFrom, rangeUntil                      = 20, 25 // receipts 20–24
		inPartial                                  = 270
	)
	rl := newRetentionLog(t, map[int]bool{young: true}, map[int]string{byCaller1: "spiffe://example.org/held", byCaller2: "spiffe://example.org/held", 12: "spiffe://example.org/other"})
	s := rl.s
	if _, err := s.Prune(ctx, rl.cutoff); !errors.Is(err, ErrHoldsUnknown) {
		t.Fatalf("a pass before the holds are known: %v, want ErrHoldsUnknown", err)
	}
	if b := bundleWhenIntegrated(t, s, rl.ids[0]); b.Pruned {
		t.Fatal("pruned before the holds were known")
	}
	hs, err := NewHoldSet([]Hold{
		{Kind: HoldReceipt, ReceiptID: rl.ids[byID]},
		{Kind: HoldCaller, Caller: "spiffe://example.org/held", Expires: time.Now().Add(time.Hour)},
		{Kind: HoldTimeRange, From: rl.base.Add(rangeFrom), Until: rl.base.Add(rangeUntil)},
		{Kind: HoldReceipt, ReceiptID: rl.ids[expired], Expires: time.Now().Add(-time.Second)},
	})
	if err != nil {
		t.Fatal(err)
	}
	s.SetHolds(hs)

	logDir := filepath.Join(rl.dir, "log")
	tiles := snapshot(t, logDir, tileFiles)
	partial := snapshot(t, filepath.Join(logDir, "tile", "entries"), func(rel string) bool { return !strings.HasPrefix(rel, "001") })
	if len(partial) == 0 {
		t.Fatal("no partial bundle 001 on disk")
	}
	bundle0 := s.rlog.bundlePath(0)

	st, err := s.Prune(ctx, rl.cutoff)
	if err != nil {
		t.Fatal(err)
	}
	kept := map[int]bool{byID: true, byCaller1: true, byCaller2: true, young: true}
	for i := rangeFrom; i < rangeUntil; i++ {
		kept[i] = true
	}
	if want := layoutWidth - len(kept); st.Pruned != want || st.Held != len(kept)-1 {
		t.Fatalf("pass: %+v, want %d pruned and %d held", st, want, len(kept)-1)
	}
	if got := s.PrunedTotal(); got != uint64(st.Pruned) {
		t.Fatalf("pruned total %d, want %d", got, st.Pruned)
	}
	if got := s.HeldPastRetention(); got != int64(len(kept)-1) {
		t.Fatalf("held past retention %d, want %d", got, len(kept)-1)
	}
	keys, _ := s.Published()
	for i := range layoutWidth {
		b := bundleWhenIntegrated(t, s, rl.ids[i])
		if kept[i] {
			if b.Pruned {
				t.Fatalf("receipt %d was kept by a hold or its age, and was pruned", i)
			}
			mustProve(t, fmt.Sprintf("kept receipt %d", i), s, b, rl.ids[i])
			continue
		}
		mustVerifyPruned(t, fmt.Sprintf("receipt %d", i), b, rl.toks[i], keys)
		if b.Token == "" {
			t.Fatalf("pruned receipt %d lost its token", i)
		}
		mustVerifyPruned(t, fmt.Sprintf("receipt %d with the token from the bundle", i), b, b.Token, keys)
	}
	if b := bundleWhenIntegrated(t, s, rl.ids[inPartial]); b.Pruned {
		t.Fatal("a receipt of the partial bundle was pruned")
	}
	raw, err := os.ReadFile(bundle0)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(raw, []byte("/person/7")) {
		t.Fatal("a pruned path is still in the bundle file")
	}
	if _, err := os.Stat(bundle0 + ".p"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("the pruned bundle's partial copies are still there: %v", err)
	}
	sameFiles(t, "tiles", tiles, snapshot(t, logDir, tileFiles))
	sameFiles(t, "partial bundle", partial, snapshot(t, filepath.Join(logDir, "tile", "entries"), func(rel string) bool { return !strings.HasPrefix(rel, "001") }))
	cp, _, err := s.rlog.Checkpoint(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, from := range []uint64{1, 100, 256} {
		if _, err := s.Consistency(ctx, from, cp.Size); err != nil {
			t.Fatalf("consistency %d→%d after pruning: %v", from, cp.Size, err)
		}
	}

	// Idempotent: nothing more to prune, and the file is not rewritten.
	fi0, _ := os.Stat(bundle0)
	st, err = s.Prune(ctx, rl.cutoff)
	if err != nil || st.Pruned != 0 {
		t.Fatalf("second pass: %+v %v, want nothing pruned", st, err)
	}
	if fi1, _ := os.Stat(bundle0); !os.SameFile(fi0, fi1) {
		t.Fatal("the second pass rewrote the bundle")
	}

	// The young one ages, the id hold is lifted: the next passes prune
	// them, and keep what is still held.
	hs, _ = NewHoldSet([]Hold{
		{Kind: HoldCaller, Caller: "spiffe://example.org/held", Expires: time.Now().Add(time.Hour)},
		{Kind: HoldTimeRange, From: rl.base.Add(rangeFrom), Until: rl.base.Add(rangeUntil)},
	})
	s.SetHolds(hs)
	if st, err = s.Prune(ctx, rl.cutoff); err != nil || st.Pruned != 1 {
		t.Fatalf("after lifting a hold: %+v %v, want 1 pruned", st, err)
	}
	if b := bundleWhenIntegrated(t, s, rl.ids[byID]); !b.Pruned {
		t.Fatal("the receipt whose hold was lifted was kept")
	}
	if st, err = s.Prune(ctx, time.Now().Add(time.Second)); err != nil || st.Pruned != 1 {
		t.Fatalf("once the young receipt is old: %+v %v, want 1 pruned", st, err)
	}
	for _, i := range []int{young, byCaller1, rangeFrom} {
		if b := bundleWhenIntegrated(t, s, rl.ids[i]); b.Pruned != (i == young) {
			t.Fatalf("receipt %d: pruned %v", i, b.Pruned)
		}
	}

	// The journal's last segment, whose receipts are all in the log, goes
	// too: it held the same bodies.
	journal := filepath.Join(rl.dir, "journal")
	err = poll(10*time.Second, func() error {
		if _, err := s.Prune(ctx, rl.cutoff); err != nil {
			return err
		}
		es, err := os.ReadDir(journal)
		if err != nil {
			return err
		}
		if len(es) > 0 {
			return fmt.Errorf("%d journal segments left", len(es))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Issue(ctx, &Receipt{Time: time.Now().UnixNano(), Method: "GET", Path: "/after", Status: 200}); err != nil {
		t.Fatalf("issuing after the idle segment went: %v", err)
	}
}

// TestPrunedReceiptsSurviveRestartAndReindex: after a restart, and after
// losing the index (every entry rescanned, tombstones included), pruned
// receipts are found, their inclusion verifies with the client's token,
// and a pass finds nothing more to prune.
func TestPrunedReceiptsSurviveRestartAndReindex(t *testing.T) {
	ctx := context.Background()
	rl := newRetentionLog(t, nil, nil)
	s := rl.s
	hs, _ := NewHoldSet([]Hold{{Kind: HoldReceipt, ReceiptID: rl.ids[3]}})
	s.SetHolds(hs)
	if st, err := s.Prune(ctx, rl.cutoff); err != nil || st.Pruned != layoutWidth-1 {
		t.Fatalf("pass: %+v %v", st, err)
	}
	signer := s.signer.Load().Signer
	for _, loseIndex := range []bool{false, true} {
		rl.s = nil
		if err := s.Close(ctx); err != nil {
			t.Fatal(err)
		}
		if loseIndex {
			if err := os.Remove(filepath.Join(rl.dir, "index.db")); err != nil {
				t.Fatal(err)
			}
		}
		s = openTestService(t, rl.dir, signer)
		rl.s = s
		keys, _ := s.Published()
		for _, i := range []int{0, 100, 255} {
			b := bundleWhenIntegrated(t, s, rl.ids[i])
			if loseIndex && b.Token != "" {
				t.Fatalf("a rescan invented a token for receipt %d", i)
			}
			mustVerifyPruned(t, fmt.Sprintf("receipt %d after a restart (index lost: %v)", i, loseIndex), b, rl.toks[i], keys)
		}
		mustProve(t, "the held receipt", s, bundleWhenIntegrated(t, s, rl.ids[3]), rl.ids[3])
		s.SetHolds(hs)
		if st, err := s.Prune(ctx, rl.cutoff); err != nil || st.Pruned != 0 {
			t.Fatalf("a pass after a restart (index lost: %v): %+v %v, want nothing pruned", loseIndex, st, err)
		}
	}
}

// TestRetentionRefusesAnEntryThatIsNotTheTreesLeaf: a bundle whose entry
// does not hash to the tile's leaf is left alone (its tombstone would
// carry the wrong leaf), and the pass says so.
func TestRetentionRefusesAnEntryThatIsNotTheTreesLeaf(t *testing.T) {
	ctx := context.Background()
	rl := newRetentionLog(t, nil, nil)
	s := rl.s
	path := s.rlog.bundlePath(0)
	raw, _ := os.ReadFile(path)
	bad := bytes.Replace(raw, []byte("/person/9"), []byte("/person/X"), 1)
	if bytes.Equal(bad, raw) {
		t.Fatal("nothing to damage")
	}
	if err := os.WriteFile(path, bad, 0o644); err != nil {
		t.Fatal(err)
	}
	hs, _ := NewHoldSet(nil)
	s.SetHolds(hs)
	if _, err := s.Prune(ctx, rl.cutoff); err == nil || !strings.Contains(err.Error(), "does not hash to the tree's leaf") {
		t.Fatalf("pass over a damaged bundle: %v", err)
	}
	if got, _ := os.ReadFile(path); !bytes.Equal(got, bad) {
		t.Fatal("the damaged bundle was rewritten")
	}
}

func TestTombstoneIsNeverAReceipt(t *testing.T) {
	id, leaf := [16]byte{1, 2}, [32]byte{3, 4}
	ts := tombstone(id, leaf)
	if gid, gleaf, ok := ParseTombstone(ts); !ok || gid != id || gleaf != leaf {
		t.Fatal("tombstone does not round-trip")
	}
	if _, err := Decode(ts); err == nil {
		t.Fatal("a tombstone decodes as a receipt")
	}
	r := sample()
	enc, _ := r.Encode()
	for _, b := range [][]byte{enc, ts[:len(ts)-1], append(bytes.Clone(ts), 0)} {
		if _, _, ok := ParseTombstone(b); ok {
			t.Fatalf("%q parsed as a tombstone", b)
		}
	}
	if got, err := entryID(ts); err != nil || got != id {
		t.Fatalf("entryID: %x %v", got, err)
	}
}

func TestHoldSetSelects(t *testing.T) {
	now := time.Now()
	long := strings.Repeat("x", maxInline+1)
	hs, err := NewHoldSet([]Hold{
		{Kind: HoldReceipt, ReceiptID: [16]byte{1}, Expires: now.Add(-time.Second)},
		{Kind: HoldReceipt, ReceiptID: [16]byte{1}, Expires: now.Add(time.Hour)}, // the longer one counts
		{Kind: HoldCaller, Caller: long},
		{Kind: HoldTimeRange, From: now.Add(-time.Hour), Until: now.Add(-time.Minute)},
		{Kind: HoldTimeRange, From: now.Add(time.Hour)}, // open-ended
	})
	if err != nil {
		t.Fatal(err)
	}
	enc, _ := (&Receipt{Caller: long}).Encode()
	digested, err := Decode(enc)
	if err != nil || digested.Digested.Caller.isZero() {
		t.Fatalf("a long caller is not digested: %v", err)
	}
	for name, c := range map[string]struct {
		r    Receipt
		want bool
	}{
		"id":               {Receipt{ID: [16]byte{1}}, true},
		"other id":         {Receipt{ID: [16]byte{2}}, false},
		"digested caller":  {digested, true},
		"in range":         {Receipt{Time: now.Add(-30 * time.Minute).UnixNano()}, true},
		"range end":        {Receipt{Time: now.Add(-time.Minute).UnixNano()}, false},
		"range start":      {Receipt{Time: now.Add(-time.Hour).UnixNano()}, true},
		"open-ended range": {Receipt{Time: now.Add(100 * time.Hour).UnixNano()}, true},
	} {
		if got := hs.Holds(&c.r, now); got != c.want {
			t.Errorf("%s: held %v, want %v", name, got, c.want)
		}
	}
	if hs.Holds(&Receipt{ID: [16]byte{1}}, now.Add(2*time.Hour)) {
		t.Error("an expired hold still holds")
	}
	if !hs.expiresWithin(now, now.Add(2*time.Hour)) || hs.expiresWithin(now.Add(2*time.Hour), now.Add(3*time.Hour)) {
		t.Error("expiresWithin")
	}
	// A set covers another when it keeps all it kept, as long.
	set := func(hs ...Hold) *HoldSet { s, _ := NewHoldSet(hs); return s }
	a := Hold{Kind: HoldReceipt, ReceiptID: [16]byte{1}, Expires: now.Add(time.Hour)}
	r := Hold{Kind: HoldTimeRange, From: now, Until: now.Add(time.Hour)}
	c := Hold{Kind: HoldCaller, Caller: "spiffe://a.org/b"}
	longer, shorter, forever := a, a, a
	longer.Expires, shorter.Expires, forever.Expires = now.Add(2*time.Hour), now.Add(time.Minute), time.Time{}
	for name, tc := range map[string]struct {
		now, old *HoldSet
		want     bool
	}{
		"a hold added":      {set(a, r, c), set(a, r), true},
		"the same":          {set(a, r, c), set(c, r, a), true},
		"a longer expiry":   {set(longer, r), set(a, r), true},
		"until lifted":      {set(forever), set(a), true},
		"a hold lifted":     {set(a, r), set(a, r, c), false},
		"a range lifted":    {set(a, c), set(a, r, c), false},
		"a shorter expiry":  {set(shorter), set(a), false},
		"an expiry set":     {set(a), set(forever), false},
		"another range end": {set(Hold{Kind: HoldTimeRange, From: now, Until: now.Add(time.Minute)}), set(r), false},
	} {
		if got := tc.now.covers(tc.old); got != tc.want {
			t.Errorf("%s: covers %v, want %v", name, got, tc.want)
		}
	}
	for _, bad := range []Hold{{Kind: 9}, {Kind: HoldCaller}, {Kind: HoldTimeRange, From: now, Until: now}} {
		if _, err := NewHoldSet([]Hold{bad}); err == nil {
			t.Errorf("%+v accepted", bad)
		}
	}
}

// poll calls f until it returns nil or the deadline passes.
func poll(timeout time.Duration, f func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(50 * time.Millisecond) // poll period
	}
}

// TestVerifyPrunedBundle: a pruned bundle verifies on the token's leaf
// hash and says so; one that claims to be pruned but carries a body, or a
// leaf hash other than the token's, or a token whose leaf is not in the
// tree, fails, naming the check.
func TestVerifyPrunedBundle(t *testing.T) {
	b, k := issue(t)
	tok, _ := ParseToken(b.Token)
	pruned := b
	pruned.Receipt, pruned.Decoded, pruned.Pruned, pruned.LeafHash = nil, nil, true, tok.LeafHash[:]
	cs := Verify(pruned, k)
	if last := cs[len(cs)-1]; last.Err != nil || last.Name != "inclusion" {
		t.Fatalf("pruned bundle: %s: %v", last.Name, last.Err)
	}
	for _, name := range []string{"pruned", "certificate"} {
		if c, ok := checkNamed(cs, name); !ok || c.Note == "" {
			t.Fatalf("check %s carries no note on a pruned body: %+v", name, cs)
		}
	}
	withBody := pruned
	withBody.Receipt = b.Receipt
	otherLeaf := pruned
	otherLeaf.LeafHash = make([]byte, 32)
	notPruned := pruned
	notPruned.Pruned = false
	forged := pruned
	ft := tok
	ft.LeafHash[0] ^= 1
	forged.Token, forged.LeafHash = ft.String(), nil
	for name, c := range map[string]struct {
		b    Bundle
		want string
	}{
		"a body in a pruned bundle":  {withBody, "pruned"},
		"another leaf hash":          {otherLeaf, "pruned"},
		"no body, not marked pruned": {notPruned, "receipt"},
		"a token for another leaf":   {forged, "signature"},
	} {
		if got, ok := failed(Verify(c.b, k)); !ok || got != c.want {
			t.Errorf("%s: failed at %q (%v), want %q", name, got, ok, c.want)
		}
	}
}

// TestRetentionWaitsForTheMirrors: nothing a peer's mirror does not hold
// yet is pruned (its copy would be a tombstone that is not the leaf);
// once the mirrors hold the bundle, it is.
func TestRetentionWaitsForTheMirrors(t *testing.T) {
	ctx := context.Background()
	rl := newRetentionLog(t, nil, nil)
	s := rl.s
	hs, err := NewHoldSet(nil)
	if err != nil {
		t.Fatal(err)
	}
	s.SetHolds(hs)
	var held atomic.Uint64
	held.Store(255) // one short of the first full bundle
	s.SetPruneBound(held.Load)
	if st, err := s.Prune(ctx, rl.cutoff); err != nil || st.Pruned != 0 {
		t.Fatalf("with the mirrors one entry short of bundle 0: %+v %v", st, err)
	}
	if b := bundleWhenIntegrated(t, s, rl.ids[0]); b.Pruned {
		t.Fatal("a receipt no mirror holds yet was pruned")
	}
	held.Store(retentionEntries)
	if st, err := s.Prune(ctx, rl.cutoff); err != nil || st.Pruned != 256 {
		t.Fatalf("once the mirrors hold bundle 0: %+v %v", st, err)
	}
}
