// Package vaulttest is an in-repo stand-in for HashiCorp Vault's Transit
// secrets engine, for tests: no open-source Vault server installs here. It
// implements the endpoints knhk uses — create, read, configure, delete,
// rotate and export keys, sign, verify — with real crypto and Vault's
// request and response shapes, so the real vault/api client talks to it
// unchanged.
//
// Shapes follow Vault's Transit API (builtin/logical/transit): a key read
// answers data.keys as a map of version to, for an asymmetric key, an
// object whose public_key is base64 for ed25519 and PEM for ECDSA (empty
// for a derived ed25519 key read without a context), and, for a symmetric
// key, the version's creation time in Unix seconds. A sign answers
// data.signature "vault:v<N>:<base64>" and data.key_version.
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

// Server is a Transit engine mounted at /v1/<Mount>.
type Server struct {
	Token string
	// Mount is the engine's path (default "transit"); set it before
	// serving.
	Mount string

	mu   sync.Mutex
	keys map[string]*key
}

type key struct {
	typ             string
	derived         bool
	exportable      bool
	deletionAllowed bool
	versions        []keyVersion // index 0 is version 1
}

type keyVersion struct {
	signer  crypto.Signer // nil for a symmetric key
	created time.Time
}

// New returns a server requiring token, with Transit at /v1/transit.
func New(token string) *Server { return &Server{Token: token, keys: map[string]*key{}} }

func (s *Server) mount() string {
	if s.Mount == "" {
		return "transit"
	}
	return strings.Trim(s.Mount, "/")
}

