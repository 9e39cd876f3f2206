package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/knhk/knhk/pkg/holds"
)

// holdsAPI is /v1/holds: legal holds, which receipt retention
// (receipts.retention.keep_bodies_for) never prunes. It is on the admin
// listener, like the rollout actions: loopback by default, mTLS admitting
// identity.allowed.admin under identity.
type holdsAPI struct {
	s *Server
	m *holds.Manager // nil: receipts are off
}

// holdRoutes registers /v1/holds.
func (s *Server) holdRoutes(mux *http.ServeMux) {
	h := &holdsAPI{s: s, m: s.holds}
	mux.HandleFunc("POST /v1/holds", h.place)
	mux.HandleFunc("GET /v1/holds", h.list)
	mux.HandleFunc("DELETE /v1/holds/{id}", h.lift)
}

// openHolds opens the legal holds (data_dir/receipts/holds.db). Opening
// them hands the receipt service its first hold set, without which
// retention prunes nothing; holds that cannot be opened stop the start,
// as a receipt log that cannot would.
func (s *Server) openHolds() error {
	rs := s.receipts
	m, err := holds.Open(filepath.Join(s.config().DataDir, "receipts", "holds.db"), rs, s.log, holds.Options{})
	if err != nil {
		return fmt.Errorf("legal holds: %w", err)
	}
	s.holds = m
	s.reg.MustRegister(
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "knhk_receipts_pruned_total",
			Help: "Receipt bodies deleted under receipts.retention.keep_bodies_for (their leaf hashes stay)."},
			func() float64 { return float64(rs.PrunedTotal()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "knhk_receipts_held_past_retention",
			Help: "Receipt bodies older than receipts.retention.keep_bodies_for that legal holds keep, as of the last retention pass."},
			func() float64 { return float64(rs.HeldPastRetention()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "knhk_receipt_retention_errors_total",
			Help: "Retention passes that failed (the log has why); the next pass tries again."},
			func() float64 { return float64(rs.RetentionErrors()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "knhk_holds", Help: "Legal holds in place (GET /v1/holds)."},
			func() float64 { return float64(m.Count()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "knhk_holds_unlogged",
			Help: "Legal holds in force whose last change is not in the receipt log yet (retried)."},
			func() float64 { return float64(m.Unlogged()) }))
	return nil
}

// ready answers for the API when holds cannot be had.
func (h *holdsAPI) ready(w http.ResponseWriter) bool {
	if h.m == nil {
		writeJSON(w, http.StatusNotFound, apiError{"receipts are off (receipts.enabled: false): legal holds are about receipts"})
		return false
	}
	return true
}

// adminCaller is the admin client's identity: its SPIFFE ID under mTLS,
// "" on loopback.
func adminCaller(r *http.Request) string {
	if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
		return ""
	}
	id, err := x509svid.IDFromCert(r.TLS.PeerCertificates[0])
	if err != nil {
		return ""
	}
	return id.String()
}

// holdView is a hold in an answer; receipt, the token of a lift's entry.
type holdView struct {
	Hold    holds.View `json:"hold"`
	Receipt string     `json:"receipt,omitempty"`
	Error   string     `json:"error,omitempty"`
}

// place serves POST /v1/holds.
func (h *holdsAPI) place(w http.ResponseWriter, r *http.Request) {
	if !h.ready(w) {
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, holds.MaxBody+1))
	if err != nil {
		writeJSON(w, http.StatusBadRequest, apiError{"holds: reading the body: " + err.Error()})
		return
	}
	if len(body) > holds.MaxBody {
		writeJSON(w, http.StatusRequestEntityTooLarge, apiError{fmt.Sprintf("holds: the body is over the %d-byte limit", holds.MaxBody)})
		return
	}
	req, err := holds.DecodePlace(body, time.Now())
	if err != nil {
		writeJSON(w, http.StatusBadRequest, apiError{err.Error()})
		return
	}
	v, err := h.m.Place(r.Context(), req, adminCaller(r))
	if h.failed(w, "placing the hold", v, err) {
		return
	}
	writeJSON(w, http.StatusCreated, holdView{Hold: v})
}

// list serves GET /v1/holds.
func (h *holdsAPI) list(w http.ResponseWriter, _ *http.Request) {
	if !h.ready(w) {
		return
	}
	writeJSON(w, http.StatusOK, struct {
		Holds []holds.View `json:"holds"`
		Max   int          `json:"max"`
	}{h.m.List(), holds.MaxHolds})
}

// lift serves DELETE /v1/holds/{id}.
func (h *holdsAPI) lift(w http.ResponseWriter, r *http.Request) {
	if !h.ready(w) {
		return
	}
	id, err := holds.ParseID(r.PathValue("id"))
	if err != nil {
		writeJSON(w, http.StatusBadRequest, apiError{err.Error()})
		return
	}
	v, tok, err := h.m.Lift(r.Context(), id, adminCaller(r))
	if errors.Is(err, holds.ErrNotFound) {
		writeJSON(w, http.StatusNotFound, apiError{fmt.Sprintf("holds: no hold %x", id)})
		return
	}
	if h.failed(w, "lifting the hold", v, err) {
		return
	}
	writeJSON(w, http.StatusOK, holdView{Hold: v, Receipt: tok})
}

// failed answers a change that did not go through.
func (h *holdsAPI) failed(w http.ResponseWriter, what string, v holds.View, err error) bool {
	switch {
	case err == nil:
		return false
	case errors.Is(err, holds.ErrTooMany):
		writeJSON(w, http.StatusConflict, apiError{"holds: " + err.Error()})
	case errors.Is(err, holds.ErrNotLogged):
		// The hold is in force (or, for a lift, still is); the change is
		// logged as soon as the receipt log takes it.
		// Its cause (the journal's error) may name files: the log has it.
		msg := "holds: the hold is in force, but its entry is not in the receipt log yet; knhk logs it as soon as the log takes it (the server log has why)"
		if v.State == holds.StateLifting {
			msg = "holds: the lift is not in the receipt log yet, so the hold stays in force until it is; knhk retries (the server log has why)"
		}
		w.Header().Set("Retry-After", "30")
		writeJSON(w, http.StatusServiceUnavailable, holdView{Hold: v, Error: msg})
	case errors.Is(err, holds.ErrClosed), errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		writeJSON(w, http.StatusServiceUnavailable, apiError{"holds: " + what + ": " + err.Error()})
	default:
		h.s.internalError(w, what, err)
	}
	return true
}
