// Package promotion owns the rollout: the one canary weight that feeds both
// the ext_proc hash split and Envoy's weighted clusters, the state machine
// that moves it, and the analysis of the canary against stable.
package promotion

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/knhk/knhk/pkg/canary"
)

// Phase is the rollout state.
type Phase string

const (
	Idle        Phase = "Idle"
	Progressing Phase = "Progressing"
	Paused      Phase = "Paused"
	Promoted    Phase = "Promoted"
	RolledBack  Phase = "RolledBack"
)

// Phases lists every phase (for metrics).
var Phases = []Phase{Idle, Progressing, Paused, Promoted, RolledBack}

// ErrConflict is returned for an action the current phase does not allow.
var ErrConflict = errors.New("conflict")

// Config is the rollout's behaviour.
type Config struct {
	Steps            []float64 // percent, strictly increasing, last one 100
	Interval         time.Duration
	Window           time.Duration // observations judged at each check
	FailureThreshold int           // consecutive failed checks before rollback
	// ConfirmAfter is how soon a failed check is re-checked instead of
	// waiting a whole interval: rollback then takes one interval plus this,
	// not interval × threshold.
	ConfirmAfter time.Duration
	Thresholds   Thresholds
	// Hard breach: roll back at once when, of the canary's last
	// HardMinRequests requests (all within HardWindow), at least
	// HardErrorRate failed. Counting the latest requests rather than a time
	// window means healthy traffic from before a fault does not dilute it.
	HardErrorRate   float64
	HardMinRequests uint64
	HardWindow      time.Duration
	MaxDecisions    int // decision log kept in state
}

// Decision is one entry of the decision log.
type Decision struct {
	Time     time.Time  `json:"time"`
	Decision string     `json:"decision"` // start, advance, hold, rollback, promote, pause, resume, abort
	Reason   string     `json:"reason"`   // check name or "manual"
	Detail   string     `json:"detail"`
	Weight   float64    `json:"weight"`
	Phase    Phase      `json:"phase"`
	Judgment *Judgement `json:"judgement,omitempty"`
}

// State is what is persisted: enough to resume at the same weight.
type State struct {
	Phase     Phase      `json:"phase"`
	Step      int        `json:"step"` // index into Steps while Progressing/Paused
	Weight    float64    `json:"weight"`
	Failures  int        `json:"consecutive_failures"`
	Updated   time.Time  `json:"updated"`
	Decisions []Decision `json:"decisions"`
}

// Store persists State.
type Store interface {
	Load() (State, bool, error)
	Save(State) error
}

// ErrStopped is returned for an action sent after the rollout's owner
// goroutine (Run) has stopped.
var ErrStopped = errors.New("rollout stopped")

// Rollout is the state machine. One goroutine, Run, owns the state: every
// transition (manual actions, scheduled checks, hard breaches, reloads)
// runs there, one at a time, and readers see an immutable snapshot through
// an atomic pointer. Weight and decision listeners are called on that
// goroutine, in commit order, with no lock held; they must not call the
// rollout's actions (that would wait on itself) but may read snapshots.
type Rollout struct {
	cfg    Config
	store  Store
	window *Window
	now    func() time.Time

	snap    atomic.Pointer[snapshot] // what readers see; replaced whole
	ops     chan op                  // transitions for the owner goroutine
	stopped chan struct{}            // closed when Run returns
	running atomic.Bool
	breach  chan struct{}
	manual  bool // tests: checks only when asked, never on the timer

	// Owned by the Run goroutine (and by New/On* before Run starts).
	st        State
	nextCheck time.Time
	listeners []func(weight float64)
	notify    []func(Decision)

	recentMu sync.Mutex // request path only; never held across a call out
	recent   []outcome  // ring of the canary's last HardMinRequests outcomes
	recentAt int
	recentN  int
	recentEr int
}

// snapshot is the published, read-only view of the state.
type snapshot struct {
	st        State // Decisions is clipped: nobody appends into a published slice
	nextCheck time.Time
}

// op is one transition, run on the owner goroutine.
type op struct {
	apply func() error
	done  chan error
}

type outcome struct {
	at     time.Time
	failed bool
}

