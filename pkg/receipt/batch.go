package receipt

import (
	"crypto/ed25519"
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"

	"github.com/transparency-dev/merkle/proof"
	"github.com/transparency-dev/merkle/rfc6962"
)

// A batch is the receipts of one journal group commit, up to maxBatch of
// them: they form a small RFC 6962 Merkle tree whose root the delegated key
// signs once. Each kr2 token carries its leaf's audit path to that root and
// the batch signature, so it still verifies offline, alone, at once; the
// signature is paid once per batch instead of once per receipt.
//
// maxBatch keeps the token under 512 bytes: 128 leaves need at most 7
// path hashes (kr2 = 4 + base64url(132 + 7 × 32) = 479 bytes); 256 would
// need 8 and 522 bytes.
const maxBatch = 128

// maxPath is the longest audit path in a batch of maxBatch leaves.
var maxPath = bits.Len(maxBatch - 1)

// batchSeal is a sealed batch: its leaves and the delegated key's
// signature over the batch id, its size and its root.
type batchSeal struct {
	KeyID     [8]byte
	ID        uint64
	Signature [ed25519.SignatureSize]byte
	Leaves    [][32]byte
}

// batchMessage is what the delegated key signs for a batch: a domain tag
// (distinct from kr1's, so neither can be replayed as the other), the id,
// the size and the root.
func batchMessage(id uint64, size int, root []byte) []byte {
	b := append([]byte("knhk-receipt-batch-v2\n"), make([]byte, 0, 8+2+32)...)
	b = binary.BigEndian.AppendUint64(b, id)
	b = binary.BigEndian.AppendUint16(b, uint16(size))
	return append(b, root...)
}

// sealBatch signs the tree of leaves and returns the seal and each leaf's
// audit path.
func sealBatch(id uint64, leaves [][32]byte, keyID [8]byte, key ed25519.PrivateKey) (batchSeal, [][][32]byte) {
	paths := make([][][32]byte, len(leaves))
	root := treeHash(leaves, paths)
	s := batchSeal{KeyID: keyID, ID: id, Leaves: leaves}
	copy(s.Signature[:], ed25519.Sign(key, batchMessage(id, len(leaves), root[:])))
	return s, paths
}

// treeHash is the RFC 6962 root of leaves (leaf hashes); it appends to
// paths[i] the audit path of leaf i, leaf to root, computing each node once.
func treeHash(leaves [][32]byte, paths [][][32]byte) [32]byte {
	if len(leaves) == 1 {
		return leaves[0]
	}
	k := 1 << (bits.Len(uint(len(leaves)-1)) - 1) // the largest power of 2 below len
	l, r := treeHash(leaves[:k], paths[:k]), treeHash(leaves[k:], paths[k:])
	for i := range paths[:k] {
		paths[i] = append(paths[i], r)
	}
	for i := range paths[k:] {
		paths[k+i] = append(paths[k+i], l)
	}
	var out [32]byte
	copy(out[:], rfc6962.DefaultHasher.HashChildren(l[:], r[:]))
	return out
}

// batchRoot is the root that leaf and its audit path lead to.
func batchRoot(leaf [32]byte, index, size int, path [][32]byte) ([]byte, error) {
	if size < 1 || size > maxBatch || index < 0 || index >= size {
		return nil, fmt.Errorf("leaf %d of a batch of %d: out of range (a batch holds 1 to %d)", index, size, maxBatch)
	}
	p := make([][]byte, len(path))
	for i := range path {
		p[i] = path[i][:]
	}
	root, err := proof.RootFromInclusionProof(rfc6962.DefaultHasher, uint64(index), uint64(size), leaf[:], p)
	if err != nil {
		return nil, fmt.Errorf("audit path: %w", err)
	}
	return root, nil
}

// errBatchRecord names a journal batch record that does not parse.
var errBatchRecord = errors.New("receipt journal batch record")

// batchRecordMagic starts a journal record holding a whole sealed batch;
// a kr1 record (key id ‖ signature ‖ receipt) starts with a key id, which
// equals it with probability 2⁻⁶⁴.
var batchRecordMagic = [8]byte{'k', 'r', '2', 'b', 'a', 't', 'c', 'h'}

// appendBatchRecord encodes a sealed batch for the journal: magic ‖ key id
// ‖ batch id ‖ signature ‖ count (2 bytes) ‖ per receipt: length (4 bytes)
// ‖ canonical encoding. The leaves and paths are recomputed from it.
func appendBatchRecord(b []byte, s *batchSeal, encs [][]byte) []byte {
	b = append(b, batchRecordMagic[:]...)
	b = append(b, s.KeyID[:]...)
	b = binary.BigEndian.AppendUint64(b, s.ID)
	b = append(b, s.Signature[:]...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(encs)))
	for _, e := range encs {
		b = binary.BigEndian.AppendUint32(b, uint32(len(e)))
		b = append(b, e...)
	}
	return b
}

// paths recomputes every leaf's audit path (after a restart, or for a
// bundle).
func (s *batchSeal) paths() [][][32]byte {
	paths := make([][][32]byte, len(s.Leaves))
	treeHash(s.Leaves, paths)
	return paths
}

// isBatchRecord tells a batch record from a kr1 one.
func isBatchRecord(p []byte) bool {
	return len(p) >= 8 && [8]byte(p[:8]) == batchRecordMagic
}

// parseBatchRecord decodes appendBatchRecord's output, leaves included.
func parseBatchRecord(p []byte) (batchSeal, [][]byte, error) {
	var s batchSeal
	const head = 8 + 8 + 8 + ed25519.SignatureSize + 2
	if len(p) < head || !isBatchRecord(p) {
		return s, nil, fmt.Errorf("%w: %d bytes, shorter than its header", errBatchRecord, len(p))
	}
	copy(s.KeyID[:], p[8:])
	s.ID = binary.BigEndian.Uint64(p[16:])
	copy(s.Signature[:], p[24:])
	size := int(binary.BigEndian.Uint16(p[24+ed25519.SignatureSize:]))
	if size < 1 || size > maxBatch {
		return s, nil, fmt.Errorf("%w: %d receipts, want 1 to %d", errBatchRecord, size, maxBatch)
	}
	rest := p[head:]
	encs := make([][]byte, 0, size)
	for range size {
		if len(rest) < 4 || uint64(binary.BigEndian.Uint32(rest)) > uint64(len(rest)-4) {
			return s, nil, fmt.Errorf("%w: receipt %d of %d is cut short", errBatchRecord, len(encs), size)
		}
		n := int(binary.BigEndian.Uint32(rest))
		encs = append(encs, rest[4:4+n])
		s.Leaves = append(s.Leaves, LeafHash(rest[4:4+n]))
		rest = rest[4+n:]
	}
	if len(rest) != 0 {
		return s, nil, fmt.Errorf("%w: %d bytes after its %d receipts", errBatchRecord, len(rest), size)
	}
	return s, encs, nil
}
