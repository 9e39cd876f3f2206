package receipt

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"sync"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"
)

// index maps receipt ids to their log index and signature (kr1) or batch (kr2), on disk
// (bbolt), so memory stays flat however many receipts are issued and
// bundles carry the token after a restart. Writes are batched off the
// request path: the log, not the index, is what makes a receipt durable.
// Records not yet flushed are served from memory; after a crash, the tail
// of the log is rescanned (see reindexWindow) and those ids are indexed
// again, without their signatures. A failed flush keeps its records in
// memory, is retried, counted and reported (Service.Degraded).
type index struct {
	db  *bolt.DB
	log *slog.Logger

	flushErrors atomic.Uint64
	failing     atomic.Pointer[error] // the last flush's error; nil once one succeeds

	mu      sync.Mutex
	pending map[[16]byte]indexRecord
	batches map[uint64]*batchSeal // not yet flushed
	kick    chan struct{}
	stop    chan struct{}
	done    chan struct{}
}

// indexRecord is where a receipt is in the log and, unless a rescan
// indexed it, what its token was signed with: its own signature (kr1), or
// its batch's (kr2, the batch kept once under its id).
type indexRecord struct {
	index     uint64
	keyID     [8]byte
	signature [64]byte // kr1 only
	signed    bool
	batched   bool
	batchID   uint64
	leafIndex int
}

var (
	bucketIDs     = []byte("ids")
	bucketMeta    = []byte("meta")
	bucketBatches = []byte("batches")
	keyMax        = []byte("max_index")
	// bucketRetained and keyPruneNext are retention's (retention.go).
	bucketRetained = []byte("retained")
	keyPruneNext   = []byte("prune_next")
)

// reindexWindow is how far before the highest indexed entry a restart
// rescans the log: far more than can be in flight between a durable
// append and its index flush.
const reindexWindow = 1 << 16

// flushEvery paces flushes (one fsync per batch); retryEvery paces the
// retries of a failed one. Lookups of receipts not yet flushed are served
// from memory, and a crash rebuilds them from the log, so the pace is a
// cost trade only: at 20 ms the flushes took 21 µs of CPU per request at
// 1,500 req/s (docs/BENCHMARKS.md).
const (
	flushEvery = 100 * time.Millisecond
	retryEvery = time.Second
)

func openIndex(path string, log *slog.Logger) (*index, error) {
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		return nil, fmt.Errorf("receipt index %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketIDs, bucketMeta, bucketBatches, bucketRetained} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("receipt index %s: %w", path, err)
	}
	x := &index{db: db, log: log, pending: map[[16]byte]indexRecord{}, batches: map[uint64]*batchSeal{}, kick: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	go x.flushLoop()
	return x, nil
}

// maxIndex is the highest log index flushed, and whether there is any.
func (x *index) maxIndex() (uint64, bool, error) {
	var v uint64
	var ok bool
	err := x.db.View(func(tx *bolt.Tx) error {
		if b := tx.Bucket(bucketMeta).Get(keyMax); len(b) == 8 {
			v, ok = binary.BigEndian.Uint64(b), true
		}
		return nil
	})
	return v, ok, err
}

// put records id; rescan records (signed false) never replace a signed one.
func (x *index) put(id [16]byte, r indexRecord) {
	x.mu.Lock()
	x.pending[id] = r
	x.mu.Unlock()
	x.wake()
}

func (x *index) get(id [16]byte) (indexRecord, bool, error) {
	x.mu.Lock()
	r, ok := x.pending[id]
	x.mu.Unlock()
	if ok {
		return r, true, nil
	}
	err := x.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketIDs).Get(id[:])
		if v == nil {
			return nil
		}
		var err error
		r, err = decodeIndexRecord(v)
		ok = err == nil
		return err
	})
	return r, ok, err
}

// putBatch records a sealed batch, before any of its receipts.
func (x *index) putBatch(b *batchSeal) {
	x.mu.Lock()
	x.batches[b.ID] = b
	x.mu.Unlock()
	x.wake()
}

// getBatch returns a batch recorded by putBatch.
func (x *index) getBatch(id uint64) (*batchSeal, bool, error) {
	x.mu.Lock()
	b, ok := x.batches[id]
	x.mu.Unlock()
	if ok {
		return b, true, nil
	}
	err := x.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketBatches).Get(binary.BigEndian.AppendUint64(nil, id))
		if v == nil {
			return nil
		}
		if len(v) < 72+32 || (len(v)-72)%32 != 0 || (len(v)-72)/32 > maxBatch {
			return fmt.Errorf("receipt index: batch %d: record of %d bytes", id, len(v))
		}
		b = &batchSeal{ID: id}
		copy(b.KeyID[:], v)
		copy(b.Signature[:], v[8:])
		for p := v[72:]; len(p) > 0; p = p[32:] {
			b.Leaves = append(b.Leaves, [32]byte(p[:32]))
		}
		ok = true
		return nil
	})
	return b, ok, err
}

