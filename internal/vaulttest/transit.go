// Package vaulttest is an in-repo stand-in for HashiCorp Vault's Transit
// secrets engine, for tests: no open-source Vault server installs here. It
// implements the endpoints knhk uses — create and read keys, sign, verify,
// rotate — with real crypto and Vault's request and response shapes, so the
// real vault/api client talks to it unchanged.
package vaulttest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Server is a Transit engine mounted at /v1/transit.
type Server struct {
	Token string

	mu   sync.Mutex
	keys map[string]*key
}

type key struct {
	typ      string
	versions []crypto.Signer // index 0 is version 1
	created  []time.Time
}

// New returns a server requiring token.
func New(token string) *Server { return &Server{Token: token, keys: map[string]*key{}} }

func reply(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

func fail(w http.ResponseWriter, code int, format string, a ...any) {
	reply(w, code, map[string]any{"errors": []string{fmt.Sprintf(format, a...)}})
}

func newSigner(typ string) (crypto.Signer, error) {
	switch typ {
	case "ed25519":
		_, k, err := ed25519.GenerateKey(rand.Reader)
		return k, err
	case "ecdsa-p256":
		return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	}
	return nil, fmt.Errorf("unsupported key type %q", typ)
}

// ServeHTTP routes /v1/transit/{keys,sign,verify}/….
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("X-Vault-Token") != s.Token {
		fail(w, http.StatusForbidden, "permission denied")
		return
	}
	parts := strings.Split(strings.TrimPrefix(r.URL.Path, "/v1/transit/"), "/")
	var body map[string]any
	if r.Method == http.MethodPost || r.Method == http.MethodPut {
		if err := json.NewDecoder(r.Body).Decode(&body); err != nil && err.Error() != "EOF" {
			fail(w, http.StatusBadRequest, "invalid JSON: %v", err)
			return
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case len(parts) == 2 && parts[0] == "keys" && r.Method == http.MethodGet:
		s.readKey(w, parts[1])
	case len(parts) == 2 && parts[0] == "keys":
		typ, _ := body["type"].(string)
		k, err := newSigner(typ)
		if err != nil {
			fail(w, http.StatusBadRequest, "%v", err)
			return
		}
		s.keys[parts[1]] = &key{typ: typ, versions: []crypto.Signer{k}, created: []time.Time{time.Now()}}
		w.WriteHeader(http.StatusNoContent)
	case len(parts) == 3 && parts[0] == "keys" && parts[2] == "rotate":
		k := s.keys[parts[1]]
		if k == nil {
			fail(w, http.StatusNotFound, "key not found")
			return
		}
		nk, _ := newSigner(k.typ)
		k.versions = append(k.versions, nk)
		k.created = append(k.created, time.Now())
		w.WriteHeader(http.StatusNoContent)
	case (len(parts) == 2 || len(parts) == 3) && parts[0] == "sign":
		s.sign(w, parts[1], body)
	case (len(parts) == 2 || len(parts) == 3) && parts[0] == "verify":
		s.verify(w, parts[1], body)
	default:
		fail(w, http.StatusNotFound, "unsupported path")
	}
}

func (s *Server) readKey(w http.ResponseWriter, name string) {
	k := s.keys[name]
	if k == nil {
		w.WriteHeader(http.StatusNotFound) // Vault answers 404 with no data: the client returns nil, nil
		return
	}
	versions := map[string]any{}
	for i, v := range k.versions {
		var pub string
		switch p := v.Public().(type) {
		case ed25519.PublicKey:
			pub = base64.StdEncoding.EncodeToString(p)
		default:
			der, _ := x509.MarshalPKIXPublicKey(p)
			pub = string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
		}
		versions[strconv.Itoa(i+1)] = map[string]any{"public_key": pub, "creation_time": k.created[i].Format(time.RFC3339Nano)}
	}
	reply(w, http.StatusOK, map[string]any{"data": map[string]any{
		"name": name, "type": k.typ, "latest_version": len(k.versions), "keys": versions,
	}})
}

func (s *Server) version(w http.ResponseWriter, k *key, body map[string]any) (int, bool) {
	n := len(k.versions)
	if x, ok := body["key_version"].(float64); ok && x > 0 {
		n = int(x)
	}
	if n < 1 || n > len(k.versions) {
		fail(w, http.StatusBadRequest, "invalid key version %d", n)
		return 0, false
	}
	return n, true
}

func (s *Server) sign(w http.ResponseWriter, name string, body map[string]any) {
	k := s.keys[name]
	if k == nil {
		fail(w, http.StatusBadRequest, "signing key not found")
		return
	}
	in, err := base64.StdEncoding.DecodeString(fmt.Sprint(body["input"]))
	if err != nil {
		fail(w, http.StatusBadRequest, "unable to decode input as base64: %v", err)
		return
	}
	n, ok := s.version(w, k, body)
	if !ok {
		return
	}
	var sig []byte
	switch signer := k.versions[n-1].(type) {
	case ed25519.PrivateKey:
		sig = ed25519.Sign(signer, in)
	case *ecdsa.PrivateKey:
		d := sha256.Sum256(in)
		sig, err = ecdsa.SignASN1(rand.Reader, signer, d[:])
	}
	if err != nil {
		fail(w, http.StatusInternalServerError, "%v", err)
		return
	}
	reply(w, http.StatusOK, map[string]any{"data": map[string]any{
		"signature": fmt.Sprintf("vault:v%d:%s", n, base64.StdEncoding.EncodeToString(sig)), "key_version": n,
	}})
}

func (s *Server) verify(w http.ResponseWriter, name string, body map[string]any) {
	k := s.keys[name]
	if k == nil {
		fail(w, http.StatusBadRequest, "key not found")
		return
	}
	in, _ := base64.StdEncoding.DecodeString(fmt.Sprint(body["input"]))
	parts := strings.SplitN(fmt.Sprint(body["signature"]), ":", 3)
	if len(parts) != 3 {
		fail(w, http.StatusBadRequest, "invalid signature")
		return
	}
	n, err := strconv.Atoi(strings.TrimPrefix(parts[1], "v"))
	sig, err2 := base64.StdEncoding.DecodeString(parts[2])
	if err != nil || err2 != nil || n < 1 || n > len(k.versions) {
		fail(w, http.StatusBadRequest, "invalid signature")
		return
	}
	valid := false
	switch p := k.versions[n-1].Public().(type) {
	case ed25519.PublicKey:
		valid = ed25519.Verify(p, in, sig)
	case *ecdsa.PublicKey:
		d := sha256.Sum256(in)
		valid = ecdsa.VerifyASN1(p, d[:], sig)
	}
	reply(w, http.StatusOK, map[string]any{"data": map[string]any{"valid": valid}})
}
