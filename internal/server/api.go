package server

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/pprof"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/knhk/knhk/pkg/canary"
	"github.com/knhk/knhk/pkg/flags"
	"github.com/knhk/knhk/pkg/promotion"
	"github.com/knhk/knhk/xds"
)

func (s *Server) adminMux() *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", s.handleReady)
	mux.Handle("GET /metrics", promhttp.HandlerFor(s.reg, promhttp.HandlerOpts{Registry: s.reg}))
	mux.HandleFunc("GET /v1/canary", s.handleCanary)
	mux.HandleFunc("GET /v1/rollout", s.handleRollout)
	mux.HandleFunc("POST /v1/rollout/{action}", s.handleRolloutAction)
	mux.HandleFunc("GET /v1/flags", s.handleFlags)
	mux.HandleFunc("GET /v1/admission", s.handleAdmission)
	mux.HandleFunc("GET /v1/capacity", s.handleCapacity)
	mux.HandleFunc("GET /v1/receipts/{id}", s.handleReceipt)
	mux.HandleFunc("GET /v1/checkpoint", s.handleCheckpoint)
	mux.HandleFunc("GET /v1/keys", s.handleKeys)
	mux.HandleFunc("POST /v1/keys/refresh", s.handleKeysRefresh)
	mux.HandleFunc("GET /v1/consistency", s.handleConsistency)
	s.holdRoutes(mux) // POST, GET /v1/holds; DELETE /v1/holds/{id}
	mux.HandleFunc("GET /v1/region/evidence", s.handleEvidence)
	mux.HandleFunc("GET /v1/region/policy", s.handlePolicy)
	mux.HandleFunc("GET /v1/region/mirror", s.handleMirror)
	if s.config().Debug.Pprof {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	mux.HandleFunc("GET /v1/xds", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, http.StatusOK, s.xds.Status()) })
	return mux
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

type apiError struct {
	Error string `json:"error"`
}

func (s *Server) handleReady(w http.ResponseWriter, _ *http.Request) {
	if !s.ready.Load() {
		http.Error(w, "not ready: starting or draining", http.StatusServiceUnavailable)
		return
	}
	if err := s.xds.Healthy(); err != nil {
		http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
		return
	}
	failed, degraded := s.receiptsHealth()
	if failed != "" {
		http.Error(w, "not ready: "+failed, http.StatusServiceUnavailable)
		return
	}
	if degraded != "" {
		_, _ = w.Write([]byte("ready, degraded: " + degraded + "\n"))
		return
	}
	_, _ = w.Write([]byte("ready\n"))
}

// canaryView is the JSON of GET /v1/canary.
type canaryView struct {
	Weight     float64  `json:"weight"`
	Salt       string   `json:"salt"`
	StickyKeys []string `json:"sticky_keys"`
}

func (s *Server) handleCanary(w http.ResponseWriter, _ *http.Request) {
	cfg := s.config()
	v := canaryView{Weight: s.rollout.Weight(), Salt: cfg.Canary.Salt, StickyKeys: cfg.Canary.StickyKeys}
	writeJSON(w, http.StatusOK, v)
}

// RolloutView is the JSON of GET /v1/rollout (and the CLI's input).
type RolloutView struct {
	Phase     promotion.Phase            `json:"phase"`
	Weight    float64                    `json:"weight"`
	Step      int                        `json:"step"`
	Steps     []float64                  `json:"steps"`
	Failures  int                        `json:"consecutive_failures"`
	Updated   time.Time                  `json:"updated"`
	Window    map[string]promotion.Stats `json:"window"`
	WindowSec float64                    `json:"window_seconds"`
	Decisions []promotion.Decision       `json:"decisions"`
	XDSNack   *xds.NACK                  `json:"xds_nack,omitempty"`
}

func (s *Server) rolloutView() RolloutView {
	st := s.rollout.State()
	pc := s.config().PromotionConfig()
	now := time.Now()
	win := s.rollout.Window()
	decisions := st.Decisions
	if len(decisions) > 20 {
		decisions = decisions[len(decisions)-20:]
	}
	return RolloutView{
		Phase: st.Phase, Weight: st.Weight, Step: st.Step, Steps: pc.Steps, Failures: st.Failures, Updated: st.Updated,
		Window: map[string]promotion.Stats{
			"stable": win.Stats(now, canary.Stable, pc.Window),
			"canary": win.Stats(now, canary.Canary, pc.Window),
		},
		WindowSec: pc.Window.Seconds(),
		Decisions: decisions,
		XDSNack:   s.xds.LastNACK(),
	}
}

func (s *Server) handleRollout(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, s.rolloutView())
}

func (s *Server) handleRolloutAction(w http.ResponseWriter, r *http.Request) {
	actions := map[string]func(context.Context) error{
		"start": s.rollout.Start, "promote": s.rollout.Promote, "pause": s.rollout.Pause,
		"resume": s.rollout.Resume, "abort": s.rollout.Abort,
	}
	action := r.PathValue("action")
	f, ok := actions[action]
	if !ok {
		writeJSON(w, http.StatusNotFound, apiError{"unknown rollout action " + `"` + action + `"` + ": want start, promote, pause, resume or abort"})
		return
	}
	if err := f(r.Context()); err != nil {
		code := http.StatusInternalServerError
		switch {
		case errors.Is(err, promotion.ErrConflict):
			code = http.StatusConflict
		case errors.Is(err, promotion.ErrStopped):
			code = http.StatusServiceUnavailable
		}
		writeJSON(w, code, apiError{err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, s.rolloutView())
}

// flagsView is the JSON of GET /v1/flags.
type flagsView struct {
	Environment string       `json:"environment"`
	Flags       []flags.View `json:"flags"`
}

func (s *Server) handleFlags(w http.ResponseWriter, _ *http.Request) {
	fs, err := s.config().FlagSet()
	if err != nil {
		writeJSON(w, http.StatusInternalServerError, apiError{err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, flagsView{Environment: fs.Environment(), Flags: fs.List()})
}
