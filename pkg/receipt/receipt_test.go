package receipt

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/knhk/knhk/pkg/kms"
)

func sample() Receipt {
	r := Receipt{Time: 1_700_000_000_123_456_789, Method: "GET", Authority: "shop.example", Path: "/api/cart?x=1",
		Status: 200, DurationUs: 1234, Version: "canary", Class: "R1", Decision: "admitted",
		Caller: "spiffe://example.org/frontend", Region: "eu-west-1"}
	copy(r.ID[:], "0123456789abcdef")
	r.ReqHeaders[0], r.ResHeaders[31] = 1, 2
	return r
}

func TestEncodingIsCanonicalAndRoundTrips(t *testing.T) {
	r := sample()
	a, err := r.Encode()
	if err != nil {
		t.Fatal(err)
	}
	b, _ := r.Encode()
	if !bytes.Equal(a, b) {
		t.Fatal("same receipt, different bytes")
	}
	back, err := Decode(a)
	if err != nil {
		t.Fatal(err)
	}
	if back != r {
		t.Fatalf("round trip changed the receipt:\n%+v\n%+v", back, r)
	}
	r2 := r
	r2.Status = 503
	c, _ := r2.Encode()
	if LeafHash(a) == LeafHash(c) {
		t.Fatal("different receipts, same leaf hash")
	}
	// RFC 6962: the leaf hash is SHA-256 of 0x00 ‖ data.
	if LeafHash(nil) != [32]byte{0x6e, 0x34, 0x0b, 0x9c, 0xff, 0xb3, 0x7a, 0x98, 0x9c, 0xa5, 0x44, 0xe6, 0xbb, 0x78, 0x0a, 0x2c, 0x78, 0x90, 0x1d, 0x3f, 0xb3, 0x37, 0x38, 0x76, 0x85, 0x11, 0xa3, 0x06, 0x17, 0xaf, 0xa0, 0x1d} {
		t.Fatal("leaf hash of the empty leaf is not RFC 6962's")
	}
}

func TestDecodeRejectsMalformed(t *testing.T) {
	r := sample()
	good, _ := r.Encode()
	cases := map[string][]byte{
		"truncated":      good[:len(good)-1],
		"trailing bytes": append(append([]byte{}, good...), 0),
		"version":        append([]byte{9}, good[1:]...),
		"empty":          nil,
	}
	for name, b := range cases {
		if _, err := Decode(b); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: %v", name, err)
		}
	}
}

