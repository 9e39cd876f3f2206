package receipt

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/transparency-dev/tessera/api"
	bolt "go.etcd.io/bbolt"

	"github.com/knhk/knhk/internal/fsutil"
)

// Retention (receipts.retention.keep_bodies_for) deletes the bodies of
// receipts older than a limit: paths and caller identities can be personal
// data. A pruned receipt's entry in its entry bundle is replaced by a
// tombstone (tombstone.go) holding its id and leaf hash; the Merkle tiles
// are never touched, so inclusion and consistency proofs keep verifying,
// and the id index keeps finding it. Bodies that a legal hold selects are
// kept however old they are.
//
// Only full bundles the tree is integrated past are rewritten: tessera
// never writes those again. The partial copies of a rewritten bundle
// (<bundle>.p/, which tessera keeps for the checkpoints of smaller trees
// until its garbage collection) are deleted with it; readers asking for a
// partial bundle then fall back to the full one.

// HoldKind is what a hold selects receipts by.
type HoldKind uint8

const (
	HoldReceipt   HoldKind = iota + 1 // one receipt, by id
	HoldTimeRange                     // receipts whose Time is in [From, Until); a zero Until has no end
	HoldCaller                        // receipts whose Caller is Caller
)

// Hold keeps the bodies of the receipts it selects until Expires (zero:
// until it is left out of the next HoldSet).
type Hold struct {
	Kind        HoldKind
	ReceiptID   [16]byte
	From, Until time.Time
	Caller      string
	Expires     time.Time
}

// HoldSet is the holds in force, immutable once made.
type HoldSet struct {
	ids      map[[16]byte]time.Time // the latest expiry; zero: none
	callers  map[string]time.Time
	ranges   []Hold
	spans    map[[4]int64]time.Time // the ranges by from and until (s, ns), for covers
	expiries []time.Time            // every non-zero expiry, sorted
}

// NewHoldSet makes the set of holds.
func NewHoldSet(holds []Hold) (*HoldSet, error) {
	s := &HoldSet{ids: map[[16]byte]time.Time{}, callers: map[string]time.Time{}, spans: map[[4]int64]time.Time{}}
	for i, h := range holds {
		switch h.Kind {
		case HoldReceipt:
			keepLonger(s.ids, h.ReceiptID, h.Expires)
		case HoldCaller:
			if h.Caller == "" {
				return nil, fmt.Errorf("hold %d: an empty caller", i)
			}
			keepLonger(s.callers, h.Caller, h.Expires)
		case HoldTimeRange:
			if !h.Until.IsZero() && !h.Until.After(h.From) {
				return nil, fmt.Errorf("hold %d: the range ends before it starts", i)
			}
			s.ranges = append(s.ranges, h)
			keepLonger(s.spans, [4]int64{h.From.Unix(), int64(h.From.Nanosecond()), h.Until.Unix(), int64(h.Until.Nanosecond())}, h.Expires)
		default:
			return nil, fmt.Errorf("hold %d: kind %d", i, h.Kind)
		}
		if !h.Expires.IsZero() {
			s.expiries = append(s.expiries, h.Expires)
		}
	}
	slices.SortFunc(s.expiries, time.Time.Compare)
	return s, nil
}

// keepLonger records exp for k unless k is already kept longer.
func keepLonger[K comparable](m map[K]time.Time, k K, exp time.Time) {
	old, ok := m[k]
	switch {
	case !ok:
		m[k] = exp
	case old.IsZero() || exp.IsZero():
		m[k] = time.Time{}
	case exp.After(old):
		m[k] = exp
	}
}

func inForce(expires, now time.Time) bool { return expires.IsZero() || now.Before(expires) }

