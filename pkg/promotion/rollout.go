// Package promotion owns the rollout: the one canary weight that feeds both
// the ext_proc hash split and Envoy's weighted clusters, the state machine
// that moves it, and the analysis of the canary against stable.
package promotion

import (
	"errors"
	"fmt"
	"sync"
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

// Rollout is the state machine. Methods are safe for concurrent use.
type Rollout struct {
	cfg    Config
	store  Store
	window *Window
	now    func() time.Time

	mu        sync.Mutex
	notifyMu  sync.Mutex // keeps listeners seeing weights in commit order
	st        State
	idle      float64 // weight while Idle (from the config file)
	nextCheck time.Time
	listeners []func(weight float64)
	notify    []func(Decision)
	breach    chan struct{}

	recentMu sync.Mutex
	recent   []outcome // ring of the canary's last HardMinRequests outcomes
	recentAt int
	recentN  int
	recentEr int
}

type outcome struct {
	at     time.Time
	failed bool
}

// New loads persisted state (or starts Idle at idleWeight).
func New(cfg Config, store Store, idleWeight float64, now func() time.Time) (*Rollout, error) {
	if now == nil {
		now = time.Now
	}
	span := max(cfg.Window, cfg.HardWindow)
	r := &Rollout{cfg: cfg, store: store, window: NewWindow(span), now: now, idle: idleWeight, breach: make(chan struct{}, 1),
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
	r.st = st
	r.nextCheck = now().Add(cfg.Interval)
	return r, nil
}

// OnWeight registers f to be called (outside the lock, in order) with every
// new weight. It is called once at registration with the current weight.
func (r *Rollout) OnWeight(f func(float64)) {
	r.mu.Lock()
	r.listeners = append(r.listeners, f)
	w := r.st.Weight
	r.mu.Unlock()
	f(w)
}

// OnDecision registers f for every decision (logs, metrics, webhooks).
func (r *Rollout) OnDecision(f func(Decision)) {
	r.mu.Lock()
	r.notify = append(r.notify, f)
	r.mu.Unlock()
}

// Weight is the current canary weight in percent.
func (r *Rollout) Weight() float64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.st.Weight
}

// State returns a copy of the state.
func (r *Rollout) State() State {
	r.mu.Lock()
	defer r.mu.Unlock()
	st := r.st
	st.Decisions = append([]Decision(nil), r.st.Decisions...)
	return st
}

// Window exposes the observation window (for the API's live figures).
func (r *Rollout) Window() *Window { return r.window }

// Breaches signals a hard breach; the run loop reacts at once.
func (r *Rollout) Breaches() <-chan struct{} { return r.breach }

// Observe records one finished request and checks for a hard breach.
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

// SetIdleWeight changes the weight used while Idle (config reload).
func (r *Rollout) SetIdleWeight(w float64) {
	r.mu.Lock()
	r.idle = w
	if r.st.Phase != Idle || r.st.Weight == w {
		r.mu.Unlock()
		return
	}
	r.st.Weight = w
	r.commit(nil)
}

// transition applies an action under the lock and then commits.
func (r *Rollout) transition(action string, allowed []Phase, apply func()) error {
	r.mu.Lock()
	ok := false
	for _, p := range allowed {
		ok = ok || r.st.Phase == p
	}
	if !ok {
		phase := r.st.Phase
		r.mu.Unlock()
		return fmt.Errorf("%w: cannot %s a rollout that is %s (allowed from %v)", ErrConflict, action, phase, allowed)
	}
	apply()
	d := Decision{Decision: action, Reason: "manual", Detail: "manual " + action}
	r.commit(&d)
	return nil
}

// Start begins a rollout at the first step.
func (r *Rollout) Start() error {
	return r.transition("start", []Phase{Idle, Promoted, RolledBack}, func() {
		r.st.Phase, r.st.Step, r.st.Failures = Progressing, 0, 0
		r.st.Weight = r.cfg.Steps[0]
		r.resetRecent()
		r.nextCheck = r.now().Add(r.cfg.Interval)
	})
}

// Promote jumps to 100 %.
func (r *Rollout) Promote() error {
	return r.transition("promote", []Phase{Progressing, Paused}, func() {
		r.st.Phase, r.st.Weight, r.st.Failures = Promoted, 100, 0
		r.st.Step = len(r.cfg.Steps) - 1
	})
}

// Pause freezes the weight; checks stop.
func (r *Rollout) Pause() error {
	return r.transition("pause", []Phase{Progressing}, func() { r.st.Phase = Paused })
}

// Resume continues from the paused step.
func (r *Rollout) Resume() error {
	return r.transition("resume", []Phase{Paused}, func() {
		r.st.Phase, r.st.Failures = Progressing, 0
		r.nextCheck = r.now().Add(r.cfg.Interval)
	})
}

// Abort rolls back to weight 0.
func (r *Rollout) Abort() error {
	return r.transition("abort", []Phase{Progressing, Paused}, func() {
		r.st.Phase, r.st.Weight, r.st.Failures = RolledBack, 0, 0
	})
}

// Due reports when the next check is due.
func (r *Rollout) Due() time.Time {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.nextCheck
}

// Check judges the canary if a check is due (or force), and acts.
func (r *Rollout) Check(force bool) {
	now := r.now()
	r.mu.Lock()
	if r.st.Phase != Progressing || (!force && now.Before(r.nextCheck)) {
		r.mu.Unlock()
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

// HardBreach rolls back at once if the canary is still failing hard.
func (r *Rollout) HardBreach() {
	errs, n, breached := r.hardBreached(r.now())
	r.mu.Lock()
	if !breached || (r.st.Phase != Progressing && r.st.Phase != Paused) {
		r.mu.Unlock()
		return
	}
	r.st.Phase, r.st.Weight, r.st.Failures = RolledBack, 0, 0
	d := Decision{Decision: "rollback", Reason: "hard_breach",
		Detail: fmt.Sprintf("hard breach: %d of the canary's last %d requests failed (≥ %.0f%%)",
			errs, n, r.cfg.HardErrorRate*100)}
	r.commit(&d)
}

// commit persists the state, appends d (if any) and notifies listeners. It
// is called with r.mu held and releases it.
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
	st := r.st
	listeners, notify := r.listeners, r.notify
	// Persist before anyone acts on the new weight: after a crash knhk
	// resumes at a weight Envoy may already have, never at an older one.
	err := r.store.Save(st)
	r.notifyMu.Lock()
	defer r.notifyMu.Unlock()
	r.mu.Unlock()
	for _, f := range listeners {
		f(st.Weight)
	}
	if err != nil {
		e := Decision{Time: now, Decision: "error", Reason: "state_store", Detail: "saving rollout state: " + err.Error(), Weight: st.Weight, Phase: st.Phase}
		for _, f := range notify {
			f(e)
		}
	}
	if d != nil {
		for _, f := range notify {
			f(*d)
		}
	}
}

// Run checks on schedule and reacts to hard breaches until ctx is done.
func (r *Rollout) Run(done <-chan struct{}) {
	for {
		wait := time.Until(r.Due())
		// Re-read the schedule at least every second: Start and Resume move it.
		wait = min(max(wait, 10*time.Millisecond), time.Second)
		t := time.NewTimer(wait)
		select {
		case <-done:
			t.Stop()
			return
		case <-r.breach:
			t.Stop()
			r.HardBreach()
		case <-t.C:
			r.Check(false)
		}
	}
}
