package receipt

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math"
)

// A tombstone takes a pruned receipt's place in its entry bundle (see
// retention.go): the fixed prefix, the receipt's id and its leaf hash,
// 63 bytes in all. It is never a receipt: a receipt's encoding starts with
// its version byte (1), a tombstone with 'k'. Its leaf hash is the one the
// Merkle tree holds for the entry (checked against the tiles when it is
// written), so the receipt's inclusion and every consistency proof keep
// verifying; the tiles themselves are never rewritten.
const tombstonePrefix = "knhk-pruned/v1\n"

// tombstoneLen is the length of a tombstone entry.
const tombstoneLen = len(tombstonePrefix) + 16 + 32

func tombstone(id [16]byte, leaf [32]byte) []byte {
	b := make([]byte, 0, tombstoneLen)
	b = append(b, tombstonePrefix...)
	b = append(b, id[:]...)
	return append(b, leaf[:]...)
}

// ParseTombstone reads a log entry written in place of a receipt whose
// body retention pruned: the receipt's id and leaf hash. ok is false for
// anything else (a receipt, or bytes that are not exactly a tombstone).
func ParseTombstone(entry []byte) (id [16]byte, leaf [32]byte, ok bool) {
	if len(entry) != tombstoneLen || !bytes.HasPrefix(entry, []byte(tombstonePrefix)) {
		return id, leaf, false
	}
	p := entry[len(tombstonePrefix):]
	copy(id[:], p)
	copy(leaf[:], p[16:])
	return id, leaf, true
}

// entryID is the receipt id of a log entry, a receipt or its tombstone.
func entryID(entry []byte) ([16]byte, error) {
	if id, _, ok := ParseTombstone(entry); ok {
		return id, nil
	}
	r, err := Decode(entry)
	return r.ID, err
}

// marshalBundle is tessera's entry-bundle format (tlog-tiles): each entry
// as a big-endian uint16 length and its bytes.
func marshalBundle(entries [][]byte) ([]byte, error) {
	n := 0
	for _, e := range entries {
		if len(e) > math.MaxUint16 {
			return nil, fmt.Errorf("entry of %d bytes does not fit a bundle", len(e))
		}
		n += 2 + len(e)
	}
	b := make([]byte, 0, n)
	for _, e := range entries {
		b = binary.BigEndian.AppendUint16(b, uint16(len(e)))
		b = append(b, e...)
	}
	return b, nil
}

// Tombstone is the entry that takes a pruned receipt's place (a mirror
// prunes its copies the same way).
func Tombstone(id [16]byte, leaf [32]byte) []byte { return tombstone(id, leaf) }
