package receipt

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/knhk/knhk/internal/fsutil"
)

// wal is the receipts' group-commit journal. A receipt is durable — and its
// token may go to the client — once its record is in an fsynced batch here:
// one fdatasync per group, where the Merkle log's batch costs a chain of
// file writes, renames and syncs. Records then go into the log off the
// request path; a segment is deleted once every record in it is in the log.
// After a crash, the records of the remaining segments that the log lacks
// are appended at start, before anything is served.
//
// Record: length (4 bytes, big endian) ‖ CRC-32C of the payload ‖ payload.
// A payload is a sealed batch of receipts (batch.go), or, in a journal left
// by a version before batches, one kr1-signed receipt.
type wal struct {
	dir       string
	maxRecs   int           // records per segment before a new one
	maxAge    time.Duration // segment age before a new one
	reqs      chan walReq
	stop      chan struct{}
	done      chan struct{}
	closeOnce sync.Once

	mu       sync.Mutex
	segments map[uint64]*segment
	cur      *segment
	nextSeq  uint64
	err      error // sticky: a failed write or sync poisons the journal

	// key is the delegated key batches are signed with, read once per
	// group; nextBatch numbers the batches (the committer's alone).
	key       func() ([8]byte, ed25519.PrivateKey)
	sealed    func(*batchSeal) // told of each batch once durable, before any ack
	wait      time.Duration    // the most a group waits to fill (commit_wait)
	nextBatch uint64
}

type segment struct {
	seq     uint64
	f       *os.File
	records int // written
	pending int // written and not yet in the log
	opened  time.Time
	sealed  bool // no more writes
}

type walReq struct {
	enc    []byte   // the receipt's canonical encoding
	leaf   [32]byte // its leaf hash
	queued time.Time
	done   chan walAck
}

// walAck answers a walReq: once the record is on disk, the segment holding
// it (to release when the record is in the log), and the batch seal, leaf
// index and audit path its token is made of.
type walAck struct {
	seg   uint64
	err   error
	seal  *batchSeal
	index int
	path  [][32]byte
}

var crcTable = crc32.MakeTable(crc32.Castagnoli)

const walHeader = 8

func segmentName(seq uint64) string { return fmt.Sprintf("wal-%016d.log", seq) }

// openWAL reads the records of existing segments (for recovery) and returns
// them in order, with the journal ready for new records in a new segment.
// Segments holding recovered records are removed by dropRecovered once the
// caller has put those records in the log.
func openWAL(dir string) (*wal, [][]byte, error) {
	if err := fsutil.MkdirAll(dir, 0o700); err != nil {
		return nil, nil, err
	}
	names, err := filepath.Glob(filepath.Join(dir, "wal-*.log"))
	if err != nil {
		return nil, nil, err
	}
	slices.Sort(names)
	var recovered [][]byte
	var next uint64
	for _, n := range names {
		var seq uint64
		if _, err := fmt.Sscanf(filepath.Base(n), "wal-%016d.log", &seq); err != nil {
			return nil, nil, fmt.Errorf("receipt journal: unexpected file %s", n)
		}
		next = max(next, seq+1)
		recs, err := readSegment(n)
		if err != nil {
			return nil, nil, err
		}
		recovered = append(recovered, recs...)
	}
	w := &wal{dir: dir, maxRecs: 1 << 14, maxAge: time.Second, reqs: make(chan walReq, 4096),
		stop: make(chan struct{}), done: make(chan struct{}), segments: map[uint64]*segment{}, nextSeq: next}
	return w, recovered, nil
}

// readSegment returns a segment's records. A torn or corrupt tail — a
// batch whose fdatasync never returned, so no token was given for it — ends
// the segment.
func readSegment(path string) ([][]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("receipt journal: %w", err)
	}
	var out [][]byte
	for len(b) >= walHeader {
		n := binary.BigEndian.Uint32(b)
		sum := binary.BigEndian.Uint32(b[4:])
		if uint64(n) > uint64(len(b)-walHeader) {
			break
		}
		p := b[walHeader : walHeader+int(n)]
		if crc32.Checksum(p, crcTable) != sum {
			break
		}
		out = append(out, slices.Clone(p))
		b = b[walHeader+int(n):]
	}
	return out, nil
}

// dropRecovered removes the segments read at open: their records are in
// the log now.
func (w *wal) dropRecovered() error {
	names, err := filepath.Glob(filepath.Join(w.dir, "wal-*.log"))
	if err != nil {
		return err
	}
	for _, n := range names {
		var seq uint64
		if _, err := fmt.Sscanf(filepath.Base(n), "wal-%016d.log", &seq); err == nil && seq < w.nextSeq {
			if err := os.Remove(n); err != nil {
				return err
			}
		}
	}
	return fsutil.SyncDir(w.dir)
}

