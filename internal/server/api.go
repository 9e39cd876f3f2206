package server

import (
	"encoding/json"
	"net/http"
)

// canaryView is the JSON of GET /v1/canary.
type canaryView struct {
	Weight     float64  `json:"weight"`
	Salt       string   `json:"salt"`
	StickyKeys []string `json:"sticky_keys"`
}

func (s *Server) handleCanary(w http.ResponseWriter, _ *http.Request) {
	s.mu.Lock()
	v := canaryView{Weight: s.cfg.Canary.Weight, Salt: s.cfg.Canary.Salt, StickyKeys: s.cfg.Canary.StickyKeys}
	s.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}
