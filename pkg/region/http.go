package region

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
)

// Handler serves the C2SP tlog-witness API: POST /add-checkpoint. Who
// may push is decided before it, at the TLS handshake (internal/server).
func (w *Witness) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /add-checkpoint", func(rw http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(http.MaxBytesReader(rw, r.Body, MaxBody))
		var tooLarge *http.MaxBytesError
		switch {
		case errors.As(err, &tooLarge):
			writeOutcome(rw, message(http.StatusRequestEntityTooLarge, "add-checkpoint: the body is over %d bytes", MaxBody))
			return
		case err != nil:
			writeOutcome(rw, message(http.StatusBadRequest, "add-checkpoint: reading the body: %v", err))
			return
		}
		writeOutcome(rw, w.AddCheckpoint(r.Context(), body))
	})
	if w.mirror != nil {
		w.mirror.register(mux)
	}
	return mux
}

// EvidenceHandler serves GET /v1/region/evidence for the admin API.
func (w *Witness) EvidenceHandler() http.Handler {
	return http.HandlerFunc(func(rw http.ResponseWriter, _ *http.Request) {
		ev, err := w.Evidence()
		if err != nil {
			http.Error(rw, "evidence: "+err.Error(), http.StatusInternalServerError)
			return
		}
		rw.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(rw).Encode(map[string]any{"evidence": ev})
	})
}

func writeOutcome(rw http.ResponseWriter, o Outcome) {
	if o.ContentType != "" {
		rw.Header().Set("Content-Type", o.ContentType)
	}
	rw.WriteHeader(o.Status)
	_, _ = rw.Write(o.Body)
}