// Holds reports whether a hold in force at now keeps r's body.
func (s *HoldSet) Holds(r *Receipt, now time.Time) bool {
	if exp, ok := s.ids[r.ID]; ok && inForce(exp, now) {
		return true
	}
	if len(s.callers) > 0 {
		if r.Digested.Caller.isZero() {
			if exp, ok := s.callers[r.Caller]; ok && inForce(exp, now) {
				return true
			}
		} else {
			for c, exp := range s.callers { // a caller over 8 KiB: rare
				if inForce(exp, now) && r.Digested.Caller.Matches(c) {
					return true
				}
			}
		}
	}
	t := time.Unix(0, r.Time)
	for _, h := range s.ranges {
		if inForce(h.Expires, now) && !t.Before(h.From) && (h.Until.IsZero() || t.Before(h.Until)) {
			return true
		}
	}
	return false
}

// covers reports whether s keeps everything old keeps, for as long: if
// not, bodies old held may be prunable now.
func (s *HoldSet) covers(old *HoldSet) bool {
	return coversAll(s.ids, old.ids) && coversAll(s.callers, old.callers) && coversAll(s.spans, old.spans)
}

func coversAll[K comparable](now, old map[K]time.Time) bool {
	for k, exp := range old {
		n, ok := now[k]
		if !ok || !lastsAsLong(n, exp) {
			return false
		}
	}
	return true
}

// lastsAsLong reports whether a hold expiring at a lasts as long as one
// expiring at b (zero: until lifted).
func lastsAsLong(a, b time.Time) bool {
	switch {
	case a.IsZero():
		return true
	case b.IsZero():
		return false
	}
	return !a.Before(b)
}

// expiresWithin reports whether a hold of the set expires in (a, b].
func (s *HoldSet) expiresWithin(a, b time.Time) bool {
	for _, e := range s.expiries {
		if e.After(a) && !e.After(b) {
			return true
		}
	}
	return false
}

// ErrHoldsUnknown: no pass prunes anything before the holds are known.
var ErrHoldsUnknown = errors.New("receipt retention waits for the legal holds (none loaded yet), so nothing is pruned")

var errRetentionClosed = errors.New("receipts are closing")

// retention is the Service's pruning state.
type retention struct {
	// mu is held across one bundle's rewrite and guards holds and closed:
	// SetHolds waits for the rewrite in progress, so none made with the old
	// holds completes after it returns. Nothing else is called under it.
	mu       sync.Mutex
	holds    *HoldSet // nil until SetHolds: then nothing is pruned
	released bool     // a SetHolds since the last pass kept less than before
	closed   bool

	// pass runs one pass at a time; it is taken before mu, never after,
	// and guards what follows.
	pass     sync.Mutex
	lastPass time.Time
	recheck  recheck
	waiting  bool // runRetention's own: the "waits for holds" warning is out

	pruned atomic.Uint64 // bodies pruned
	errors atomic.Uint64 // failed passes
	held   atomic.Int64  // bodies past the limit that holds keep, as of the last pass
}

// recheck is the re-examination of the bundles that kept held bodies,
// after the holds kept less (one was lifted, or expired), and at start:
// from the bundle from on, until done.
type recheck struct {
	from    uint64
	pending bool
}

// SetHolds makes holds the set retention keeps from now on. It returns
// once no bundle is being pruned under the previous set, so a body the new
// set holds is never pruned after SetHolds returns. Until it is first
// called, retention prunes nothing.
func (s *Service) SetHolds(holds *HoldSet) {
	s.ret.mu.Lock()
	if old := s.ret.holds; old != nil && !holds.covers(old) {
		s.ret.released = true
	}
	s.ret.holds = holds
	s.ret.mu.Unlock()
}

// PruneStats is what a retention pass did.
type PruneStats struct {
	Bundles int  // entry bundles examined
	Pruned  int  // bodies replaced by tombstones
	Held    int  // bodies past the limit kept by a hold, in the bundles examined
	More    bool // the pass stopped at its budget: more is due
}

// maxPassBundles bounds one pass (256 receipts a bundle): what is left
// is the next pass's.
const maxPassBundles = 1024

