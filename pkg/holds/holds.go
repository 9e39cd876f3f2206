// Package holds keeps legal holds: receipts (by id, time range or caller)
// whose bodies receipt retention must not prune until the hold is lifted
// or expires. Holds are durable (bbolt), and every change is itself a
// logged receipt (entry.go), so it is in the tamper-evident log, where a
// mirror can read and apply it.
//
// A hold is in force from before its entry is logged until after its lift
// is: a change that could not be logged yet keeps the hold (state
// "unlogged" or "lifting") and is logged again until it is, so the log
// may hold a change twice, never a hold knhk did not honour.
package holds

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/knhk/knhk/pkg/receipt"
)

// Log is what holds need of the receipt service.
type Log interface {
	// Issue logs a receipt durably and returns its token.
	Issue(ctx context.Context, r *receipt.Receipt) (string, error)
	// SetHolds makes a set of holds the one retention keeps; it returns
	// once no body is being pruned under the previous set.
	SetHolds(*receipt.HoldSet)
}

// State says whether a hold's last change is in the log.
type State string

const (
	StateActive   State = "active"   // placed, and its entry is in the log
	StateUnlogged State = "unlogged" // in force; its place entry is not in the log yet (retried)
	StateLifting  State = "lifting"  // lift asked; in force until the lift entry is in the log (retried)
)

// Errors of Place and Lift. ErrNotLogged comes with the hold, which is in
// force all the same.
var (
	ErrTooMany   = errors.New("too many holds")
	ErrNotFound  = errors.New("no such hold")
	ErrNotLogged = errors.New("the hold change is not in the receipt log yet")
	ErrClosed    = errors.New("holds are closing")
)

// Hold is one legal hold.
type Hold struct {
	ID       [16]byte
	Selector Selector
	Reason   string
	Expires  time.Time // zero: until lifted
	Placed   time.Time
	PlacedBy string // the admin caller's identity ("" on loopback)
	LiftedBy string
	State    State
	Receipt  string     // token of its latest logged place entry
	Entries  [][16]byte // ids of its logged place entries: kept from pruning while it lasts
}

// maxEntries bounds Entries (a change logged again after a failure).
const maxEntries = 8

func (h *Hold) entry(action string) Entry {
	return Entry{Action: action, ID: h.ID, Selector: h.Selector, Reason: h.Reason, Expires: h.Expires, Placed: h.Placed}
}

// View is a hold in GET /v1/holds, and on disk (with entries).
type View struct {
	ID        string   `json:"id"`
	ReceiptID string   `json:"receipt_id,omitempty"`
	From      string   `json:"from,omitempty"`
	Until     string   `json:"until,omitempty"`
	Caller    string   `json:"caller,omitempty"`
	Reason    string   `json:"reason"`
	Expires   string   `json:"expires,omitempty"`
	Placed    string   `json:"placed"`
	PlacedBy  string   `json:"placed_by,omitempty"`
	LiftedBy  string   `json:"lifted_by,omitempty"`
	State     State    `json:"state"`
	Receipt   string   `json:"receipt,omitempty"` // the token of its place entry: GET /v1/receipts/{token}
	Entries   []string `json:"entries,omitempty"` // on disk only
}

func (h *Hold) view() View {
	v := View{ID: hex.EncodeToString(h.ID[:]), Reason: h.Reason, Expires: formatTime(h.Expires), Placed: formatTime(h.Placed),
		PlacedBy: h.PlacedBy, LiftedBy: h.LiftedBy, State: h.State, Receipt: h.Receipt}
	switch h.Selector.Kind {
	case receipt.HoldReceipt:
		v.ReceiptID = hex.EncodeToString(h.Selector.ReceiptID[:])
	case receipt.HoldTimeRange:
		v.From, v.Until = formatTime(h.Selector.From), formatTime(h.Selector.Until)
	case receipt.HoldCaller:
		v.Caller = h.Selector.Caller
	}
	return v
}

// record is a hold as stored: its view, entries included.
func (h *Hold) record() ([]byte, error) {
	v := h.view()
	for _, e := range h.Entries {
		v.Entries = append(v.Entries, hex.EncodeToString(e[:]))
	}
	return json.Marshal(v)
}

