package server

import (
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/knhk/knhk/pkg/receipt"
)

// registerReceiptMetrics exports the receipt service's own counters; call
// it once receipts are open.
func (s *Server) registerReceiptMetrics() {
	rs := s.receipts
	if rs == nil {
		return
	}
	s.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
		Name: "knhk_receipt_index_flush_errors_total",
		Help: "Failed writes of the receipt-id index (each retry counts); bundles are served from memory meanwhile.",
	}, func() float64 { return float64(rs.IndexFlushErrors()) }))
}

// receiptsHealth says why receipts are unhealthy (for /readyz), "" when
// they are fine or off.
//
// failed means no receipt can be logged: knhk is not ready. degraded means
// receipts are still issued but recent ones may not be found by id yet:
// still ready, since pulling knhk out of service would only send requests
// past it. Neither text names a file; the log has the cause.
func (s *Server) receiptsHealth() (failed, degraded string) {
	if s.receipts == nil {
		return "", ""
	}
	if err := s.receipts.Failed(); err != nil {
		failed = "the receipt journal failed, so no receipt can be logged (the log has the cause)"
	}
	if n := s.receipts.IndexFlushErrors(); s.receipts.Degraded() != nil && n > 0 {
		degraded = fmt.Sprintf("the receipt index is failing to flush (%d errors): recent receipts may not be found by id until it recovers", n)
	}
	return failed, degraded
}

// internalError answers 500 without the error's text, which can name
// files on the server; the log gets it.
func (s *Server) internalError(w http.ResponseWriter, what string, err error) {
	s.log.Error(what+" failed", "error", err.Error())
	writeJSON(w, http.StatusInternalServerError, apiError{what + " failed; the server log has the reason"})
}

// retryAfterSeconds is a Retry-After value: whole seconds, rounded up, at
// least 1.
func retryAfterSeconds(d time.Duration) int {
	return max(1, int(math.Ceil(d.Seconds())))
}

// notIntegratedView is the 404 of a receipt that is logged but not yet in
// a signed checkpoint: when to ask again, and the checkpoint interval (a
// client's default wait).
type notIntegratedView struct {
	Error                     string  `json:"error"`
	RetryAfterSeconds         int     `json:"retry_after_seconds"`
	CheckpointIntervalSeconds float64 `json:"checkpoint_interval_seconds"`
}

func (s *Server) receiptsOff(w http.ResponseWriter) bool {
	if s.receipts == nil {
		writeJSON(w, http.StatusNotFound, apiError{"receipts are off (receipts.enabled: false)"})
		return true
	}
	return false
}

// handleReceipt serves GET /v1/receipts/{id}: id is the receipt id in hex
// (32 characters) or a whole x-knhk-receipt token.
func (s *Server) handleReceipt(w http.ResponseWriter, r *http.Request) {
	if s.receiptsOff(w) {
		return
	}
	raw := r.PathValue("id")
	var id [16]byte
	if tok, err := receipt.ParseToken(raw); err == nil {
		id = tok.ID
	} else if b, err := hex.DecodeString(raw); err == nil && len(b) == len(id) {
		copy(id[:], b)
	} else {
		writeJSON(w, http.StatusBadRequest, apiError{"receipt id: want 32 hex characters or an x-knhk-receipt token"})
		return
	}
	b, err := s.receipts.Bundle(r.Context(), id)
	var ni *receipt.NotIntegratedError
	switch {
	case errors.As(err, &ni):
		secs := retryAfterSeconds(ni.RetryAfter)
		w.Header().Set("Retry-After", strconv.Itoa(secs))
		writeJSON(w, http.StatusNotFound, notIntegratedView{err.Error(), secs, ni.CheckpointInterval.Seconds()})
	case errors.Is(err, receipt.ErrNotFound):
		writeJSON(w, http.StatusNotFound, apiError{err.Error()})
	case err != nil:
		s.internalError(w, "reading the receipt", err)
	case s.region != nil:
		rb, err := s.region.bundle(r.Context(), s.receipts, id, b)
		if err != nil {
			s.internalError(w, "reading the receipt", err)
			return
		}
		writeJSON(w, http.StatusOK, rb)
	default:
		writeJSON(w, http.StatusOK, b)
	}
}

