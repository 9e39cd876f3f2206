package receipt

import (
	"context"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

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
	cons, err := l.ConsistencyProof(ctx, size, size2)
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
