package region

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/knhk/knhk/internal/fsutil"
)

var (
	bucketCheckpoints = []byte("witnessed")
	bucketEvidence    = []byte("evidence")
)

// store keeps, per origin, the latest checkpoint this region cosigned, and
// the refused checkpoints kept as evidence. It implements the witness
// library's LogStatePersistence: Update's check of the old size and its
// write of the new checkpoint are one bbolt transaction, committed (and
// fsynced) before the cosignature is returned.
type store struct {
	db *bolt.DB
}

// openStore opens (or creates) the witness database at path, 0600.
func openStore(path string) (*store, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 5 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("witness state %s: %w", path, err)
	}
	// A new file's directory entry must survive a power loss too.
	if err := fsutil.SyncDir(filepath.Dir(path)); err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("witness state %s: %w", path, err)
	}
	return &store{db: db}, nil
}

func (s *store) Close() error { return s.db.Close() }

// Init creates the buckets; the library calls it once.
func (s *store) Init(context.Context) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketCheckpoints, bucketEvidence} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
}

// Latest is the checkpoint last cosigned for origin, or nil.
func (s *store) Latest(_ context.Context, origin string) ([]byte, error) {
	var out []byte
	err := s.db.View(func(tx *bolt.Tx) error {
		if v := tx.Bucket(bucketCheckpoints).Get([]byte(origin)); v != nil {
			out = append([]byte(nil), v...)
		}
		return nil
	})
	return out, err
}

// Update hands f the stored checkpoint and stores what it returns, in one
// transaction: an error from f leaves the stored checkpoint as it was.
func (s *store) Update(_ context.Context, origin string, f func([]byte) ([]byte, error)) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketCheckpoints)
		var prev []byte
		if v := b.Get([]byte(origin)); v != nil {
			prev = append([]byte(nil), v...) // bbolt's slice is only valid in the tx
		}
		next, err := f(prev)
		if err != nil {
			return err
		}
		if next == nil {
			return errors.New("witness: nothing to store")
		}
		return b.Put([]byte(origin), next)
	})
}

// maxEvidence bounds the evidence kept per kind: a peer (or anyone who
// can reach the port) pushing junk in a loop must not fill the disk, nor
// push out other kinds. Rewritten history needs the log's own key, so
// root_mismatch evidence is never evicted.
const maxEvidence = 1000

// maxRootMismatch is how many root_mismatch records are kept, the first
// ones; later ones are counted (knhk_region_inconsistency_total) only.
const maxRootMismatch = 100

// addEvidence keeps a refused submission, in its kind's bucket, under a
// big-endian sequence key (wall-clock steps cannot reorder it). Each
// record costs one fsynced write; refusals are rare unless a peer
// misbehaves, and then they are what the operator needs.
func (s *store) addEvidence(kind string, e []byte) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		b, err := tx.Bucket(bucketEvidence).CreateBucketIfNotExists([]byte(kind))
		if err != nil {
			return err
		}
		seq, err := b.NextSequence()
		if err != nil {
			return err
		}
		if err := b.Put(binary.BigEndian.AppendUint64(nil, seq), e); err != nil {
			return err
		}
		if kind == evidenceNeverEvicted {
			// Rewritten history is kept, but one fork proves it: a log
			// rewriting in a loop must not fill the disk either.
			if seq > maxRootMismatch {
				return b.Delete(binary.BigEndian.AppendUint64(nil, seq))
			}
			return nil
		}
		if seq <= maxEvidence {
			return nil
		}
		// Keys are dense sequence numbers: drop those more than
		// maxEvidence behind the newest.
		c := b.Cursor()
		for k, _ := c.First(); k != nil && binary.BigEndian.Uint64(k) <= seq-maxEvidence; k, _ = c.First() {
			if err := b.Delete(k); err != nil {
				return err
			}
		}
		return nil
	})
}

// evidenceNeverEvicted is the kind kept whatever its count.
const evidenceNeverEvicted = "root_mismatch"

// evidence returns what was kept, by kind, oldest first within a kind.
func (s *store) evidence() ([][]byte, error) {
	var out [][]byte
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketEvidence).ForEachBucket(func(kind []byte) error {
			return tx.Bucket(bucketEvidence).Bucket(kind).ForEach(func(_, v []byte) error {
				out = append(out, append([]byte(nil), v...))
				return nil
			})
		})
	})
	return out, err
}

// bindKey ties the witness state to the witness key. A witness whose
// state is lost but whose key is not would trust the next checkpoint on
// first use again, and could cosign a fork of what it cosigned before
// under the same identity; so a fresh state with an old key, or a state
// made for another key, is refused.
func (s *store) bindKey(vkey string, keyIsNew bool) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(bucketMeta)
		if err != nil {
			return err
		}
		got := b.Get(metaKey)
		switch {
		case got == nil && !keyIsNew:
			return errors.New("the witness key exists but its state does not: restore witness.db (it holds what this region cosigned; an older copy rolls the witness back), or remove the key to start as a new witness that the peers must pin again; a key made ahead of time that never cosigned is adopted if named witness.key.new")
		case got == nil:
			return b.Put(metaKey, []byte(vkey))
		case string(got) != vkey:
			return fmt.Errorf("witness.db was made for the witness key %q, not this one: restore the matching key or state", got)
		}
		return nil
	})
}

var (
	bucketMeta = []byte("meta")
	metaKey    = []byte("witness_verifier_key")
)
