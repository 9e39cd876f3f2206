package receipt

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"
)

// index maps receipt ids to their log index and inline signature, on disk
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
	kick    chan struct{}
	stop    chan struct{}
	done    chan struct{}
}

type indexRecord struct {
	index     uint64
	keyID     [8]byte
	signature [64]byte // zero: not known (indexed by a rescan)
	signed    bool
}

var (
	bucketIDs  = []byte("ids")
	bucketMeta = []byte("meta")
	keyMax     = []byte("max_index")
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
		for _, b := range [][]byte{bucketIDs, bucketMeta} {
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
	x := &index{db: db, log: log, pending: map[[16]byte]indexRecord{}, kick: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
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

func encodeIndexRecord(r indexRecord) []byte {
	if !r.signed {
		return binary.BigEndian.AppendUint64(nil, r.index)
	}
	b := binary.BigEndian.AppendUint64(make([]byte, 0, 80), r.index)
	b = append(b, r.keyID[:]...)
	return append(b, r.signature[:]...)
}

func decodeIndexRecord(v []byte) (indexRecord, error) {
	var r indexRecord
	switch len(v) {
	case 80:
		copy(r.keyID[:], v[8:16])
		copy(r.signature[:], v[16:])
		r.signed = true
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
	batch := x.pending
	if len(batch) == 0 {
		x.mu.Unlock()
		return nil
	}
	// Keep serving the batch from memory until it is on disk.
	snapshot := make(map[[16]byte]indexRecord, len(batch))
	for k, v := range batch {
		snapshot[k] = v
	}
	x.mu.Unlock()
	err := x.db.Update(func(tx *bolt.Tx) error {
		ids, meta := tx.Bucket(bucketIDs), tx.Bucket(bucketMeta)
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