func reply(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

func fail(w http.ResponseWriter, code int, format string, a ...any) {
	reply(w, code, map[string]any{"errors": []string{fmt.Sprintf(format, a...)}})
}

// Key types this server makes, and whether each signs.
var keyTypes = map[string]bool{"ed25519": true, "ecdsa-p256": true, "aes256-gcm96": false}

func newVersion(typ string) (keyVersion, error) {
	v := keyVersion{created: time.Now()}
	var err error
	switch typ {
	case "ed25519":
		_, v.signer, err = ed25519.GenerateKey(rand.Reader)
	case "ecdsa-p256":
		v.signer, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case "aes256-gcm96":
	default:
		err = fmt.Errorf("unknown key type: %v", typ)
	}
	return v, err
}

// ServeHTTP routes /v1/<mount>/{keys,sign,verify,export}/….
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("X-Vault-Token") != s.Token {
		fail(w, http.StatusForbidden, "permission denied")
		return
	}
	prefix := "/v1/" + s.mount() + "/"
	if !strings.HasPrefix(r.URL.Path, prefix) {
		fail(w, http.StatusNotFound, "no handler for route %q", r.URL.Path)
		return
	}
	parts := strings.Split(strings.TrimPrefix(r.URL.Path, prefix), "/")
	var body map[string]any
	if r.Method == http.MethodPost || r.Method == http.MethodPut {
		d := json.NewDecoder(r.Body)
		d.UseNumber()
		if err := d.Decode(&body); err != nil && err.Error() != "EOF" {
			fail(w, http.StatusBadRequest, "invalid JSON: %v", err)
			return
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	write := r.Method == http.MethodPost || r.Method == http.MethodPut
	switch {
	case len(parts) == 2 && parts[0] == "keys" && r.Method == http.MethodGet:
		s.readKey(w, parts[1])
	case len(parts) == 2 && parts[0] == "keys" && r.Method == http.MethodDelete:
		s.deleteKey(w, parts[1])
	case len(parts) == 2 && parts[0] == "keys" && write:
		s.createKey(w, parts[1], body)
	case len(parts) == 3 && parts[0] == "keys" && parts[2] == "config" && write:
		s.configKey(w, parts[1], body)
	case len(parts) == 3 && parts[0] == "keys" && parts[2] == "rotate" && write:
		k := s.keys[parts[1]]
		if k == nil {
			fail(w, http.StatusBadRequest, "key not found")
			return
		}
		v, _ := newVersion(k.typ)
		k.versions = append(k.versions, v)
		reply(w, http.StatusOK, s.keyData(parts[1], k))
	case (len(parts) == 3 || len(parts) == 4) && parts[0] == "export" && r.Method == http.MethodGet:
		s.export(w, parts[1], parts[2], parts[3:])
	case (len(parts) == 2 || len(parts) == 3) && parts[0] == "sign" && write:
		s.sign(w, parts[1], body)
	case (len(parts) == 2 || len(parts) == 3) && parts[0] == "verify" && write:
		s.verify(w, parts[1], body)
	default:
		fail(w, http.StatusNotFound, "unsupported path")
	}
}

// createKey is Vault's upsert: an existing key is kept as it is, with a
// warning.
func (s *Server) createKey(w http.ResponseWriter, name string, body map[string]any) {
	if k := s.keys[name]; k != nil {
		resp := s.keyData(name, k)
		resp["warnings"] = []string{fmt.Sprintf("key %s already existed", name)}
		reply(w, http.StatusOK, resp)
		return
	}
	typ, _ := body["type"].(string)
	if typ == "" {
		typ = "aes256-gcm96" // Vault's default
	}
	derived, exportable := boolOf(body["derived"]), boolOf(body["exportable"])
	if derived && typ == "ecdsa-p256" {
		fail(w, http.StatusBadRequest, "key derivation and convergent encryption not supported for keys of type %s", typ)
		return
	}
	v, err := newVersion(typ)
	if err != nil {
		fail(w, http.StatusBadRequest, "%v", err)
		return
	}
	k := &key{typ: typ, derived: derived, exportable: exportable, versions: []keyVersion{v}}
	s.keys[name] = k
	reply(w, http.StatusOK, s.keyData(name, k))
}

func (s *Server) configKey(w http.ResponseWriter, name string, body map[string]any) {
	k := s.keys[name]
	if k == nil {
		fail(w, http.StatusBadRequest, "no existing key named %s could be found", name)
		return
	}
	if x, ok := body["deletion_allowed"]; ok {
		k.deletionAllowed = boolOf(x)
	}
	if x, ok := body["exportable"]; ok {
		if !boolOf(x) && k.exportable {
			fail(w, http.StatusBadRequest, "export cannot be disabled on a key that already has it enabled")
			return
		}
		k.exportable = boolOf(x)
	}
	reply(w, http.StatusOK, s.keyData(name, k))
}

func (s *Server) deleteKey(w http.ResponseWriter, name string) {
	k := s.keys[name]
	if k == nil {
		w.WriteHeader(http.StatusNoContent)
		return
	}
	if !k.deletionAllowed {
		fail(w, http.StatusBadRequest, "error deleting policy %s: deletion is not allowed for this policy", name)
		return
	}
	delete(s.keys, name)
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) readKey(w http.ResponseWriter, name string) {
	k := s.keys[name]
	if k == nil {
		w.WriteHeader(http.StatusNotFound) // Vault answers 404 with no data: the client returns nil, nil
		return
	}
	reply(w, http.StatusOK, s.keyData(name, k))
}

// keyData is Vault's formatKeyPolicy: the key's settings and, per
// version, its public key (asymmetric) or creation time (symmetric).
func (s *Server) keyData(name string, k *key) map[string]any {
	signs := keyTypes[k.typ]
	versions := map[string]any{}
	for i, v := range k.versions {
		n := strconv.Itoa(i + 1)
		switch p := publicOf(v).(type) {
		case nil:
			versions[n] = v.created.Unix()
		case ed25519.PublicKey:
			pub := base64.StdEncoding.EncodeToString(p)
			if k.derived {
				pub = "" // a derived key's public key depends on the context
			}
			versions[n] = map[string]any{"name": "ed25519", "public_key": pub, "certificate_chain": "", "creation_time": v.created}
		case *ecdsa.PublicKey:
			der, _ := x509.MarshalPKIXPublicKey(p)
			versions[n] = map[string]any{"name": p.Curve.Params().Name, "public_key": string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})),
				"certificate_chain": "", "creation_time": v.created}
		}
	}
	return map[string]any{"data": map[string]any{
		"name": name, "type": k.typ, "derived": k.derived, "deletion_allowed": k.deletionAllowed,
		"exportable": k.exportable, "allow_plaintext_backup": false, "latest_version": len(k.versions),
		"min_available_version": 0, "min_decryption_version": 1, "min_encryption_version": 0,
		"supports_encryption": !signs, "supports_decryption": !signs, "supports_signing": signs,
		"supports_derivation": k.typ != "ecdsa-p256", "auto_rotate_period": 0, "imported_key": false,
		"keys": versions,
	}}
}

func publicOf(v keyVersion) crypto.PublicKey {
	if v.signer == nil {
		return nil
	}
	return v.signer.Public()
}

