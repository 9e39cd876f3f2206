package region

import (
	"encoding/base64"
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"

	fnote "github.com/transparency-dev/formats/note"
	"golang.org/x/mod/sumdb/note"
)

// WitnessPolicy is a witness policy as a verifier reads it: the log keys
// it trusts to sign checkpoints, the witnesses it trusts to cosign them,
// and the quorum of witnesses a checkpoint needs. The grammar is Sigsum's
// (https://git.glasklar.is/sigsum/core/sigsum-go/-/blob/main/doc/policy.md)
// with C2SP verifier keys, as tessera's NewWitnessGroupFromPolicy reads it
// and `knhk region policy` prints it:
//
//	log <vkey> [<url>]
//	witness <name> <cosignature/v1 vkey> [<url>]
//	group <name> <k>|all|any <member>...
//	quorum <name>|none
//
// The policy is the verifier's trust root: nothing in it comes from the
// log being checked. A parsed policy is never modified, so it is safe for
// concurrent use.
type WitnessPolicy struct {
	file   string
	logs   []policyLog
	quorum *policyMember // nil: "quorum none"
	// keys are every witness's (key name, key hash), to tell another
	// policy witness's cosignature from a forgery under a known name.
	keys map[policyKeyID]bool
}

type policyLog struct {
	vkey string
	v    note.Verifier
}

// policyMember is a witness (v set) or a group (k of members).
type policyMember struct {
	name    string
	v       note.Verifier // a witness's cosignature/v1 verifier
	k       int
	members []*policyMember
}

type policyKeyID struct {
	name string
	hash uint32
}

var (
	// ErrBadPolicy is the root of the errors about a policy's text, which
	// are *PolicyError.
	ErrBadPolicy = errors.New("bad witness policy")
	// ErrPolicyNoLog is a policy without a log line: no checkpoint can be
	// trusted under it.
	ErrPolicyNoLog = errors.New(`the policy has no "log" line`)
	// ErrLogSignature is a checkpoint without a valid signature by one of
	// the policy's log keys.
	ErrLogSignature = errors.New("no valid signature by a log key of the policy")
	// ErrQuorumUnmet is a checkpoint whose cosignatures do not meet the
	// policy's quorum; the error's message says which group falls short,
	// which witnesses cosigned and why each other one does not count.
	ErrQuorumUnmet = errors.New("the policy's quorum is not met")
)

// PolicyError is a policy's text refused: where, and why.
type PolicyError struct {
	File   string
	Line   int // 1-based; 0 for the file as a whole (no quorum line)
	Reason string
}

func (e *PolicyError) Error() string {
	if e.Line == 0 {
		return e.File + ": " + e.Reason
	}
	return fmt.Sprintf("%s:%d: %s", e.File, e.Line, e.Reason)
}

// Unwrap makes every PolicyError an ErrBadPolicy.
func (e *PolicyError) Unwrap() error { return ErrBadPolicy }

// policyReserved are the words no witness or group may be named: the grammar's
// keywords (as tessera refuses them) and the predefined "none".
var policyReserved = map[string]bool{"log": true, "witness": true, "group": true, "quorum": true, "any": true, "all": true, "none": true}