// start opens the first segment and runs the committer: creating a file
// and syncing its directory is then not on the first request's path.
func (w *wal) start(key func() ([8]byte, ed25519.PrivateKey), sealed func(*batchSeal), wait time.Duration) error {
	// Batch ids key the index's batch records: a random start keeps them
	// unique across restarts without storing a counter.
	var seed [8]byte
	if _, err := rand.Read(seed[:]); err != nil {
		return err
	}
	w.key, w.sealed, w.wait, w.nextBatch = key, sealed, wait, binary.BigEndian.Uint64(seed[:])
	w.mu.Lock()
	err := w.rotateLocked()
	w.mu.Unlock()
	if err != nil {
		return fmt.Errorf("receipt journal: %w", err)
	}
	go w.commitLoop()
	return nil
}

// submit queues a receipt for the journal; await gives its
// acknowledgement.
func (w *wal) submit(ctx context.Context, enc []byte, leaf [32]byte) (<-chan walAck, error) {
	done := make(chan walAck, 1)
	select {
	case w.reqs <- walReq{enc: enc, leaf: leaf, queued: time.Now(), done: done}:
		return done, nil
	case <-w.stop:
		return nil, errors.New("receipt journal closed")
	case <-ctx.Done(): // the queue is full behind a stalled sync
		return nil, fmt.Errorf("receipt journal is behind: %w", ctx.Err())
	}
}

// await waits for the acknowledgement of a submitted record. A record
// queued just as the committer stopped gets no answer from it.
func (w *wal) await(ack <-chan walAck) walAck {
	select {
	case a := <-ack:
		return a
	case <-w.done:
		select {
		case a := <-ack:
			return a
		default:
			return walAck{err: errors.New("receipt journal closed")}
		}
	}
}

// commitLoop writes whatever has queued as one group and syncs it: while
// one sync runs, the next group gathers. The group is cut into batches of
// up to maxBatch receipts, each signed once (batch.go) and journaled as one
// record with its signature.
func (w *wal) commitLoop() {
	defer close(w.done)
	var group []walReq
	var buf []byte
	var encs [][]byte
	type sealed struct {
		seal  *batchSeal
		paths [][][32]byte
	}
	var seals []sealed
	linger := time.NewTimer(time.Hour)
	linger.Stop()
	for {
		group = group[:0]
		select {
		case r := <-w.reqs:
			group = append(group, r)
		case <-w.stop:
			// Answer whatever queued meanwhile: no token goes out for it.
			for {
				select {
				case r := <-w.reqs:
					r.done <- walAck{err: errors.New("receipt journal closed")}
				default:
					return
				}
			}
		}
		// Wait for a group to fill, up to one batch: beyond it, neither the
		// sync nor the signature is shared any further. The wait counts
		// from when the group's first receipt was queued, so one that
		// queued behind a sync does not wait again.
		if left := time.Until(group[0].queued.Add(w.wait)); w.wait > 0 && left > 0 {
			linger.Reset(left)
		fill:
			for len(group) < maxBatch {
				select {
				case r := <-w.reqs:
					group = append(group, r)
				case <-linger.C:
					break fill
				case <-w.stop:
					break fill // write what is here; the next turn answers the rest
				}
			}
			linger.Stop()
		}
	gather:
		for len(group) < 8192 {
			select {
			case r := <-w.reqs:
				group = append(group, r)
			default:
				break gather
			}
		}
		buf, seals = buf[:0], seals[:0]
		keyID, key := w.key()
		for b := range slices.Chunk(group, maxBatch) {
			leaves := make([][32]byte, len(b))
			encs = encs[:0]
			for i, r := range b {
				leaves[i] = r.leaf
				encs = append(encs, r.enc)
			}
			w.nextBatch++
			seal, paths := sealBatch(w.nextBatch, leaves, keyID, key)
			start := len(buf)
			buf = append(buf, make([]byte, walHeader)...)
			buf = appendBatchRecord(buf, &seal, encs)
			p := buf[start+walHeader:]
			binary.BigEndian.PutUint32(buf[start:], uint32(len(p)))
			binary.BigEndian.PutUint32(buf[start+4:], crc32.Checksum(p, crcTable))
			seals = append(seals, sealed{&seal, paths})
		}
		seg, err := w.write(buf, len(group))
		if err == nil {
			for _, sb := range seals {
				w.sealed(sb.seal)
			}
		}
		for i, r := range group {
			a := walAck{seg: seg, err: err}
			if err == nil {
				sb := seals[i/maxBatch]
				a.seal, a.index, a.path = sb.seal, i%maxBatch, sb.paths[i%maxBatch]
			}
			r.done <- a
		}
	}
}

