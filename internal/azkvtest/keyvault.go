// Package azkvtest is an in-repo stand-in for Azure Key Vault's keys API,
// for tests. The emulator the issue names (lowkey-vault) is not served by
// the Maven registry here, so this implements what knhk uses — create,
// get (latest or a version), sign, verify, rotate EC P-256 keys — with real
// crypto and Key Vault's request and response shapes, including the
// bearer challenge, so the real azkeys client talks to it unchanged.
package azkvtest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math/big"
	"net/http"
	"strings"
	"sync"
	"time"
)

// Server serves /keys/... for one vault.
type Server struct {
	Token string // the bearer token clients must present

	mu   sync.Mutex
	keys map[string][]*version // name → versions, oldest first
	base string                // https://host/ as clients see it
}

type version struct {
	id      string
	key     *ecdsa.PrivateKey
	created time.Time
}

// New returns a vault that accepts token.
func New(token string) *Server { return &Server{Token: token, keys: map[string][]*version{}} }

func b64(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }

func unb64(s string) ([]byte, error) {
	if b, err := base64.RawURLEncoding.DecodeString(s); err == nil {
		return b, nil
	}
	return base64.URLEncoding.DecodeString(s)
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

func fail(w http.ResponseWriter, code int, kvCode, msg string) {
	writeJSON(w, code, map[string]any{"error": map[string]string{"code": kvCode, "message": msg}})
}

func (s *Server) bundle(name string, v *version) map[string]any {
	pt, _ := v.key.PublicKey.Bytes() // 0x04 ‖ X ‖ Y
	x, y := pt[1:33], pt[33:]
	return map[string]any{
		"key": map[string]any{"kid": s.base + "keys/" + name + "/" + v.id, "kty": "EC", "crv": "P-256", "x": b64(x), "y": b64(y),
			"key_ops": []string{"sign", "verify"}},
		"attributes": map[string]any{"enabled": true, "created": v.created.Unix(), "updated": v.created.Unix(), "recoveryLevel": "Purgeable"},
	}
}

func (s *Server) newVersion(name string) (*version, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	id := make([]byte, 16)
	_, _ = rand.Read(id)
	v := &version{id: hex.EncodeToString(id), key: k, created: time.Now()}
	s.keys[name] = append(s.keys[name], v)
	return v, nil
}

// ServeHTTP routes /keys/{name}/create|rotate, /keys/{name}/[{version}],
// /keys/{name}/{version}/sign|verify.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Authorization") != "Bearer "+s.Token {
		// Key Vault's challenge: the client gets a token for this resource
		// and retries.
		w.Header().Set("WWW-Authenticate", `Bearer authorization="https://login.microsoftonline.com/00000000-0000-0000-0000-000000000000", resource="https://vault.azure.net"`)
		fail(w, http.StatusUnauthorized, "Unauthorized", "AKV10000: Request is missing a Bearer or PoP token.")
		return
	}
	parts := strings.Split(strings.Trim(r.URL.Path, "/"), "/")
	if len(parts) < 2 || parts[0] != "keys" {
		fail(w, http.StatusNotFound, "NotFound", "no such path "+r.URL.Path)
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.base == "" {
		s.base = "https://" + r.Host + "/"
	}
	name := parts[1]
	op := ""
	if len(parts) > 2 {
		op = parts[2]
	}
	switch {
	case r.Method == http.MethodPost && (op == "create" || op == "rotate"):
		if op == "create" {
			var body struct{ Kty, Crv string }
			if err := json.NewDecoder(r.Body).Decode(&body); err != nil || (body.Kty != "EC" && body.Kty != "EC-HSM") || body.Crv != "P-256" {
				fail(w, http.StatusBadRequest, "BadParameter", "only EC keys on P-256 are supported here")
				return
			}
		} else if len(s.keys[name]) == 0 {
			fail(w, http.StatusNotFound, "KeyNotFound", fmt.Sprintf("A key with (name/id) %s was not found in this key vault.", name))
			return
		}
		v, err := s.newVersion(name)
		if err != nil {
			fail(w, http.StatusInternalServerError, "InternalError", err.Error())
			return
		}
		writeJSON(w, http.StatusOK, s.bundle(name, v))
		return
	}
	versions := s.keys[name]
	var v *version
	if op == "" && len(versions) > 0 {
		v = versions[len(versions)-1]
	}
	for _, c := range versions {
		if c.id == op {
			v = c
		}
	}
	if v == nil {
		fail(w, http.StatusNotFound, "KeyNotFound", fmt.Sprintf("A key with (name/id) %s/%s was not found in this key vault.", name, op))
		return
	}
	action := ""
	if len(parts) > 3 {
		action = parts[3]
	}
	switch {
	case r.Method == http.MethodGet && action == "":
		writeJSON(w, http.StatusOK, s.bundle(name, v))
	case r.Method == http.MethodPost && action == "sign":
		var body struct{ Alg, Value string }
		if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
			fail(w, http.StatusBadRequest, "BadParameter", err.Error())
			return
		}
		digest, err := unb64(body.Value)
		if err != nil || body.Alg != "ES256" || len(digest) != sha256.Size {
			fail(w, http.StatusBadRequest, "BadParameter", "ES256 needs a 32-byte SHA-256 digest")
			return
		}
		rr, ss, err := ecdsa.Sign(rand.Reader, v.key, digest)
		if err != nil {
			fail(w, http.StatusInternalServerError, "InternalError", err.Error())
			return
		}
		sig := make([]byte, 64)
		rr.FillBytes(sig[:32])
		ss.FillBytes(sig[32:])
		writeJSON(w, http.StatusOK, map[string]string{"kid": s.base + "keys/" + name + "/" + v.id, "value": b64(sig)})
	case r.Method == http.MethodPost && action == "verify":
		var body struct{ Alg, Digest, Value string }
		if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
			fail(w, http.StatusBadRequest, "BadParameter", err.Error())
			return
		}
		digest, err1 := unb64(body.Digest)
		sig, err2 := unb64(body.Value)
		if err1 != nil || err2 != nil || len(sig) != 64 {
			writeJSON(w, http.StatusOK, map[string]bool{"value": false})
			return
		}
		ok := ecdsa.Verify(&v.key.PublicKey, digest, new(big.Int).SetBytes(sig[:32]), new(big.Int).SetBytes(sig[32:]))
		writeJSON(w, http.StatusOK, map[string]bool{"value": ok})
	default:
		fail(w, http.StatusMethodNotAllowed, "BadParameter", r.Method+" "+r.URL.Path+" is not supported here")
	}
}
