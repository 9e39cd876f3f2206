package server

import (
	"encoding/hex"
	"errors"
	"net/http"
	"strconv"

	"github.com/knhk/knhk/pkg/receipt"
)

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
	switch {
	case errors.Is(err, receipt.ErrNotIntegrated):
		w.Header().Set("Retry-After", "1")
		writeJSON(w, http.StatusNotFound, apiError{err.Error()})
	case errors.Is(err, receipt.ErrNotFound):
		writeJSON(w, http.StatusNotFound, apiError{err.Error()})
	case err != nil:
		writeJSON(w, http.StatusInternalServerError, apiError{err.Error()})
	default:
		writeJSON(w, http.StatusOK, b)
	}
}

func (s *Server) handleCheckpoint(w http.ResponseWriter, r *http.Request) {
	if s.receiptsOff(w) {
		return
	}
	cp, err := s.receipts.Checkpoint(r.Context())
	if err != nil {
		w.Header().Set("Retry-After", "1")
		writeJSON(w, http.StatusServiceUnavailable, apiError{err.Error()})
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	_, _ = w.Write(cp)
}

func (s *Server) handleKeys(w http.ResponseWriter, _ *http.Request) {
	if s.receiptsOff(w) {
		return
	}
	k, err := s.receipts.Published()
	if err != nil {
		writeJSON(w, http.StatusInternalServerError, apiError{err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, k)
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
		writeJSON(w, http.StatusInternalServerError, apiError{err.Error()})
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
	if err != nil {
		writeJSON(w, http.StatusBadRequest, apiError{err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"from": from, "to": to, "proof": p})
}