// Prune runs one retention pass: it replaces the bodies of receipts whose
// Time is before before, and which no hold keeps, by tombstones. It
// resumes where the last pass stopped (the first bundle holding a receipt
// not yet old enough), and looks again at the bundles it had to keep
// bodies in: for young receipts once they are old enough, for held ones
// once the holds change. A second pass over the same log prunes nothing
// more. It never blocks issuing receipts: it rewrites only bundles the
// log no longer writes, one at a time.
func (s *Service) Prune(ctx context.Context, before time.Time) (PruneStats, error) {
	r := &s.ret
	r.pass.Lock()
	defer r.pass.Unlock()
	var st PruneStats
	r.mu.Lock()
	hs, closed, released := r.holds, r.closed, r.released
	if hs != nil {
		r.released = false
	}
	r.mu.Unlock()
	switch {
	case closed:
		return st, errRetentionClosed
	case hs == nil:
		return st, ErrHoldsUnknown
	}
	now := time.Now()
	if released || r.lastPass.IsZero() || hs.expiresWithin(r.lastPass, now) {
		r.recheck = recheck{pending: true}
	}
	r.lastPass = now
	if s.wal != nil {
		if err := s.wal.dropIdle(); err != nil {
			return st, err
		}
	}
	size, err := s.rlog.IntegratedSize(ctx)
	if err != nil {
		return st, err
	}
	full := size / layoutWidth
	if b := s.pruneBound.Load(); b != nil {
		full = min(full, (*b)()/layoutWidth) // what every mirror holds
	}
	cut := before.UnixNano()
	budget := maxPassBundles
	var held int64
	var errs []error
	// The bundles behind the frontier that kept bodies.
	for from := uint64(0); ; {
		batch, err := s.index.retained(from, 1024)
		if err != nil {
			return st, err
		}
		for _, e := range batch {
			held += int64(e.held)
			if e.bundle >= full {
				continue // a mirror has not got it yet (a peer added since)
			}
			due := e.due != 0 && e.due < cut
			again := r.recheck.pending && e.held > 0 && e.bundle >= r.recheck.from
			if !due && !again {
				continue
			}
			if budget == 0 || ctx.Err() != nil {
				st.More = true
				continue
			}
			budget--
			res, err := s.pruneBundle(ctx, e.bundle, before, now, false)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			st.add(res)
			held += int64(res.held - e.held)
			if again {
				r.recheck.from = e.bundle + 1
			}
		}
		if len(batch) < 1024 {
			break
		}
		from = batch[len(batch)-1].bundle + 1
	}
	if !st.More {
		r.recheck.pending = false
	}
	// The frontier: bundles no pass has finished yet.
	next, err := s.index.pruneNext()
	if err != nil {
		return st, errors.Join(append(errs, err)...)
	}
	for n := next; n < full && ctx.Err() == nil; n++ {
		if budget == 0 {
			st.More = true
			break
		}
		budget--
		res, err := s.pruneBundle(ctx, n, before, now, true)
		if err != nil {
			errs = append(errs, err)
			break
		}
		if res.allYoung {
			break // nothing here is old enough yet: nor, mostly, after it
		}
		st.add(res)
		held += int64(res.held)
	}
	r.held.Store(held)
	if err := errors.Join(errs...); err != nil {
		return st, err
	}
	return st, ctx.Err()
}

func (st *PruneStats) add(r bundleResult) {
	st.Bundles++
	st.Pruned += r.pruned
	st.Held += r.held
}

// bundleResult is what pruning one bundle found.
type bundleResult struct {
	pruned, held, tombstones, young int
	due                             int64 // the earliest Time of a body kept for being young; 0: none
	allYoung                        bool
}