// export is GET /export/signing-key/<name>(/<version>), for exportable
// keys: an ed25519 key's private key is base64 of its 64 bytes.
func (s *Server) export(w http.ResponseWriter, typ, name string, version []string) {
	k := s.keys[name]
	if k == nil {
		w.WriteHeader(http.StatusNotFound)
		return
	}
	if typ != "signing-key" {
		fail(w, http.StatusBadRequest, "invalid export type: %s", typ)
		return
	}
	if !k.exportable {
		fail(w, http.StatusBadRequest, "private key material is not exportable")
		return
	}
	if !keyTypes[k.typ] {
		fail(w, http.StatusBadRequest, "signing not supported for the key")
		return
	}
	enc := func(v keyVersion) string {
		switch p := v.signer.(type) {
		case ed25519.PrivateKey:
			return base64.StdEncoding.EncodeToString(p)
		case *ecdsa.PrivateKey:
			der, _ := x509.MarshalECPrivateKey(p)
			return strings.TrimSpace(string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der})))
		}
		return ""
	}
	out := map[string]string{}
	if len(version) == 0 {
		for i, v := range k.versions {
			out[strconv.Itoa(i+1)] = enc(v)
		}
	} else {
		n := len(k.versions)
		if version[0] != "latest" {
			var err error
			if n, err = strconv.Atoi(strings.TrimPrefix(version[0], "v")); err != nil {
				fail(w, http.StatusBadRequest, "invalid key version")
				return
			}
		}
		if n < 1 || n > len(k.versions) {
			fail(w, http.StatusBadRequest, "version does not exist or cannot be found")
			return
		}
		out[strconv.Itoa(n)] = enc(k.versions[n-1])
	}
	reply(w, http.StatusOK, map[string]any{"data": map[string]any{"name": name, "type": k.typ, "keys": out}})
}

// version is the request's key_version (0 or absent: the latest).
func (s *Server) version(w http.ResponseWriter, k *key, body map[string]any) (int, bool) {
	n := 0
	switch x := body["key_version"].(type) {
	case nil:
	case json.Number:
		i, err := x.Int64()
		if err != nil {
			fail(w, http.StatusBadRequest, "invalid key_version %q", x)
			return 0, false
		}
		n = int(i)
	case string:
		i, err := strconv.Atoi(x)
		if err != nil {
			fail(w, http.StatusBadRequest, "invalid key_version %q", x)
			return 0, false
		}
		n = i
	default:
		fail(w, http.StatusBadRequest, "invalid key_version %v", x)
		return 0, false
	}
	if n == 0 {
		n = len(k.versions)
	}
	if n < 0 || n > len(k.versions) {
		fail(w, http.StatusBadRequest, "requested version for signing does not exist")
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
	if !keyTypes[k.typ] {
		fail(w, http.StatusBadRequest, "key type %s does not support signing", k.typ)
		return
	}
	in, err := base64.StdEncoding.DecodeString(str(body["input"]))
	if err != nil {
		fail(w, http.StatusBadRequest, "unable to decode input: %v", err)
		return
	}
	n, ok := s.version(w, k, body)
	if !ok {
		return
	}
	if k.derived && str(body["context"]) == "" {
		fail(w, http.StatusBadRequest, "missing 'context' for key derivation; the key was created using a derived key, which means additional, per-request information must be included in order to perform operations with the key")
		return
	}
	if k.derived {
		fail(w, http.StatusBadRequest, "vaulttest: signing with a derived key is not implemented")
		return
	}
	var sig []byte
	switch signer := k.versions[n-1].signer.(type) {
	case ed25519.PrivateKey:
		sig = ed25519.Sign(signer, in) // pure Ed25519 over the input: ed25519 keys take no hash_algorithm
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
		fail(w, http.StatusBadRequest, "signature verification key not found")
		return
	}
	if !keyTypes[k.typ] {
		fail(w, http.StatusBadRequest, "key type %s does not support verification", k.typ)
		return
	}
	in, _ := base64.StdEncoding.DecodeString(str(body["input"]))
	parts := strings.SplitN(str(body["signature"]), ":", 3)
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
	switch p := publicOf(k.versions[n-1]).(type) {
	case ed25519.PublicKey:
		valid = ed25519.Verify(p, in, sig)
	case *ecdsa.PublicKey:
		d := sha256.Sum256(in)
		valid = ecdsa.VerifyASN1(p, d[:], sig)
	}
	reply(w, http.StatusOK, map[string]any{"data": map[string]any{"valid": valid}})
}

func str(x any) string {
	s, _ := x.(string)
	return s
}

// boolOf reads a JSON boolean, or a string Vault would parse as one.
func boolOf(x any) bool {
	switch b := x.(type) {
	case bool:
		return b
	case string:
		v, _ := strconv.ParseBool(b)
		return v
	}
	return false
}
