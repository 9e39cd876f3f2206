package region

import (
	"encoding/binary"
	"encoding/json"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/knhk/knhk/pkg/holds"
	"github.com/knhk/knhk/pkg/receipt"
)

// A mirror applies the origin's legal holds and this region's retention
// to the bodies it holds: hold changes are receipts of the origin's log
// (pkg/holds), read as they are stored, in log order; a pass replaces old
// bodies no hold keeps by the origin's tombstone, whose leaf hash is the
// entry's, so the mirror's tree (its compact range) is unchanged.

func holdsBucket(origin string) []byte { return append([]byte("holds/"), origin...) }
func keptBucket(origin string) []byte  { return append([]byte("kept/"), origin...) }
func pruneKey(origin string) []byte    { return append([]byte("\x00prune/"), origin...) }

// applyHolds records the hold changes among entries being stored, in the
// same transaction. A repeated place or a lift of an unknown id changes
// nothing, as pkg/holds says.
func applyHolds(tx *bolt.Tx, origin string, entries [][]byte) error {
	var hb *bolt.Bucket
	for _, e := range entries {
		r, err := receipt.Decode(e)
		if err != nil {
			continue // a tombstone, or not a knhk receipt: no hold change
		}
		he, ok, err := holds.ParseEntry(&r)
		if !ok || err != nil {
			continue
		}
		if hb == nil {
			if hb, err = tx.CreateBucketIfNotExists(holdsBucket(origin)); err != nil {
				return err
			}
		}
		switch he.Action {
		case holds.ActionPlace:
			v, err := json.Marshal(he.Hold())
			if err != nil {
				return err
			}
			if err := hb.Put(he.ID[:], v); err != nil {
				return err
			}
		case holds.ActionLift:
			if err := hb.Delete(he.ID[:]); err != nil {
				return err
			}
		}
	}
	return nil
}

// maxPrunePass bounds one pass's work (one transaction) per origin.
const maxPrunePass = 8192

// MirrorPruneStats says what a pass did.
type MirrorPruneStats struct {
	Pruned, Held int
}

// Prune replaces the bodies of mirrored receipts older than before that
// no hold of their origin keeps. Held ones are looked at again at every
// pass, so a lifted or expired hold lets them go.
func (m *Mirror) Prune(before, now time.Time) (MirrorPruneStats, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var st MirrorPruneStats
	err := m.db.Update(func(tx *bolt.Tx) error {
		meta := tx.Bucket(bucketMirrorMeta)
		var origins []string
		_ = meta.ForEach(func(k, _ []byte) error {
			if k[0] != 0 {
				origins = append(origins, string(k))
			}
			return nil
		})
		for _, origin := range origins {
			if err := m.pruneOrigin(tx, origin, before, now, &st); err != nil {
				return err
			}
		}
		return nil
	})
	return st, err
}

func (m *Mirror) pruneOrigin(tx *bolt.Tx, origin string, before, now time.Time, st *MirrorPruneStats) error {
	eb := tx.Bucket(entriesBucket(origin))
	if eb == nil {
		return nil
	}
	var hs []receipt.Hold
	if hb := tx.Bucket(holdsBucket(origin)); hb != nil {
		if err := hb.ForEach(func(_, v []byte) error {
			var h receipt.Hold
			if err := json.Unmarshal(v, &h); err != nil {
				return err
			}
			hs = append(hs, h)
			return nil
		}); err != nil {
			return err
		}
	}
	set, err := receipt.NewHoldSet(hs)
	if err != nil {
		return err
	}
	kept, err := tx.CreateBucketIfNotExists(keptBucket(origin))
	if err != nil {
		return err
	}
	meta := tx.Bucket(bucketMirrorMeta)
	// prune rewrites entry k unless a hold keeps it; it reports whether
	// the entry is young (the frontier stops there).
	budget := maxPrunePass
	prune := func(k []byte) (young bool, err error) {
		budget--
		v := eb.Get(k)
		if v == nil {
			return false, nil
		}
		if _, _, ok := receipt.ParseTombstone(v); ok {
			return false, kept.Delete(k)
		}
		r, err := receipt.Decode(v)
		if err != nil {
			return false, nil // not a receipt: nothing to prune
		}
		if r.Time >= before.UnixNano() {
			return true, nil
		}
		if set.Holds(&r, now) {
			st.Held++
			return false, kept.Put(k, nil)
		}
		st.Pruned++
		if err := kept.Delete(k); err != nil {
			return false, err
		}
		return false, eb.Put(k, receipt.Tombstone(r.ID, [32]byte(leafOf(v))))
	}
	// Those kept for a hold, again.
	var keys [][]byte
	_ = kept.ForEach(func(k, _ []byte) error {
		keys = append(keys, append([]byte{}, k...))
		return nil
	})
	for _, k := range keys {
		if budget == 0 {
			return nil
		}
		if _, err := prune(k); err != nil {
			return err
		}
	}
	// The frontier.
	next := uint64(0)
	if v := meta.Get(pruneKey(origin)); len(v) == 8 {
		next = binary.BigEndian.Uint64(v)
	}
	// Keys first: a bbolt cursor is not to be used across writes.
	keys = keys[:0]
	c := eb.Cursor()
	for k, _ := c.Seek(binary.BigEndian.AppendUint64(nil, next)); k != nil && len(keys) < budget; k, _ = c.Next() {
		keys = append(keys, append([]byte{}, k...))
	}
	for _, k := range keys {
		young, err := prune(k)
		if err != nil {
			return err
		}
		if young {
			break
		}
		next = binary.BigEndian.Uint64(k) + 1
	}
	return meta.Put(pruneKey(origin), binary.BigEndian.AppendUint64(nil, next))
}