// readRecord parses a stored hold as strictly as a request.
func readRecord(b []byte) (*Hold, error) {
	var v View
	if err := json.Unmarshal(b, &v); err != nil {
		return nil, err
	}
	f := map[string]string{"reason": v.Reason}
	for k, s := range map[string]string{"receipt_id": v.ReceiptID, "from": v.From, "until": v.Until, "caller": v.Caller} {
		if s != "" {
			f[k] = s
		}
	}
	h := &Hold{Reason: v.Reason, PlacedBy: v.PlacedBy, LiftedBy: v.LiftedBy, State: v.State, Receipt: v.Receipt}
	var err error
	if h.ID, err = parseID("id", v.ID); err != nil {
		return nil, err
	}
	if h.Selector, err = parseSelector(f); err != nil {
		return nil, err
	}
	if _, err = parseReason(f); err != nil {
		return nil, err
	}
	if h.Placed, err = parseTime("placed", v.Placed); err != nil {
		return nil, err
	}
	if v.Expires != "" {
		if h.Expires, err = parseTime("expires", v.Expires); err != nil {
			return nil, err
		}
	}
	switch h.State {
	case StateActive, StateUnlogged, StateLifting:
	default:
		return nil, fmt.Errorf("state %q", h.State)
	}
	for _, e := range v.Entries {
		id, err := parseID("entries", e)
		if err != nil {
			return nil, err
		}
		h.Entries = append(h.Entries, id)
	}
	return h, nil
}

// Options tune a Manager; the zero value is the defaults.
type Options struct {
	Max        int              // holds in place at once (default MaxHolds)
	RetryEvery time.Duration    // how often unlogged changes are logged again and expired holds dropped (default 30 s)
	LogTimeout time.Duration    // the most logging one change may take (default 10 s)
	Now        func() time.Time // default time.Now
}

// Manager owns the holds: one goroutine applies every change, in order;
// List and the counts read a snapshot it replaces whole.
type Manager struct {
	db   *bolt.DB
	lg   Log
	log  *slog.Logger
	opts Options

	ctx       context.Context // ends at Close: logging in progress gives up
	cancel    context.CancelFunc
	reqs      chan func()
	stop      chan struct{}
	done      chan struct{}
	closeOnce sync.Once

	holds map[[16]byte]*Hold // the owner goroutine's (and Open's, before it starts)

	list     atomic.Pointer[[]View]
	unlogged atomic.Int64
}

var bucketHolds = []byte("holds")

// Open loads the holds in path (a bbolt file, created 0600), hands them to
// lg before it returns, so retention never runs without them, and starts
// the owner goroutine, which at once logs the changes a crash left
// unlogged.
func Open(path string, lg Log, logger *slog.Logger, opts Options) (*Manager, error) {
	if opts.Max <= 0 {
		opts.Max = MaxHolds
	}
	if opts.RetryEvery <= 0 {
		opts.RetryEvery = 30 * time.Second
	}
	if opts.LogTimeout <= 0 {
		opts.LogTimeout = 10 * time.Second
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		return nil, fmt.Errorf("holds %s: %w", path, err)
	}
	m := &Manager{db: db, lg: lg, log: logger, opts: opts, reqs: make(chan func()), stop: make(chan struct{}), done: make(chan struct{}),
		holds: map[[16]byte]*Hold{}}
	err = db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(bucketHolds)
		if err != nil {
			return err
		}
		return b.ForEach(func(k, v []byte) error {
			h, err := readRecord(v)
			if err != nil {
				return fmt.Errorf("hold %x: %w", k, err)
			}
			m.holds[h.ID] = h
			return nil
		})
	})
	if err == nil {
		err = m.publish()
	}
	if err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("holds %s: %w", path, err)
	}
	m.ctx, m.cancel = context.WithCancel(context.Background())
	go m.run()
	return m, nil
}

func (m *Manager) run() {
	defer close(m.done)
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case f := <-m.reqs:
			f()
		case <-t.C:
			m.retry()
			m.expire()
			t.Reset(m.opts.RetryEvery)
		case <-m.stop:
			return
		}
	}
}