// pruneBundle prunes full bundle n under the holds in force (read under
// mu, which it holds throughout, so SetHolds waits for it). It checks
// every entry against the leaf hash the tree holds for it before writing
// anything, so a tombstone always carries the tree's leaf. At the
// frontier, a bundle with nothing old enough is left as it is, unrecorded.
func (s *Service) pruneBundle(ctx context.Context, n uint64, before, now time.Time, frontier bool) (bundleResult, error) {
	r := &s.ret
	r.mu.Lock()
	defer r.mu.Unlock()
	var res bundleResult
	if r.closed {
		return res, errRetentionClosed
	}
	path := s.rlog.bundlePath(n)
	raw, err := os.ReadFile(path)
	if err != nil {
		return res, fmt.Errorf("receipt log bundle %d: %w", n, err)
	}
	var eb api.EntryBundle
	if err := eb.UnmarshalText(raw); err != nil {
		return res, fmt.Errorf("receipt log bundle %d: %w", n, err)
	}
	if len(eb.Entries) != layoutWidth {
		return res, fmt.Errorf("receipt log bundle %d: %d entries in a full bundle", n, len(eb.Entries))
	}
	leaves, err := s.rlog.leafHashes(ctx, n)
	if err != nil {
		return res, fmt.Errorf("receipt log bundle %d: %w", n, err)
	}
	cut := before.UnixNano()
	out := slices.Clone(eb.Entries)
	for j, e := range eb.Entries {
		idx := n*layoutWidth + uint64(j)
		if _, leaf, ok := ParseTombstone(e); ok {
			if !bytes.Equal(leaf[:], leaves[j]) {
				return res, fmt.Errorf("receipt log entry %d: its tombstone's leaf hash is not the tree's", idx)
			}
			res.tombstones++
			continue
		}
		leaf := LeafHash(e)
		if !bytes.Equal(leaf[:], leaves[j]) {
			return res, fmt.Errorf("receipt log entry %d does not hash to the tree's leaf", idx)
		}
		rc, err := Decode(e)
		if err != nil {
			return res, fmt.Errorf("receipt log entry %d: %w", idx, err)
		}
		switch {
		case rc.Time >= cut:
			res.young++
			if res.due == 0 || rc.Time < res.due {
				res.due = rc.Time
			}
		case r.holds.Holds(&rc, now):
			res.held++
		default:
			out[j] = tombstone(rc.ID, leaf)
			res.pruned++
		}
	}
	res.allYoung = res.young == len(out)
	if frontier && res.allYoung {
		return res, nil
	}
	if res.pruned > 0 {
		data, err := marshalBundle(out)
		if err != nil {
			return res, err
		}
		fi, err := os.Stat(path)
		if err != nil {
			return res, err
		}
		if err := fsutil.WriteFileAtomic(path, data, fi.Mode().Perm()); err != nil {
			return res, fmt.Errorf("receipt log bundle %d: %w", n, err)
		}
	}
	if res.pruned+res.tombstones > 0 {
		// Partial copies hold the bodies too; a crash after the rewrite
		// leaves them to the next pass, which finds the tombstones.
		if err := removePartials(path); err != nil {
			return res, fmt.Errorf("receipt log bundle %d: %w", n, err)
		}
	}
	if err := s.index.setRetained(n, res.held, res.due, frontier); err != nil {
		return res, err
	}
	r.pruned.Add(uint64(res.pruned))
	if res.pruned > 0 { // each pass logs its totals at Info
		s.log.Debug("receipt bodies pruned under receipts.retention",
			"bundle", n, "pruned", res.pruned, "held", res.held, "kept_younger", res.young, "older_than", before.UTC().Format(time.RFC3339))
	}
	return res, nil
}

// removePartials deletes the partial versions of a full bundle.
func removePartials(bundle string) error {
	p := bundle + ".p"
	if _, err := os.Lstat(p); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err := os.RemoveAll(p); err != nil {
		return err
	}
	return fsutil.SyncDir(filepath.Dir(bundle))
}

// retainedBundle is a bundle behind the frontier that kept bodies: held
// ones, or ones not old enough yet (due: the earliest of their times).
type retainedBundle struct {
	bundle uint64
	held   int
	due    int64
}