// write appends a batch to the current segment (opening a new one when it
// is full or old) and syncs it.
func (w *wal) write(buf []byte, n int) (uint64, error) {
	w.mu.Lock()
	if w.err != nil {
		w.mu.Unlock()
		return 0, w.err
	}
	// An old segment is replaced only once it holds records (so it can be
	// dropped when they are in the log); an empty one is kept, and an idle
	// journal creates no file on a request's path.
	if w.cur == nil || w.cur.records >= w.maxRecs || (w.cur.records > 0 && time.Since(w.cur.opened) > w.maxAge) {
		if err := w.rotateLocked(); err != nil {
			w.err = fmt.Errorf("receipt journal: %w", err)
			w.mu.Unlock()
			return 0, w.err
		}
	}
	seg := w.cur
	seg.records += n
	seg.pending += n
	w.mu.Unlock()
	// Only this goroutine writes, so the file needs no lock.
	_, err := seg.f.Write(buf)
	if err == nil {
		err = fsutil.DataSync(seg.f)
	}
	if err != nil {
		w.mu.Lock()
		w.err = fmt.Errorf("receipt journal %s: %w", seg.f.Name(), err)
		w.mu.Unlock()
		return 0, w.err
	}
	return seg.seq, nil
}

func (w *wal) rotateLocked() error {
	if w.cur != nil {
		w.cur.sealed = true
		if err := w.maybeDropLocked(w.cur); err != nil {
			return err
		}
	}
	seq := w.nextSeq
	w.nextSeq++
	f, err := os.OpenFile(filepath.Join(w.dir, segmentName(seq)), os.O_WRONLY|os.O_CREATE|os.O_EXCL|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	if err := fsutil.SyncDir(w.dir); err != nil {
		_ = f.Close()
		return err
	}
	w.cur = &segment{seq: seq, f: f, opened: time.Now()}
	w.segments[seq] = w.cur
	return nil
}

// dropIdle deletes the current segment once every record in it is in the
// log and it is older than a segment may be: an idle journal would keep
// its last receipts' bodies until the next write, past any retention.
// The next write opens a new segment.
func (w *wal) dropIdle() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	c := w.cur
	if w.err != nil || c == nil || c.records == 0 || c.pending > 0 || time.Since(c.opened) <= w.maxAge {
		return nil
	}
	c.sealed = true
	w.cur = nil
	// A file left behind holds only receipts the log has: the next start
	// finds them there and deletes it. Not a reason to stop the journal.
	if err := w.maybeDropLocked(c); err != nil {
		return fmt.Errorf("receipt journal: dropping an idle segment: %w", err)
	}
	return nil
}

// failed is the journal's sticky error, nil while it works.
func (w *wal) failed() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err
}

// release marks one record of segment seq as in the log.
func (w *wal) release(seq uint64) {
	w.mu.Lock()
	defer w.mu.Unlock()
	s := w.segments[seq]
	if s == nil {
		return
	}
	s.pending--
	if err := w.maybeDropLocked(s); err != nil && w.err == nil {
		w.err = fmt.Errorf("receipt journal: %w", err)
	}
}

// maybeDropLocked deletes a sealed segment whose records are all in the log.
func (w *wal) maybeDropLocked(s *segment) error {
	if !s.sealed || s.pending > 0 {
		return nil
	}
	delete(w.segments, s.seq)
	cerr := s.f.Close()
	if err := os.Remove(s.f.Name()); err != nil {
		return errors.Join(cerr, err)
	}
	return cerr
}

// close stops the committer; segments still holding records stay on disk
// for the next start.
func (w *wal) close(ctx context.Context) error {
	w.closeOnce.Do(func() { close(w.stop) })
	select {
	case <-w.done:
	case <-ctx.Done():
		// The committer is stuck (a sync that does not return): leave the
		// files to the next start rather than hold the shutdown.
		return fmt.Errorf("receipt journal: closing: %w", ctx.Err())
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	var errs []error
	for _, s := range w.segments {
		s.sealed = true
		if s.pending == 0 {
			errs = append(errs, w.maybeDropLocked(s))
		} else {
			errs = append(errs, s.f.Close())
		}
	}
	return errors.Join(errs...)
}