// do runs f on the owner goroutine and waits for it, or for ctx (f then
// still runs to its end).
func (m *Manager) do(ctx context.Context, f func()) error {
	finished := make(chan struct{})
	select {
	case m.reqs <- func() { f(); close(finished) }:
	case <-ctx.Done():
		return ctx.Err()
	case <-m.done:
		return ErrClosed
	}
	select {
	case <-finished:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Place places a hold for the admin caller by and logs it. With
// ErrNotLogged the hold is in force all the same, and its entry is logged
// later.
func (m *Manager) Place(ctx context.Context, req PlaceRequest, by string) (View, error) {
	var v View
	var err error
	if e := m.do(ctx, func() { v, err = m.place(req, by) }); e != nil {
		return View{}, e
	}
	return v, err
}

// Lift lifts hold id for the admin caller by and returns the token of the
// lift's entry. With ErrNotLogged the hold stays in force until its lift
// is logged, which is retried.
func (m *Manager) Lift(ctx context.Context, id [16]byte, by string) (View, string, error) {
	var v View
	var tok string
	var err error
	if e := m.do(ctx, func() { v, tok, err = m.lift(id, by) }); e != nil {
		return View{}, "", e
	}
	return v, tok, err
}

// List is every hold, oldest first.
func (m *Manager) List() []View { return slices.Clone(*m.list.Load()) }

// Count is the number of holds.
func (m *Manager) Count() int { return len(*m.list.Load()) }

// Unlogged is the number of holds whose last change is not logged yet.
func (m *Manager) Unlogged() int { return int(m.unlogged.Load()) }

// Close stops the owner (a change being logged gives up: it is logged at
// the next start) and closes the file.
func (m *Manager) Close() error {
	m.cancel()
	m.closeOnce.Do(func() { close(m.stop) })
	<-m.done
	return m.db.Close()
}

func (m *Manager) place(req PlaceRequest, by string) (View, error) {
	if len(m.holds) >= m.opts.Max {
		return View{}, fmt.Errorf("%w: %d are in place, the most knhk keeps; lift one first", ErrTooMany, m.opts.Max)
	}
	h := &Hold{Selector: req.Selector, Reason: req.Reason, Expires: req.Expires, Placed: m.opts.Now().UTC(), PlacedBy: by, State: StateUnlogged}
	if _, err := rand.Read(h.ID[:]); err != nil {
		return View{}, err
	}
	if err := m.put(h); err != nil {
		return View{}, err
	}
	m.holds[h.ID] = h
	// In force before its entry is logged: a body it holds is never pruned
	// once it is in the log.
	if err := m.publish(); err != nil {
		return h.view(), err
	}
	if err := m.logPlace(h); err != nil {
		return h.view(), err
	}
	return h.view(), nil
}

func (m *Manager) lift(id [16]byte, by string) (View, string, error) {
	h, ok := m.holds[id]
	if !ok {
		return View{}, "", ErrNotFound
	}
	if h.State != StateLifting {
		// Recorded first, so that a lift the log cannot take yet is
		// retried (with the place before it) rather than forgotten.
		h.State, h.LiftedBy = StateLifting, by
		if err := m.put(h); err != nil {
			return h.view(), "", err
		}
		m.unlogged.Store(m.countUnlogged())
		if err := m.publish(); err != nil { // still in force: only its state shows
			return h.view(), "", err
		}
	}
	tok, err := m.logLift(h)
	return h.view(), tok, err
}

// logPlace logs h's place entry and records that it did.
func (m *Manager) logPlace(h *Hold) error {
	tok, id, err := m.issue(h.entry(ActionPlace), h.PlacedBy)
	if err != nil {
		m.log.Warn("legal hold in force, but its entry could not be logged yet; retrying", "hold", hex.EncodeToString(h.ID[:]), "error", err.Error())
		return fmt.Errorf("%w (it is in force, and logged as soon as the receipt log takes it): %w", ErrNotLogged, err)
	}
	if h.State != StateLifting {
		h.State = StateActive
	}
	h.Receipt = tok
	h.Entries = append(h.Entries, id)
	if len(h.Entries) > maxEntries {
		h.Entries = h.Entries[len(h.Entries)-maxEntries:]
	}
	if err := m.put(h); err != nil {
		// In force and logged; the next start logs it again, which a
		// reader of the log takes as the same hold.
		m.log.Error("legal hold logged, but the holds file could not record it", "hold", hex.EncodeToString(h.ID[:]), "error", err.Error())
	}
	if err := m.publish(); err != nil { // its entry joins what retention keeps
		return err
	}
	m.log.Info("legal hold placed", "hold", hex.EncodeToString(h.ID[:]), "selector", h.Selector.kind(), "expires", formatTime(h.Expires),
		"placed_by", h.PlacedBy, "receipt", hex.EncodeToString(id[:]))
	return nil
}

// logLift logs h's lift and then drops it; a hold whose place was never
// logged gets its place logged first, so that the log never has a lift
// before its place.
func (m *Manager) logLift(h *Hold) (string, error) {
	if len(h.Entries) == 0 {
		if err := m.logPlace(h); err != nil {
			return "", err
		}
	}
	tok, id, err := m.issue(h.entry(ActionLift), h.LiftedBy)
	if err != nil {
		m.log.Warn("legal hold lift could not be logged yet; the hold stays in force until it is; retrying", "hold", hex.EncodeToString(h.ID[:]), "error", err.Error())
		return "", fmt.Errorf("%w (the hold stays in force until it is; retried): %w", ErrNotLogged, err)
	}
	if err := m.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketHolds).Delete(h.ID[:]) }); err != nil {
		// Lifted in the log; the next start logs the lift again and drops it.
		m.log.Error("legal hold lift logged, but the holds file could not drop it", "hold", hex.EncodeToString(h.ID[:]), "error", err.Error())
	}
	delete(m.holds, h.ID)
	if err := m.publish(); err != nil {
		return tok, err
	}
	m.log.Info("legal hold lifted", "hold", hex.EncodeToString(h.ID[:]), "lifted_by", h.LiftedBy, "receipt", hex.EncodeToString(id[:]))
	return tok, nil
}