// New loads persisted state (or starts Idle at idleWeight). Register
// listeners, then call Run: actions wait until Run processes them.
func New(cfg Config, store Store, idleWeight float64, now func() time.Time) (*Rollout, error) {
	if now == nil {
		now = time.Now
	}
	span := max(cfg.Window, cfg.HardWindow)
	r := &Rollout{cfg: cfg, store: store, window: NewWindow(span), now: now,
		ops: make(chan op), stopped: make(chan struct{}), breach: make(chan struct{}, 1),
		recent: make([]outcome, cfg.HardMinRequests)}
	st, ok, err := store.Load()
	if err != nil {
		return nil, fmt.Errorf("rollout state: %w", err)
	}
	if !ok {
		st = State{Phase: Idle, Weight: idleWeight, Updated: now()}
	}
	if st.Phase == Idle {
		st.Weight = idleWeight
	}
	if st.Phase == Progressing || st.Phase == Paused {
		st.Step = min(st.Step, len(cfg.Steps)-1)
	}
	if st.Decisions == nil {
		st.Decisions = []Decision{}
	}
	r.st = st
	r.nextCheck = now().Add(cfg.Interval)
	r.publish()
	return r, nil
}

// OnWeight registers f to be called with every new weight, on the owner
// goroutine, in commit order. It is called once at registration with the
// current weight. Register before Run.
func (r *Rollout) OnWeight(f func(float64)) {
	if r.running.Load() {
		panic("promotion: OnWeight after Run") // a wiring bug, not input
	}
	r.listeners = append(r.listeners, f)
	f(r.st.Weight)
}

// OnDecision registers f for every decision (logs, metrics, webhooks), on
// the owner goroutine. Register before Run.
func (r *Rollout) OnDecision(f func(Decision)) {
	if r.running.Load() {
		panic("promotion: OnDecision after Run")
	}
	r.notify = append(r.notify, f)
}

// Weight is the current canary weight in percent. Safe from any goroutine.
func (r *Rollout) Weight() float64 { return r.snap.Load().st.Weight }

// State returns the current state. Safe from any goroutine; the result is
// shared and must not be modified.
func (r *Rollout) State() State { return r.snap.Load().st }

// Window exposes the observation window (for the API's live figures).
func (r *Rollout) Window() *Window { return r.window }

// Observe records one finished request and checks for a hard breach. It
// runs on the request path: it takes only the window's and the ring's
// short locks, and signals the owner goroutine without waiting.
func (r *Rollout) Observe(v canary.Version, failed bool, latency time.Duration) {
	now := r.now()
	r.window.Observe(now, v, failed, latency)
	if v != canary.Canary || len(r.recent) == 0 {
		return
	}
	r.recentMu.Lock()
	old := r.recent[r.recentAt]
	if r.recentN == len(r.recent) && old.failed {
		r.recentEr--
	}
	r.recent[r.recentAt] = outcome{now, failed}
	r.recentAt = (r.recentAt + 1) % len(r.recent)
	r.recentN = min(r.recentN+1, len(r.recent))
	if failed {
		r.recentEr++
	}
	r.recentMu.Unlock()
	if failed {
		if _, _, breached := r.hardBreached(now); breached {
			select {
			case r.breach <- struct{}{}:
			default:
			}
		}
	}
}

// hardBreached evaluates the ring of the canary's latest outcomes.
func (r *Rollout) hardBreached(now time.Time) (errs, n int, breached bool) {
	r.recentMu.Lock()
	defer r.recentMu.Unlock()
	n, errs = r.recentN, r.recentEr
	if n < len(r.recent) || n == 0 {
		return errs, n, false
	}
	oldest := r.recent[r.recentAt] // the slot about to be overwritten is the oldest
	if now.Sub(oldest.at) > r.cfg.HardWindow {
		return errs, n, false
	}
	return errs, n, float64(errs) >= r.cfg.HardErrorRate*float64(n)
}

// resetRecent forgets the canary's outcomes (a new rollout starts clean).
func (r *Rollout) resetRecent() {
	r.recentMu.Lock()
	r.recentAt, r.recentN, r.recentEr = 0, 0, 0
	r.recentMu.Unlock()
}

