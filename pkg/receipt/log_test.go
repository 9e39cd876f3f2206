package receipt

import (
	"bytes"
	"context"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/transparency-dev/merkle/compact"
	"github.com/transparency-dev/merkle/rfc6962"

	"github.com/knhk/knhk/pkg/kms"
)

func openTestLog(t *testing.T, dir string, signer kms.Signer) *Log {
	t.Helper()
	ns, vkey, err := NewNoteSigner("knhk.test/log", signer)
	if err != nil {
		t.Fatal(err)
	}
	l, err := OpenLog(context.Background(), dir, ns, []string{vkey}, LogOptions{CheckpointInterval: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// TestLogAppendProveReopen: concurrent appends are durably sequenced,
// a signed checkpoint covers them, every inclusion proof verifies, a
// changed proof does not, and a reopened log continues where it stopped.
func TestLogAppendProveReopen(t *testing.T) {
	ctx := context.Background()
	signer, err := kms.OpenLocal(filepath.Join(t.TempDir(), "kms.key"))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	l := openTestLog(t, dir, signer)

	const n = 300
	leaves := make([][32]byte, n)
	indexes := make([]uint64, n)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := sample()
			r.Status = uint16(200 + i%3)
			r.Path = fmt.Sprintf("/item/%d", i)
			enc, err := r.Encode()
			if err != nil {
				errs <- err
				return
			}
			idx, err := l.Append(ctx, enc)
			if err != nil {
				errs <- err
				return
			}
			leaves[i], indexes[i] = LeafHash(enc), idx
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	seen := map[uint64]bool{}
	for _, idx := range indexes {
		if seen[idx] {
			t.Fatalf("index %d given twice", idx)
		}
		seen[idx] = true
	}

	// Poll until a checkpoint covers every entry.
	deadline := time.Now().Add(10 * time.Second)
	var size uint64
	var root []byte
	for {
		cp, _, err := l.Checkpoint(ctx)
		if err == nil && cp.Size >= n {
			size, root = cp.Size, cp.Hash
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no checkpoint covering %d entries: %v", n, err)
		}
		time.Sleep(20 * time.Millisecond) // poll period
	}
	for i := range n {
		p, err := l.InclusionProof(ctx, indexes[i], size)
		if err != nil {
			t.Fatal(err)
		}
		if err := VerifyInclusion(leaves[i], indexes[i], size, p, root); err != nil {
			t.Fatalf("entry %d: %v", i, err)
		}
		if i == 0 && len(p) > 0 {
			p[0] = append([]byte(nil), p[0]...)
			p[0][0] ^= 1
			if VerifyInclusion(leaves[i], indexes[i], size, p, root) == nil {
				t.Fatal("a changed proof verified")
			}
		}
	}
	// Append more, then prove the old checkpoint is a prefix of the new one.
	for i := range 40 {
		r := sample()
		r.Status = uint16(i)
		enc, _ := r.Encode()
		if _, err := l.Append(ctx, enc); err != nil {
			t.Fatal(err)
		}
	}
	var size2 uint64
	var root2 []byte
	for size2 < size+40 {
		cp, _, err := l.Checkpoint(ctx)
		if err == nil {
			size2, root2 = cp.Size, cp.Hash
		}
		if time.Now().After(deadline.Add(10 * time.Second)) {
			t.Fatal("no newer checkpoint")
		}
		time.Sleep(20 * time.Millisecond) // poll period
	}
	cons, err := l.ConsistencyProof(ctx, size, size2, size2)
	if err != nil {
		t.Fatal(err)
	}
	if err := VerifyConsistency(size, size2, cons, root, root2); err != nil {
		t.Fatalf("consistency %d → %d: %v", size, size2, err)
	}
	if err := VerifyConsistency(size, size2, cons, root2, root2); err == nil {
		t.Fatal("consistency verified against the wrong old root")
	}
	if err := l.Close(ctx); err != nil {
		t.Fatal(err)
	}

	l2 := openTestLog(t, dir, signer)
	defer func() { _ = l2.Close(ctx) }()
	r := sample()
	enc, _ := r.Encode()
	idx, err := l2.Append(ctx, enc)
	if err != nil {
		t.Fatal(err)
	}
	if idx != n+40 {
		t.Fatalf("reopened log appended at %d, want %d: entries lost or reused", idx, n+40)
	}
}

// TestConsistencyBetweenAnySizes: consistency proofs between any two tree
// sizes up to the latest checkpoint — on and off batch and tile
// boundaries, inside a partial tile and across a full one — verify with
// transparency-dev/merkle against roots computed here from the leaves.
func TestConsistencyBetweenAnySizes(t *testing.T) {
	ctx := context.Background()
	signer, err := kms.OpenLocal(filepath.Join(t.TempDir(), "kms.key"))
	if err != nil {
		t.Fatal(err)
	}
	ns, vkey, err := NewNoteSigner("knhk.test/log", signer)
	if err != nil {
		t.Fatal(err)
	}
	// Short batches: many integrations, and sizes between them that no
	// tile was ever written for.
	l, err := OpenLog(ctx, t.TempDir(), ns, []string{vkey}, LogOptions{BatchMaxAge: 2 * time.Millisecond, CheckpointInterval: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = l.Close(ctx) }()
	var leaves [][]byte
	grow := func(n int) uint64 {
		t.Helper()
		for len(leaves) < n {
			r := sample()
			r.Path = fmt.Sprintf("/item/%d", len(leaves))
			enc, _ := r.Encode()
			// Uneven batches: some entries one at a time, some together.
			k := min(n-len(leaves), 1+len(leaves)%7)
			waits := make([]func() (uint64, error), k)
			for j := range k {
				e := append([]byte(nil), enc...)
				e[len(e)-1] = byte(j)
				waits[j] = l.Enqueue(ctx, e)
				h := LeafHash(e)
				leaves = append(leaves, h[:])
			}
			for j, w := range waits {
				idx, err := w()
				if err != nil || idx != uint64(len(leaves)-k+j) {
					t.Fatalf("append: index %d, %v", idx, err)
				}
			}
		}
		deadline := time.Now().Add(10 * time.Second)
		for {
			cp, _, err := l.Checkpoint(ctx)
			if err == nil && cp.Size == uint64(n) {
				return cp.Size
			}
			if time.Now().After(deadline) {
				t.Fatalf("no checkpoint of size %d: %v", n, err)
			}
			time.Sleep(20 * time.Millisecond) // poll period
		}
	}
	root := func(size uint64) []byte {
		rf := compact.RangeFactory{Hash: rfc6962.DefaultHasher.HashChildren}
		r := rf.NewEmptyRange(0)
		for _, h := range leaves[:size] {
			if err := r.Append(h, nil); err != nil {
				t.Fatal(err)
			}
		}
		if size == 0 {
			return rfc6962.DefaultHasher.EmptyRoot()
		}
		h, err := r.GetRootHash(nil)
		if err != nil {
			t.Fatal(err)
		}
		return h
	}
	check := func(published uint64, sizes []uint64) {
		t.Helper()
		for _, from := range sizes {
			for _, to := range sizes {
				if from > to {
					continue
				}
				p, err := l.ConsistencyProof(ctx, from, to, published)
				if err != nil {
					t.Fatalf("tree of %d: consistency %d → %d: %v", published, from, to, err)
				}
				if err := VerifyConsistency(from, to, p, root(from), root(to)); err != nil {
					t.Fatalf("tree of %d: consistency %d → %d does not verify: %v", published, from, to, err)
				}
			}
		}
	}
	// The tree: 90 entries, all in one partial tile.
	small := []uint64{0, 1, 2, 3, 5, 7, 9, 63, 64, 65, 80, 89, 90}
	check(grow(90), small)
	// Past the first full tile (256): full and partial tiles together.
	check(grow(300), append(small, 128, 255, 256, 257, 299, 300))
	if _, err := l.ConsistencyProof(ctx, 2, 1, 300); err == nil {
		t.Fatal("a proof from 2 to 1 was built")
	}
	if _, err := l.ConsistencyProof(ctx, 1, 301, 300); err == nil {
		t.Fatal("a proof past the published tree was built")
	}
}

// TestConsistencyFromTheEmptyTree: the proof from size 0 is empty, and
// still checks that size 0 has the empty tree's root.
func TestConsistencyFromTheEmptyTree(t *testing.T) {
	empty := rfc6962.DefaultHasher.EmptyRoot()
	other := bytes.Repeat([]byte{1}, 32)
	if err := VerifyConsistency(0, 5, nil, empty, other); err != nil {
		t.Fatalf("0 → 5: %v", err)
	}
	for name, err := range map[string]error{
		"a proof from 0":       VerifyConsistency(0, 5, [][]byte{other}, empty, other),
		"size 0 with a root":   VerifyConsistency(0, 5, nil, other, other),
		"0 → 0 with two roots": VerifyConsistency(0, 0, nil, empty, other),
	} {
		if err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