func (s *Server) handleCheckpoint(w http.ResponseWriter, r *http.Request) {
	if s.receiptsOff(w) {
		return
	}
	cp, err := s.receipts.Checkpoint(r.Context())
	if errors.Is(err, receipt.ErrNoCheckpoint) {
		w.Header().Set("Retry-After", "1")
		writeJSON(w, http.StatusServiceUnavailable, apiError{err.Error()})
		return
	}
	if err != nil {
		s.internalError(w, "reading the checkpoint", err)
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	_, _ = w.Write(cp)
}

func (s *Server) handleKeys(w http.ResponseWriter, _ *http.Request) {
	if s.receipts == nil && s.region != nil {
		// A region that only witnesses still publishes its witness key.
		writeJSON(w, http.StatusOK, map[string]string{"witness_verifier_key": s.region.key.Verifier, "mirror_verifier_key": s.region.mirrorKey.Verifier})
		return
	}
	if s.receiptsOff(w) {
		return
	}
	k, err := s.receipts.Published()
	if err != nil {
		s.internalError(w, "listing the keys", err)
		return
	}
	var witness, mirror string
	if s.region != nil {
		witness, mirror = s.region.key.Verifier, s.region.mirrorKey.Verifier
	}
	// The cosigning keys sit beside the log's checkpoint keys, so an
	// operator copies them all into the peers' region.peers[] entry.
	writeJSON(w, http.StatusOK, struct {
		receipt.PublishedKeys
		WitnessVerifierKey string `json:"witness_verifier_key,omitempty"`
		MirrorVerifierKey  string `json:"mirror_verifier_key,omitempty"`
	}{k, witness, mirror})
}

// handleKeysRefresh serves POST /v1/keys/refresh: pick up a KMS key
// rotated in the KMS now rather than at the next receipts.kms.refresh_interval.
func (s *Server) handleKeysRefresh(w http.ResponseWriter, r *http.Request) {
	if s.receiptsOff(w) {
		return
	}
	changed, err := s.receipts.RefreshKMS(r.Context())
	if err != nil {
		writeJSON(w, http.StatusBadGateway, apiError{err.Error()})
		return
	}
	k, err := s.receipts.Published()
	if err != nil {
		s.internalError(w, "listing the keys", err)
		return
	}
	writeJSON(w, http.StatusOK, struct {
		Changed bool `json:"changed"`
		receipt.PublishedKeys
	}{changed, k})
}

// handleConsistency serves GET /v1/consistency?from=N&to=M.
func (s *Server) handleConsistency(w http.ResponseWriter, r *http.Request) {
	if s.receiptsOff(w) {
		return
	}
	from, err1 := strconv.ParseUint(r.URL.Query().Get("from"), 10, 64)
	to, err2 := strconv.ParseUint(r.URL.Query().Get("to"), 10, 64)
	if err1 != nil || err2 != nil {
		writeJSON(w, http.StatusBadRequest, apiError{"from and to: tree sizes, whole numbers"})
		return
	}
	p, err := s.receipts.Consistency(r.Context(), from, to)
	switch {
	case errors.Is(err, receipt.ErrBadRange):
		writeJSON(w, http.StatusBadRequest, apiError{err.Error()})
		return
	case errors.Is(err, receipt.ErrNoCheckpoint):
		w.Header().Set("Retry-After", "1")
		writeJSON(w, http.StatusServiceUnavailable, apiError{err.Error()})
		return
	case err != nil:
		s.internalError(w, "building the consistency proof", err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"from": from, "to": to, "proof": p})
}
