package receipt

import (
	"context"
	"crypto/x509"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/knhk/knhk/pkg/kms"
)

// issue builds one receipt end to end: delegated key, durable append,
// token, checkpoint and proof, as knhk serves them.
func issue(t *testing.T) (Bundle, PublishedKeys) {
	t.Helper()
	ctx := context.Background()
	dir := t.TempDir()
	signer, err := kms.OpenLocal(filepath.Join(dir, "kms.key"))
	if err != nil {
		t.Fatal(err)
	}
	keys, err := OpenKeys(ctx, filepath.Join(dir, "keys"), signer, time.Hour, "eu-west-1", "knhk-0", slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ns, vkey, err := NewNoteSigner("knhk.test/log", signer)
	if err != nil {
		t.Fatal(err)
	}
	l, err := OpenLog(ctx, filepath.Join(dir, "log"), ns, []string{vkey}, LogOptions{CheckpointInterval: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = l.Close(ctx) }()
	for i := range 5 { // neighbours, so the inclusion proof is not empty
		f := sample()
		f.Status = uint16(i)
		fe, _ := f.Encode()
		if _, err := l.Append(ctx, fe); err != nil {
			t.Fatal(err)
		}
	}
	r := sample()
	r.Time = time.Now().UnixNano()
	enc, _ := r.Encode()
	idx, err := l.Append(ctx, enc)
	if err != nil {
		t.Fatal(err)
	}
	d := keys.Current()
	// Sealed in a batch with two others, so its audit path is not empty.
	leaves := [][32]byte{{1}, LeafHash(enc), {3}}
	seal, paths := sealBatch(7, leaves, d.KeyID, d.Key)
	tok := batchToken(r.ID, leaves[1], &seal, 1, paths[1])
	var raw []byte
	var size uint64
	deadline := time.Now().Add(10 * time.Second)
	for size <= idx {
		cp, b, err := l.Checkpoint(ctx)
		if err == nil {
			size, raw = cp.Size, b
		}
		if time.Now().After(deadline) {
			t.Fatal("no checkpoint")
		}
		time.Sleep(20 * time.Millisecond) // poll period
	}
	p, err := l.InclusionProof(ctx, idx, size)
	if err != nil {
		t.Fatal(err)
	}
	der, _ := x509.MarshalPKIXPublicKey(signer.Public())
	return Bundle{Token: tok.String(), Receipt: enc, Index: idx, Proof: p, Checkpoint: string(raw)},
		PublishedKeys{LogVerifierKey: vkey, KMS: map[string][]byte{signer.KeyID(): der}, Certificates: keys.Published()}
}

func failed(cs []Check) (string, bool) {
	last := cs[len(cs)-1]
	return last.Name, last.Err != nil
}

func TestVerifyPassesAndTamperingNamesTheCheck(t *testing.T) {
	b, k := issue(t)
	cs := Verify(b, k)
	if name, bad := failed(cs); bad || len(cs) != 6 {
		t.Fatalf("a genuine receipt failed at %s: %v", name, cs[len(cs)-1].Err)
	}
	flip := func(s []byte, i int) []byte { c := append([]byte(nil), s...); c[i] ^= 1; return c }
	cases := map[string]func(Bundle, PublishedKeys) (Bundle, PublishedKeys){
		"token": func(b Bundle, k PublishedKeys) (Bundle, PublishedKeys) {
			b.Token = b.Token[:10] + map[bool]string{true: "B", false: "A"}[b.Token[10] == 'A'] + b.Token[11:]
			return b, k
		},
		"receipt": func(b Bundle, k PublishedKeys) (Bundle, PublishedKeys) { b.Receipt = flip(b.Receipt, 30); return b, k },
		"inclusion": func(b Bundle, k PublishedKeys) (Bundle, PublishedKeys) {
			b.Index++ // proof for another position
			return b, k
		},
		"checkpoint": func(b Bundle, k PublishedKeys) (Bundle, PublishedKeys) {
			b.Checkpoint = string(flip([]byte(b.Checkpoint), 20))
			return b, k
		},
		"certificate": func(b Bundle, k PublishedKeys) (Bundle, PublishedKeys) {
			c := append([]PublishedCert(nil), k.Certificates...)
			c[0].Region = "elsewhere"
			k.Certificates = c
			return b, k
		},
	}
	for want, tamper := range cases {
		tb, tk := tamper(b, k)
		cs := Verify(tb, tk)
		name, bad := failed(cs)
		// A changed token byte may land in the id/leaf part (then the receipt
		// no longer matches) or in the signature; both must fail, and the
		// first failing check is the one reported.
		tokenLike := name == "receipt" || name == "signature" || name == "certificate"
		if !bad || (name != want && (want != "token" || !tokenLike)) {
			t.Errorf("tampered %s: failed at %q (%v)", want, name, cs[len(cs)-1].Err)
		}
	}
	if len(b.Proof) == 0 {
		t.Fatal("empty inclusion proof: the tamper case below would prove nothing")
	}
	{
		tb := b
		tb.Proof = append([][]byte(nil), b.Proof...)
		tb.Proof[0] = flip(tb.Proof[0], 0)
		if name, bad := failed(Verify(tb, k)); !bad || name != "inclusion" {
			t.Errorf("tampered proof: failed at %q", name)
		}
	}
}