func (m *Manager) issue(e Entry, by string) (string, [16]byte, error) {
	r, err := e.Receipt(by, m.opts.Now())
	if err != nil {
		return "", [16]byte{}, err
	}
	ctx, cancel := context.WithTimeout(m.ctx, m.opts.LogTimeout)
	defer cancel()
	tok, err := m.lg.Issue(ctx, &r)
	return tok, r.ID, err
}

func (m *Manager) put(h *Hold) error {
	v, err := h.record()
	if err != nil {
		return err
	}
	return m.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketHolds).Put(h.ID[:], v) })
}

// sorted is the holds, oldest first.
func (m *Manager) sorted() []*Hold {
	hs := make([]*Hold, 0, len(m.holds))
	for _, h := range m.holds {
		hs = append(hs, h)
	}
	slices.SortFunc(hs, func(a, b *Hold) int {
		if c := a.Placed.Compare(b.Placed); c != 0 {
			return c
		}
		return cmp.Compare(hex.EncodeToString(a.ID[:]), hex.EncodeToString(b.ID[:]))
	})
	return hs
}

// publish hands retention the holds (every state holds) and the entries
// of each, and replaces the snapshot List reads.
func (m *Manager) publish() error {
	var set []receipt.Hold
	views := []View{}
	for _, h := range m.sorted() {
		views = append(views, h.view())
		set = append(set, h.Selector.hold(h.Expires))
		for _, id := range h.Entries {
			set = append(set, receipt.Hold{Kind: receipt.HoldReceipt, ReceiptID: id, Expires: h.Expires})
		}
	}
	hs, err := receipt.NewHoldSet(set)
	if err != nil {
		return err
	}
	m.lg.SetHolds(hs)
	m.list.Store(&views)
	m.unlogged.Store(m.countUnlogged())
	return nil
}

func (m *Manager) countUnlogged() int64 {
	n := int64(0)
	for _, h := range m.holds {
		if h.State != StateActive {
			n++
		}
	}
	return n
}

// retry logs the changes not logged yet, oldest first, until one fails:
// the log is not taking them, and the next retry tries again.
func (m *Manager) retry() {
	for _, h := range m.sorted() {
		var err error
		switch h.State {
		case StateUnlogged:
			err = m.logPlace(h)
		case StateLifting:
			_, err = m.logLift(h)
		}
		if err != nil {
			return // logged by logPlace or logLift
		}
	}
}

// expire drops the holds past their expiry: their entries say when, so a
// mirror drops them too, without another entry.
func (m *Manager) expire() {
	now := m.opts.Now()
	changed := false
	for _, h := range m.sorted() {
		if h.Expires.IsZero() || now.Before(h.Expires) {
			continue
		}
		if err := m.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketHolds).Delete(h.ID[:]) }); err != nil {
			m.log.Error("an expired legal hold could not be dropped from the holds file; retrying", "hold", hex.EncodeToString(h.ID[:]), "error", err.Error())
			continue
		}
		delete(m.holds, h.ID)
		changed = true
		if h.State == StateUnlogged {
			m.log.Warn("legal hold expired before its entry could be logged", "hold", hex.EncodeToString(h.ID[:]))
		} else {
			m.log.Info("legal hold expired", "hold", hex.EncodeToString(h.ID[:]), "expires", formatTime(h.Expires))
		}
	}
	if changed {
		if err := m.publish(); err != nil {
			m.log.Error("legal holds: publishing after expiry", "error", err.Error())
		}
	}
}