// do runs apply on the owner goroutine and waits for it, for ctx, or for
// Run to stop.
func (r *Rollout) do(ctx context.Context, apply func() error) error {
	o := op{apply: apply, done: make(chan error, 1)}
	select {
	case r.ops <- o:
	case <-ctx.Done():
		return ctx.Err()
	case <-r.stopped:
		return ErrStopped
	}
	// Once taken, the op runs to completion: wait for it, not for ctx, so
	// the caller learns what happened.
	return <-o.done
}

// Reconfigure sets the weight used while Idle and runs apply (which may be
// nil) on the owner goroutine with the weight then in force, before the
// weight listeners hear of any change. A config reload uses it so that
// installing new routing can never interleave with a weight change.
func (r *Rollout) Reconfigure(ctx context.Context, idle float64, apply func(weight float64) error) error {
	return r.do(ctx, func() error {
		if apply != nil {
			if err := apply(r.st.Weight); err != nil {
				return err
			}
		}
		if r.st.Phase != Idle || r.st.Weight == idle {
			return nil
		}
		r.st.Weight = idle
		r.commit(nil)
		return nil
	})
}

// transition applies a manual action on the owner goroutine.
func (r *Rollout) transition(ctx context.Context, action string, allowed []Phase, apply func()) error {
	return r.do(ctx, func() error {
		if !slices.Contains(allowed, r.st.Phase) {
			return fmt.Errorf("%w: cannot %s a rollout that is %s (allowed from %v)", ErrConflict, action, r.st.Phase, allowed)
		}
		apply()
		d := Decision{Decision: action, Reason: "manual", Detail: "manual " + action}
		r.commit(&d)
		return nil
	})
}

// Start begins a rollout at the first step.
func (r *Rollout) Start(ctx context.Context) error {
	return r.transition(ctx, "start", []Phase{Idle, Promoted, RolledBack}, func() {
		r.st.Phase, r.st.Step, r.st.Failures = Progressing, 0, 0
		r.st.Weight = r.cfg.Steps[0]
		r.resetRecent()
		r.nextCheck = r.now().Add(r.cfg.Interval)
	})
}

// Promote jumps to 100 %.
func (r *Rollout) Promote(ctx context.Context) error {
	return r.transition(ctx, "promote", []Phase{Progressing, Paused}, func() {
		r.st.Phase, r.st.Weight, r.st.Failures = Promoted, 100, 0
		r.st.Step = len(r.cfg.Steps) - 1
	})
}

// Pause freezes the weight; checks stop.
func (r *Rollout) Pause(ctx context.Context) error {
	return r.transition(ctx, "pause", []Phase{Progressing}, func() { r.st.Phase = Paused })
}

// Resume continues from the paused step.
func (r *Rollout) Resume(ctx context.Context) error {
	return r.transition(ctx, "resume", []Phase{Paused}, func() {
		r.st.Phase, r.st.Failures = Progressing, 0
		r.nextCheck = r.now().Add(r.cfg.Interval)
	})
}

// Abort rolls back to weight 0.
func (r *Rollout) Abort(ctx context.Context) error {
	return r.transition(ctx, "abort", []Phase{Progressing, Paused}, func() {
		r.st.Phase, r.st.Weight, r.st.Failures = RolledBack, 0, 0
	})
}