// TestOversizedFieldsAreDigested: a string field over the inline limit is
// recorded as its length and SHA-256 — never refused — and the encoding
// stays canonical: it decodes, re-encodes to the same bytes, and differs
// from a receipt with a different long value.
func TestOversizedFieldsAreDigested(t *testing.T) {
	long := func(n int, c string) string { return strings.Repeat(c, n) }
	r := sample()
	r.Path = "/" + long(9<<10, "p")   // a 9 KiB path
	r.Authority = long(60<<10, "a")   // a 60 KiB authority
	r.Caller = long(maxInline, "c")   // exactly the limit: inline
	r.Method = long(maxInline+1, "M") // one over: digested
	enc, err := r.Encode()
	if err != nil {
		t.Fatalf("oversized fields refused: %v", err)
	}
	if len(enc) > 2*maxInline {
		t.Fatalf("encoding is %d bytes: the long fields were not digested", len(enc))
	}
	again, _ := r.Encode()
	if !bytes.Equal(enc, again) {
		t.Fatal("same receipt, different bytes")
	}
	back, err := Decode(enc)
	if err != nil {
		t.Fatal(err)
	}
	if back.Path != "" || back.Authority != "" || back.Method != "" || back.Caller != r.Caller || back.Region != r.Region {
		t.Fatalf("decoded strings: path %d bytes, authority %d, method %d, caller %d", len(back.Path), len(back.Authority), len(back.Method), len(back.Caller))
	}
	for name, c := range map[string]struct {
		d FieldDigest
		v string
	}{"path": {back.Digested.Path, r.Path}, "authority": {back.Digested.Authority, r.Authority}, "method": {back.Digested.Method, r.Method}} {
		if c.d.Len != uint64(len(c.v)) || c.d.SHA256 != sha256.Sum256([]byte(c.v)) || !c.d.Matches(c.v) || c.d.Matches(c.v[1:]) {
			t.Errorf("%s digest: %+v", name, c.d)
		}
	}
	if back.Digested.Caller != (FieldDigest{}) {
		t.Error("a field of exactly the limit was digested")
	}
	reenc, err := back.Encode()
	if err != nil || !bytes.Equal(reenc, enc) {
		t.Fatalf("a decoded digested receipt does not re-encode to its bytes: %v", err)
	}
	other := r
	other.Path = r.Path[:len(r.Path)-1] + "q"
	oenc, _ := other.Encode()
	if LeafHash(oenc) == LeafHash(enc) {
		t.Fatal("two different long paths, one leaf hash")
	}
	// A digest given for a value that would be inline is not canonical.
	bad := back
	bad.Digested.Region = FieldDigest{Len: 3}
	if _, err := bad.Encode(); err == nil {
		t.Fatal("a digest of a short field encoded")
	}
	both := back
	both.Path = "/short"
	if _, err := both.Encode(); err == nil {
		t.Fatal("a field with both a value and a digest encoded")
	}

	view := back.View()
	if _, ok := view["path"]; ok || view["path_len"] != uint64(len(r.Path)) || view["path_sha256"] != hex.EncodeToString(back.Digested.Path.SHA256[:]) {
		t.Fatalf("the view does not show the path as digested: path_len %v, path_sha256 %v", view["path_len"], view["path_sha256"])
	}
	if view["caller"] != r.Caller || view["region"] != r.Region {
		t.Fatal("the view lost an inline field")
	}
	if sv := sample(); sv.View()["path"] != sv.Path {
		t.Fatal("the view lost an inline path")
	}
}