func encodeBatch(b *batchSeal) []byte {
	v := make([]byte, 0, 72+32*len(b.Leaves))
	v = append(v, b.KeyID[:]...)
	v = append(v, b.Signature[:]...)
	for _, l := range b.Leaves {
		v = append(v, l[:]...)
	}
	return v
}

func encodeIndexRecord(r indexRecord) []byte {
	b := binary.BigEndian.AppendUint64(make([]byte, 0, 80), r.index)
	switch {
	case r.batched:
		b = binary.BigEndian.AppendUint64(b, r.batchID)
		return binary.BigEndian.AppendUint16(b, uint16(r.leafIndex))
	case r.signed:
		b = append(b, r.keyID[:]...)
		return append(b, r.signature[:]...)
	}
	return b
}

func decodeIndexRecord(v []byte) (indexRecord, error) {
	var r indexRecord
	switch len(v) {
	case 80:
		copy(r.keyID[:], v[8:16])
		copy(r.signature[:], v[16:])
		r.signed = true
	case 18:
		r.signed, r.batched = true, true
		r.batchID = binary.BigEndian.Uint64(v[8:])
		r.leafIndex = int(binary.BigEndian.Uint16(v[16:]))
	case 8:
	default:
		return r, fmt.Errorf("receipt index: record of %d bytes", len(v))
	}
	r.index = binary.BigEndian.Uint64(v)
	return r, nil
}

// flushLoop writes pending records in one transaction at a time (one
// fsync per batch, at most every flushEvery); after a failure it retries
// every retryEvery, new records or not.
func (x *index) flushLoop() {
	defer close(x.done)
	t := time.NewTicker(flushEvery)
	defer t.Stop()
	for {
		select {
		case <-x.stop:
			x.flushAndRecord()
			return
		case <-x.kick:
		}
		pause := t.C
		if !x.flushAndRecord() {
			x.wake()
			pause = time.After(retryEvery)
		}
		select {
		case <-x.stop:
			x.flushAndRecord()
			return
		case <-pause:
		}
	}
}

func (x *index) wake() {
	select {
	case x.kick <- struct{}{}:
	default:
	}
}

// flushAndRecord flushes and keeps the outcome for flushErrors and
// degraded; it logs when the index starts and stops failing, not on every
// retry.
func (x *index) flushAndRecord() bool {
	err := x.flush()
	if err == nil {
		if x.failing.Swap(nil) != nil {
			x.log.Info("receipt index flushed again after failures")
		}
		return true
	}
	x.flushErrors.Add(1)
	err = fmt.Errorf("receipt index: writes failing (ids not yet on disk are served from memory and retried): %w", err)
	if x.failing.Swap(&err) == nil {
		x.log.Error("receipt index flush failed; retrying", "error", err.Error())
	}
	return false
}

// degraded is the last flush's error, nil when it succeeded.
func (x *index) degraded() error {
	if e := x.failing.Load(); e != nil {
		return *e
	}
	return nil
}

func (x *index) flush() error {
	x.mu.Lock()
	if len(x.pending) == 0 && len(x.batches) == 0 {
		x.mu.Unlock()
		return nil
	}
	// Keep serving the records from memory until they are on disk.
	snapshot := maps.Clone(x.pending)
	batches := maps.Clone(x.batches)
	x.mu.Unlock()
	err := x.db.Update(func(tx *bolt.Tx) error {
		ids, meta, bs := tx.Bucket(bucketIDs), tx.Bucket(bucketMeta), tx.Bucket(bucketBatches)
		for id, b := range batches {
			k, v := binary.BigEndian.AppendUint64(nil, id), encodeBatch(b)
			if old := bs.Get(k); old != nil {
				if !bytes.Equal(old, v) {
					// Ids start at random: this is corruption, not a collision
					// to resolve. Keep the first: its tokens are out.
					x.log.Error("receipt index: a batch id is taken by another batch; keeping the first", "batch", id)
				}
				continue
			}
			if err := bs.Put(k, v); err != nil {
				return err
			}
		}
		var highest uint64
		if b := meta.Get(keyMax); len(b) == 8 {
			highest = binary.BigEndian.Uint64(b)
		}
		for id, r := range snapshot {
			if !r.signed && ids.Get(id[:]) != nil {
				continue
			}
			if err := ids.Put(id[:], encodeIndexRecord(r)); err != nil {
				return err
			}
			highest = max(highest, r.index)
		}
		return meta.Put(keyMax, binary.BigEndian.AppendUint64(nil, highest))
	})
	if err != nil {
		return err
	}
	x.mu.Lock()
	for id, r := range snapshot {
		if cur, ok := x.pending[id]; ok && cur == r {
			delete(x.pending, id)
		}
	}
	for id := range batches {
		delete(x.batches, id)
	}
	x.mu.Unlock()
	return nil
}

// close flushes what is pending and closes the file.
func (x *index) close(ctx context.Context) error {
	close(x.stop)
	select {
	case <-x.done:
	case <-ctx.Done():
		return errors.Join(ctx.Err(), x.db.Close())
	}
	err := x.flush()
	return errors.Join(err, x.db.Close())
}
