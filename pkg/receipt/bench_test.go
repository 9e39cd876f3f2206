package receipt

import (
	"context"
	"crypto/ed25519"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/knhk/knhk/pkg/kms"
)

// BenchmarkIssue: receipts per second in process — build, encode, hash,
// batch-sign and durably journal (group commit), from many goroutines as
// ext_proc streams would; the clock runs until every receipt is also in
// the Merkle log, so the rate is one the log sustains.
func BenchmarkIssue(b *testing.B) {
	ctx := context.Background()
	dir := b.TempDir()
	signer, err := kms.OpenLocal(filepath.Join(dir, "kms.key"))
	if err != nil {
		b.Fatal(err)
	}
	s, err := OpenService(ctx, dir, ServiceConfig{Origin: "bench/log", Region: "r", Instance: "i", Delegation: time.Hour,
		CheckpointInterval: time.Second, BatchMaxAge: 50 * time.Millisecond}, signer, discard())
	if err != nil {
		b.Fatal(err)
	}
	defer func() { _ = s.Close(ctx) }()
	b.SetParallelism(1024) // many requests in flight share each batch
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			r := sample()
			if _, err := s.Issue(ctx, &r); err != nil {
				b.Error(err)
				return
			}
		}
	})
	s.sequence.Wait()
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "receipts/s")
}

// BenchmarkInlineCost: the work per receipt before its journal write —
// encode, leaf hash, and its share of the batch signature (tree and one
// Ed25519 signature per batch) — at batch sizes from 1 (a lone request)
// to maxBatch, beside a bare crypto/ed25519 Sign.
func BenchmarkInlineCost(b *testing.B) {
	_, priv, _ := ed25519.GenerateKey(nil)
	for _, n := range []int{1, 8, maxBatch} {
		b.Run(fmt.Sprintf("receipt/batch=%d", n), func(b *testing.B) {
			b.ReportAllocs()
			leaves := make([][32]byte, 0, n)
			for i := 0; i < b.N; i++ {
				r := sample()
				enc, _ := r.Encode()
				if leaves = append(leaves, LeafHash(enc)); len(leaves) == n || i == b.N-1 {
					seal, paths := sealBatch(uint64(i), leaves, [8]byte{}, priv)
					for j := range leaves {
						_ = batchToken(r.ID, leaves[j], &seal, j, paths[j]).String()
					}
					leaves = make([][32]byte, 0, n)
				}
			}
		})
	}
	b.Run("ed25519.Sign", func(b *testing.B) {
		msg := make([]byte, 48)
		b.ReportAllocs()
		for i := 0; i < b.N; i++ {
			_ = ed25519.Sign(priv, msg)
		}
	})
}