// check judges the canary if a check is due (or force), and acts. Owner
// goroutine only.
func (r *Rollout) check(force bool) {
	now := r.now()
	if r.st.Phase != Progressing || (!force && now.Before(r.nextCheck)) {
		return
	}
	j := Judge(r.cfg.Thresholds, r.window.Stats(now, canary.Canary, r.cfg.Window), r.window.Stats(now, canary.Stable, r.cfg.Window))
	r.nextCheck = now.Add(r.cfg.Interval)
	d := Decision{Reason: j.Check, Detail: j.Detail, Judgment: &j}
	switch j.Verdict {
	case Hold:
		d.Decision = "hold"
		r.st.Failures = 0
	case Pass:
		r.st.Failures = 0
		r.st.Step = min(r.st.Step+1, len(r.cfg.Steps)-1)
		r.st.Weight = r.cfg.Steps[r.st.Step]
		d.Decision = "advance"
		if r.st.Step == len(r.cfg.Steps)-1 { // the last step is 100 %
			r.st.Phase, r.st.Weight = Promoted, 100
			d.Decision = "promote"
		}
	case Fail:
		r.st.Failures++
		if r.st.Failures >= r.cfg.FailureThreshold {
			r.st.Phase, r.st.Weight = RolledBack, 0
			d.Decision = "rollback"
		} else {
			d.Decision = "hold"
			d.Detail = fmt.Sprintf("failed check %d of %d: %s", r.st.Failures, r.cfg.FailureThreshold, j.Detail)
			if r.cfg.ConfirmAfter > 0 {
				r.nextCheck = now.Add(r.cfg.ConfirmAfter)
			}
		}
	}
	r.commit(&d)
}

// hardBreach rolls back at once if the canary is still failing hard.
// Owner goroutine only.
func (r *Rollout) hardBreach() {
	errs, n, breached := r.hardBreached(r.now())
	if !breached || (r.st.Phase != Progressing && r.st.Phase != Paused) {
		return
	}
	r.st.Phase, r.st.Weight, r.st.Failures = RolledBack, 0, 0
	d := Decision{Decision: "rollback", Reason: "hard_breach",
		Detail: fmt.Sprintf("hard breach: %d of the canary's last %d requests failed (≥ %.0f%%)",
			errs, n, r.cfg.HardErrorRate*100)}
	r.commit(&d)
}

// publish replaces the readers' snapshot. Owner goroutine only.
func (r *Rollout) publish() {
	st := r.st
	st.Decisions = slices.Clip(st.Decisions)
	r.snap.Store(&snapshot{st: st, nextCheck: r.nextCheck})
}

// commit persists the state, appends d (if any), publishes the snapshot
// and notifies listeners. Owner goroutine only; no lock is held.
func (r *Rollout) commit(d *Decision) {
	now := r.now()
	r.st.Updated = now
	if d != nil {
		d.Time, d.Weight, d.Phase = now, r.st.Weight, r.st.Phase
		r.st.Decisions = append(r.st.Decisions, *d)
		if n := r.cfg.MaxDecisions; n > 0 && len(r.st.Decisions) > n {
			r.st.Decisions = append([]Decision(nil), r.st.Decisions[len(r.st.Decisions)-n:]...)
		}
	}
	// Persist before anyone acts on the new weight: after a crash knhk
	// resumes at a weight Envoy may already have, never at an older one.
	err := r.store.Save(r.st)
	r.publish()
	for _, f := range r.listeners {
		f(r.st.Weight)
	}
	if err != nil {
		e := Decision{Time: now, Decision: "error", Reason: "state_store", Detail: "saving rollout state: " + err.Error(), Weight: r.st.Weight, Phase: r.st.Phase}
		for _, f := range r.notify {
			f(e)
		}
	}
	if d != nil {
		for _, f := range r.notify {
			f(*d)
		}
	}
}

// Run is the owner goroutine: it applies transitions, checks on schedule
// and reacts to hard breaches until ctx is done. Call it once.
func (r *Rollout) Run(ctx context.Context) {
	r.running.Store(true)
	defer close(r.stopped)
	t := time.NewTimer(time.Hour)
	defer t.Stop()
	for {
		scheduled := !r.manual && r.st.Phase == Progressing
		// A due check runs before anything else is taken, so a stream of
		// transitions (even refused ones) cannot starve the schedule.
		if scheduled && !r.now().Before(r.nextCheck) {
			r.check(false)
			continue
		}
		var tick <-chan time.Time
		if scheduled {
			// Re-read the schedule at least every second, and after every
			// transition (Start and Resume move it).
			t.Reset(min(r.nextCheck.Sub(r.now()), time.Second))
			tick = t.C
		}
		select {
		case <-ctx.Done():
			return
		case o := <-r.ops:
			o.done <- o.apply()
		case <-r.breach:
			r.hardBreach()
		case <-tick:
		}
	}
}