func TestTokenRoundTripAndTamper(t *testing.T) {
	pub, priv, _ := ed25519.GenerateKey(nil)
	r := sample()
	enc, _ := r.Encode()
	c := Cert{PublicKey: pub}
	leaf := LeafHash(enc)
	toks := map[string]Token{"kr1": signKR1(r.ID, leaf, c.KeyID(), priv)}
	for _, n := range []int{1, 2, 5, 100, maxBatch} {
		leaves := make([][32]byte, n)
		for i := range leaves {
			leaves[i] = [32]byte{byte(i), byte(i >> 8), 7}
		}
		at := n - 1 // the last leaf of a full batch has the longest path
		leaves[at] = leaf
		seal, paths := sealBatch(uint64(n), leaves, c.KeyID(), priv)
		toks[fmt.Sprintf("kr2 leaf %d of %d", at, n)] = batchToken(r.ID, leaf, &seal, at, paths[at])
	}
	for name, tok := range toks {
		s := tok.String()
		if len(s) > TokenLen || TokenLen > 512 {
			t.Fatalf("%s: token is %d bytes (TokenLen %d)", name, len(s), TokenLen)
		}
		back, err := ParseToken(s)
		if err != nil || !reflect.DeepEqual(back, tok) || !back.VerifySignature(pub) {
			t.Fatalf("%s: round trip: %v", name, err)
		}
		// Every single-character change is unparseable, changes the id or
		// the key id (which the signature does not cover: Verify matches
		// the id against the receipt's bytes and the key id picks the
		// certificate), or fails the signature.
		for i := len("krN."); i < len(s); i++ {
			b := []byte(s)
			b[i] = map[bool]byte{true: 'A', false: 'B'}[b[i] != 'A']
			x, err := ParseToken(string(b))
			if err != nil || x.ID != tok.ID || x.KeyID != tok.KeyID {
				continue
			}
			if x.VerifySignature(pub) {
				t.Fatalf("%s: change at %d still verifies", name, i)
			}
		}
	}
	// A size the path length cannot rule out: leaf 0 of 7 has the same
	// path (and root) as leaf 0 of 8, so only the signed size tells them
	// apart.
	{
		leaves := make([][32]byte, 7)
		leaves[0] = leaf
		seal, paths := sealBatch(9, leaves, c.KeyID(), priv)
		x := batchToken(r.ID, leaf, &seal, 0, paths[0])
		x.BatchSize = 8
		if x.VerifySignature(pub) {
			t.Fatal("a token claiming a batch of 8 for a batch of 7 still verifies")
		}
	}
	// Field by field, for the batch fields, through the decoded token.
	tok := toks["kr2 leaf 4 of 5"]
	tamper := map[string]func(*Token){
		"path hash":  func(t *Token) { t.Path[0][3] ^= 1 },
		"path cut":   func(t *Token) { t.Path = t.Path[:len(t.Path)-1] },
		"batch size": func(t *Token) { t.BatchSize = 6 },
		"leaf index": func(t *Token) { t.LeafIndex = 3 },
		"batch id":   func(t *Token) { t.BatchID++ },
		"signature":  func(t *Token) { t.Signature[9] ^= 1 },
		"leaf":       func(t *Token) { t.LeafHash[0] ^= 1 },
		"version":    func(t *Token) { t.Batched = false },
	}
	for name, f := range tamper {
		x := tok
		x.Path = slices.Clone(tok.Path)
		f(&x)
		if x.VerifySignature(pub) {
			t.Errorf("tampered %s still verifies", name)
		}
	}
	if !tok.VerifySignature(pub) {
		t.Fatal("the tamper cases changed the original")
	}
	// Well formed but one path hash too long: only the length cap refuses it.
	long := toks[fmt.Sprintf("kr2 leaf %d of %d", maxBatch-1, maxBatch)]
	long.Path = append(slices.Clone(long.Path), [32]byte{})
	for _, bad := range []string{"", "kr3.AAAA", "kr1.!!!", "kr1.AAAA", "kr2.AAAA", long.String()} {
		if _, err := ParseToken(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

// TestBatchPathsMatchTheLibrary: every leaf's audit path, in batches of
// every size up to maxBatch, is the one transparency-dev/merkle verifies
// against the batch root.
func TestBatchPathsMatchTheLibrary(t *testing.T) {
	for n := 1; n <= maxBatch; n++ {
		leaves := make([][32]byte, n)
		for i := range leaves {
			leaves[i] = LeafHash([]byte(fmt.Sprint(n, i)))
		}
		paths := make([][][32]byte, n)
		root := treeHash(leaves, paths)
		for i := range leaves {
			got, err := batchRoot(leaves[i], i, n, paths[i])
			if err != nil || !bytes.Equal(got, root[:]) {
				t.Fatalf("leaf %d of %d: %v", i, n, err)
			}
			if len(paths[i]) > maxPath {
				t.Fatalf("leaf %d of %d: path of %d hashes, over %d", i, n, len(paths[i]), maxPath)
			}
		}
	}
}

// TestBatchRecordRejectsDamage: a journal batch record cut short, with
// bytes after it or a count out of range is refused with a reason, never
// read past its end.
func TestBatchRecordRejectsDamage(t *testing.T) {
	_, priv, _ := ed25519.GenerateKey(nil)
	encs := [][]byte{[]byte("one"), []byte("two")}
	seal, _ := sealBatch(1, [][32]byte{LeafHash(encs[0]), LeafHash(encs[1])}, [8]byte{1}, priv)
	rec := appendBatchRecord(nil, &seal, encs)
	got, gotEncs, err := parseBatchRecord(rec)
	if err != nil || !reflect.DeepEqual(got, seal) || !reflect.DeepEqual(gotEncs, encs) {
		t.Fatalf("round trip: %v", err)
	}
	for i := range len(rec) {
		if _, _, err := parseBatchRecord(rec[:i]); err == nil {
			t.Fatalf("cut at %d of %d accepted", i, len(rec))
		}
	}
	if _, _, err := parseBatchRecord(append(slices.Clone(rec), 0)); err == nil {
		t.Fatal("a trailing byte was accepted")
	}
}

func TestDelegationCertificate(t *testing.T) {
	signer, err := kms.OpenLocal(filepath.Join(t.TempDir(), "kms.key"))
	if err != nil {
		t.Fatal(err)
	}
	pub, _, _ := ed25519.GenerateKey(nil)
	now := time.Unix(1_700_000_000, 0)
	sc, err := Certify(context.Background(), signer, pub, now, 12*time.Hour, "eu-west-1", "knhk-0")
	if err != nil {
		t.Fatal(err)
	}
	if err := sc.Verify(signer.Public(), now.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	for name, at := range map[string]time.Time{"before": now.Add(-time.Second), "after": now.Add(12 * time.Hour)} {
		if err := sc.Verify(signer.Public(), at); !errors.Is(err, ErrCertificate) {
			t.Errorf("%s validity: %v", name, err)
		}
	}
	tampered := sc
	tampered.Cert.Region = "us-east-1"
	if err := tampered.Verify(signer.Public(), now.Add(time.Hour)); !errors.Is(err, ErrCertificate) {
		t.Fatalf("changed region verified: %v", err)
	}
	if _, err := Certify(context.Background(), signer, pub, now, 25*time.Hour, "r", "i"); err == nil {
		t.Fatal("a 25 h delegation was issued")
	}
}

func FuzzParseToken(f *testing.F) {
	pub, priv, _ := ed25519.GenerateKey(nil)
	f.Add(signKR1([16]byte{1}, [32]byte{2}, [8]byte{3}, priv).String())
	seal, paths := sealBatch(5, make([][32]byte, 5), [8]byte{3}, priv)
	f.Add(batchToken([16]byte{1}, [32]byte{}, &seal, 4, paths[4]).String())
	f.Add("kr1.")
	f.Add("kr2.")
	f.Fuzz(func(t *testing.T, s string) {
		tok, err := ParseToken(s)
		if err != nil {
			return
		}
		_ = tok.VerifySignature(pub)
		if back, err := ParseToken(tok.String()); err != nil || !reflect.DeepEqual(back, tok) {
			t.Fatalf("re-encoding a parsed token changed it: %v", err)
		}
	})
}

func FuzzDecode(f *testing.F) {
	r := sample()
	good, _ := r.Encode()
	f.Add(good)
	r.Path = strings.Repeat("p", maxInline+1)
	digested, _ := r.Encode()
	f.Add(digested)
	f.Add([]byte{1})
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := Decode(b)
		if err != nil {
			return
		}
		enc, err := r.Encode()
		if err != nil || !bytes.Equal(enc, b) {
			t.Fatalf("decoded bytes do not re-encode to themselves: %v", err)
		}
	})
}

func discard() *slog.Logger { return slog.New(slog.DiscardHandler) }

func FuzzParseBatchRecord(f *testing.F) {
	_, priv, _ := ed25519.GenerateKey(nil)
	encs := [][]byte{[]byte("a"), []byte("bc")}
	seal, _ := sealBatch(1, [][32]byte{LeafHash(encs[0]), LeafHash(encs[1])}, [8]byte{1}, priv)
	f.Add(appendBatchRecord(nil, &seal, encs))
	f.Add(batchRecordMagic[:])
	f.Fuzz(func(t *testing.T, b []byte) {
		s, encs, err := parseBatchRecord(b)
		if err != nil {
			return
		}
		if len(encs) != len(s.Leaves) || !bytes.Equal(appendBatchRecord(nil, &s, encs), b) {
			t.Fatal("a parsed batch record does not re-encode to itself")
		}
	})
}

// TestDelegatedKeyCoversRequestsJustBeforeIt: a receipt is dated by its
// request's start and signed by the key current when its batch commits;
// a key certified just after a request began still covers it.
func TestDelegatedKeyCoversRequestsJustBeforeIt(t *testing.T) {
	signer, err := kms.OpenLocal(filepath.Join(t.TempDir(), "kms.key"))
	if err != nil {
		t.Fatal(err)
	}
	keys, err := OpenKeys(context.Background(), filepath.Join(t.TempDir(), "keys"), signer, time.Hour, "r", "i", discard())
	if err != nil {
		t.Fatal(err)
	}
	c := keys.Current().Cert
	if err := c.Verify(signer.Public(), time.Now().Add(-30*time.Second)); err != nil {
		t.Fatalf("a request begun 30 s before its key was certified: %v", err)
	}
}