// retained lists up to n retained bundles from bundle from on, in order.
func (x *index) retained(from uint64, n int) ([]retainedBundle, error) {
	var out []retainedBundle
	err := x.db.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketRetained).Cursor()
		for k, v := c.Seek(binary.BigEndian.AppendUint64(nil, from)); k != nil && len(out) < n; k, v = c.Next() {
			if len(k) != 8 || len(v) != 10 {
				return fmt.Errorf("receipt index: retained record of %d/%d bytes", len(k), len(v))
			}
			out = append(out, retainedBundle{bundle: binary.BigEndian.Uint64(k), held: int(binary.BigEndian.Uint16(v)), due: int64(binary.BigEndian.Uint64(v[2:]))})
		}
		return nil
	})
	return out, err
}

// pruneNext is the frontier: the first bundle no pass has finished.
func (x *index) pruneNext() (uint64, error) {
	var n uint64
	err := x.db.View(func(tx *bolt.Tx) error {
		if v := tx.Bucket(bucketMeta).Get(keyPruneNext); len(v) == 8 {
			n = binary.BigEndian.Uint64(v)
		}
		return nil
	})
	return n, err
}

// setRetained records what bundle n kept, and at the frontier moves it
// past n, in one transaction.
func (x *index) setRetained(n uint64, held int, due int64, advance bool) error {
	return x.db.Update(func(tx *bolt.Tx) error {
		k := binary.BigEndian.AppendUint64(nil, n)
		b := tx.Bucket(bucketRetained)
		var err error
		if held == 0 && due == 0 {
			err = b.Delete(k)
		} else {
			v := binary.BigEndian.AppendUint16(make([]byte, 0, 10), uint16(held))
			err = b.Put(k, binary.BigEndian.AppendUint64(v, uint64(due)))
		}
		if err != nil || !advance {
			return err
		}
		return tx.Bucket(bucketMeta).Put(keyPruneNext, binary.BigEndian.AppendUint64(nil, n+1))
	})
}

// retentionEvery paces passes; a pass that stopped at its budget is
// followed by the next one sooner.
const (
	retentionEvery   = time.Minute
	retentionCatchUp = time.Second
)

// runRetention runs a pass at start and every retentionEvery until ctx
// ends.
func (s *Service) runRetention(ctx context.Context) {
	keep := s.cfg.KeepBodiesFor
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		st, err := s.Prune(ctx, time.Now().Add(-keep))
		wait := retentionEvery
		switch {
		case ctx.Err() != nil || errors.Is(err, errRetentionClosed):
			return
		case errors.Is(err, ErrHoldsUnknown):
			if !s.ret.waiting {
				s.ret.waiting = true
				s.log.Warn(err.Error())
			}
		case err != nil:
			s.ret.errors.Add(1)
			s.log.Error("receipt retention pass failed; it is tried again at the next one", "error", err.Error(), "pruned", st.Pruned)
		case st.More:
			wait = retentionCatchUp
		}
		if err == nil && st.Pruned > 0 {
			s.log.Info("receipt retention pass", "bundles", st.Bundles, "pruned", st.Pruned, "held", st.Held, "more", st.More, "keep_bodies_for", keep.String())
		}
		t.Reset(wait)
	}
}

// PrunedTotal counts receipt bodies pruned under retention.
func (s *Service) PrunedTotal() uint64 { return s.ret.pruned.Load() }

// HeldPastRetention is how many bodies older than the retention limit
// legal holds keep, as of the last pass.
func (s *Service) HeldPastRetention() int64 { return s.ret.held.Load() }

// RetentionErrors counts failed retention passes.
func (s *Service) RetentionErrors() uint64 { return s.ret.errors.Load() }

// SetPruneBound keeps retention from pruning entries at or past bound():
// a peer region's mirror copies bodies from this log, so none is pruned
// before every mirror holds it (a tombstone would not match its leaf).
func (s *Service) SetPruneBound(bound func() uint64) { s.pruneBound.Store(&bound) }