// ParseWitnessPolicy reads a policy; file names it in errors. It is
// stricter than tessera's reader, so that a policy it accepts means the
// same to tessera: every name is defined on a line before the one that
// uses it (the quorum line too), there is exactly one quorum line, a group
// lists a member once (tessera would count it twice), no key is listed
// twice, key hashes must match their keys, and thresholds are decimals
// without leading zeros. It is laxer in one way the grammar allows: URLs
// are optional, since a verifier talks to no witness. A policy with no log
// line parses, and fails every check with ErrPolicyNoLog.
func ParseWitnessPolicy(file string, text []byte) (*WitnessPolicy, error) {
	p := &WitnessPolicy{file: file, keys: map[policyKeyID]bool{}}
	defined := map[string]*policyMember{}
	definedOn := map[string]int{}
	logKeys := map[policyKeyID]int{}
	witnessKeys := map[policyKeyID]string{}
	quorumLine := 0
	for i, line := range strings.Split(string(text), "\n") {
		n := i + 1
		bad := func(format string, args ...any) error {
			return &PolicyError{File: file, Line: n, Reason: fmt.Sprintf(format, args...)}
		}
		if c := strings.IndexByte(line, '#'); c >= 0 {
			line = line[:c]
		}
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		name := func(s string) error {
			switch {
			case policyReserved[s]:
				return bad("%q is a reserved word, not a name", s)
			case definedOn[s] != 0:
				return bad("%q is already defined on line %d", s, definedOn[s])
			}
			return nil
		}
		switch f[0] {
		case "log":
			if len(f) < 2 || len(f) > 3 {
				return nil, bad("want: log <vkey> [<url>]")
			}
			v, err := policyLogVerifier(f[1])
			if err != nil {
				return nil, bad("log key %q: %v", clip([]byte(f[1])), err)
			}
			k := policyKeyID{v.Name(), v.KeyHash()}
			if l, dup := logKeys[k]; dup {
				return nil, bad("log key %s+%08x is already listed on line %d", k.name, k.hash, l)
			}
			if len(f) == 3 {
				if err := checkPolicyURL(f[2]); err != nil {
					return nil, bad("log URL %q: %v", clip([]byte(f[2])), err)
				}
			}
			logKeys[k] = n
			p.logs = append(p.logs, policyLog{vkey: f[1], v: v})
		case "witness":
			if len(f) < 3 || len(f) > 4 {
				return nil, bad("want: witness <name> <vkey> [<url>]")
			}
			if err := name(f[1]); err != nil {
				return nil, err
			}
			v, err := policyWitnessVerifier(f[2])
			if err != nil {
				return nil, bad("witness %s: key %q: %v", f[1], clip([]byte(f[2])), err)
			}
			k := policyKeyID{v.Name(), v.KeyHash()}
			if other, dup := witnessKeys[k]; dup {
				return nil, bad("witness %s has the same key as witness %s", f[1], other)
			}
			if len(f) == 4 {
				if err := checkPolicyURL(f[3]); err != nil {
					return nil, bad("witness %s: URL %q: %v", f[1], clip([]byte(f[3])), err)
				}
			}
			witnessKeys[k] = f[1]
			p.keys[k] = true
			defined[f[1]], definedOn[f[1]] = &policyMember{name: f[1], v: v}, n
		case "group":
			if len(f) < 3 {
				return nil, bad("want: group <name> <k>|all|any <member>...")
			}
			if err := name(f[1]); err != nil {
				return nil, err
			}
			g := &policyMember{name: f[1]}
			seen := map[string]bool{}
			for _, m := range f[3:] {
				c, ok := defined[m]
				switch {
				case seen[m]:
					return nil, bad("group %s lists %s twice", f[1], m)
				case !ok:
					return nil, bad("group %s: %q is not a witness or group defined on an earlier line", f[1], m)
				}
				seen[m] = true
				g.members = append(g.members, c)
			}
			switch k := f[2]; k {
			case "all":
				g.k = len(g.members)
			case "any":
				g.k = 1
			default:
				u, err := strconv.ParseUint(k, 10, 31)
				if err != nil || (len(k) > 1 && k[0] == '0') {
					return nil, bad("group %s: threshold %q: want a decimal, all or any", f[1], clip([]byte(k)))
				}
				g.k = int(u)
			}
			if g.k > len(g.members) {
				return nil, bad("group %s needs %d of %d members", f[1], g.k, len(g.members))
			}
			defined[f[1]], definedOn[f[1]] = g, n
		case "quorum":
			if len(f) != 2 {
				return nil, bad("want: quorum <name>|none")
			}
			if quorumLine != 0 {
				return nil, bad("a second quorum line (the first is line %d)", quorumLine)
			}
			quorumLine = n
			if f[1] == "none" {
				break
			}
			q, ok := defined[f[1]]
			if !ok {
				return nil, bad("quorum %q is not a witness or group defined on an earlier line", clip([]byte(f[1])))
			}
			p.quorum = q
		default:
			return nil, bad("unknown keyword %q (want log, witness, group or quorum)", clip([]byte(f[0])))
		}
	}
	if quorumLine == 0 {
		return nil, &PolicyError{File: file, Reason: `no quorum line ("quorum none" requires no cosignature)`}
	}
	return p, nil
}

// LogKeys are the policy's log verifier keys, in order.
func (p *WitnessPolicy) LogKeys() []string {
	out := make([]string, len(p.logs))
	for i, l := range p.logs {
		out[i] = l.vkey
	}
	return out
}

// vkeyAlg is a vkey's algorithm byte (0 when it has none).
func vkeyAlg(vkey string) byte {
	_, rest, _ := strings.Cut(vkey, "+")
	_, b64, _ := strings.Cut(rest, "+")
	raw, err := base64.StdEncoding.DecodeString(b64)
	if err != nil || len(raw) == 0 {
		return 0
	}
	return raw[0]
}

// vkeyHash is a vkey's key hash field.
func vkeyHash(vkey string) (uint32, bool) {
	_, rest, _ := strings.Cut(vkey, "+")
	h, _, _ := strings.Cut(rest, "+")
	u, err := strconv.ParseUint(h, 16, 32)
	return uint32(u), err == nil && len(h) == 8
}

const (
	vkeyEd25519            = 0x01
	vkeyCosignatureV1      = 0x04
	vkeyMLDSACosignatureV1 = 0x06
)

// policyLogVerifier reads a log's checkpoint key: any note key but a
// cosignature, which signs a witness's statement, not a log's.
func policyLogVerifier(vkey string) (note.Verifier, error) {
	if a := vkeyAlg(vkey); a == vkeyCosignatureV1 || a == vkeyMLDSACosignatureV1 {
		return nil, errors.New("a cosignature/v1 (witness) key, not a log's checkpoint key")
	}
	v, err := fnote.NewVerifier(vkey)
	if err != nil {
		return nil, err
	}
	if h, ok := vkeyHash(vkey); !ok || h != v.KeyHash() {
		return nil, errors.New("the key hash does not match the key")
	}
	return v, nil
}

// policyWitnessVerifier reads a witness's cosignature/v1 key. A plain Ed25519
// key is taken as its cosignature/v1 form, as tessera does.
func policyWitnessVerifier(vkey string) (note.Verifier, error) {
	v, err := fnote.NewVerifierForCosignatureV1(vkey)
	if err != nil {
		return nil, err
	}
	h, ok := vkeyHash(vkey)
	if vkeyAlg(vkey) == vkeyEd25519 {
		_, err := note.NewVerifier(vkey) // checks the Ed25519 key's own hash
		ok = ok && err == nil
	} else {
		ok = ok && h == v.KeyHash()
	}
	if !ok {
		return nil, errors.New("the key hash does not match the key")
	}
	return v, nil
}

func checkPolicyURL(s string) error {
	u, err := url.Parse(s)
	if err != nil {
		return err
	}
	if (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		return errors.New("want an http(s) URL")
	}
	return nil
}
