package region

import (
	"errors"
	"fmt"
	"strings"

	"github.com/transparency-dev/formats/log"
	"golang.org/x/mod/sumdb/note"
)

// VerifiedCheckpoint is a checkpoint whose log signature verified with
// one of a policy's log keys.
type VerifiedCheckpoint struct {
	Origin string
	Size   uint64
	Hash   []byte
	LogKey string // the policy's vkey that verified it, named after Origin
}

// OpenCheckpoint verifies a signed checkpoint's log signature with the
// policy's log keys, and no others: never with the keys a log publishes
// about itself. The key must be named after the checkpoint's origin. A
// policy without a log line is ErrPolicyNoLog; a checkpoint no log key of
// the policy signed, or whose signature by one does not verify, is
// ErrLogSignature.
func (p *WitnessPolicy) OpenCheckpoint(signed []byte) (VerifiedCheckpoint, error) {
	if len(p.logs) == 0 {
		return VerifiedCheckpoint{}, fmt.Errorf("%s: %w: under a policy a checkpoint is trusted only with the policy's log keys, never with the keys the log publishes",
			p.file, ErrPolicyNoLog)
	}
	vs := make([]note.Verifier, len(p.logs))
	for i, l := range p.logs {
		vs[i] = l.v
	}
	n, err := note.Open(signed, note.VerifierList(vs...))
	var unverified *note.UnverifiedNoteError
	var invalid *note.InvalidSignatureError
	switch {
	case errors.As(err, &invalid):
		return VerifiedCheckpoint{}, fmt.Errorf("%w (%s): the signature by %s+%08x does not verify", ErrLogSignature, p.file, invalid.Name, invalid.Hash)
	case errors.As(err, &unverified):
		return VerifiedCheckpoint{}, fmt.Errorf("%w (%s): signed by %s; the policy's log keys are %s",
			ErrLogSignature, p.file, policySigNames(unverified.Note.UnverifiedSigs), policyKeyNames(vs))
	case err != nil:
		return VerifiedCheckpoint{}, fmt.Errorf("not a signed note: %w", err)
	}
	var cp log.Checkpoint
	if _, err := cp.Unmarshal([]byte(n.Text)); err != nil {
		return VerifiedCheckpoint{}, fmt.Errorf("checkpoint body: %w", err)
	}
	for _, s := range n.Sigs {
		if s.Name != cp.Origin {
			continue
		}
		for _, l := range p.logs {
			if l.v.Name() == s.Name && l.v.KeyHash() == s.Hash {
				return VerifiedCheckpoint{Origin: cp.Origin, Size: cp.Size, Hash: cp.Hash, LogKey: l.vkey}, nil
			}
		}
	}
	return VerifiedCheckpoint{}, fmt.Errorf("%w (%s): the checkpoint's origin is %q, but it is signed by the policy's %s",
		ErrLogSignature, p.file, clip([]byte(cp.Origin)), policySigNames(n.Sigs))
}

// Check verifies a signed checkpoint under the policy: its log signature
// (OpenCheckpoint), then its cosignatures against the quorum. Only
// cosignatures by the policy's witness keys count; any other is ignored,
// except one under a policy witness's key name by another key, which is
// reported as a forgery if the quorum is not met. A quorum not met is
// ErrQuorumUnmet.
func (p *WitnessPolicy) Check(signed []byte) error {
	if _, err := p.OpenCheckpoint(signed); err != nil {
		return err
	}
	if p.quorum == nil {
		return nil // quorum none
	}
	e := &policyEvaluation{p: p, signed: signed, status: map[*policyMember]string{}, met: map[*policyMember]bool{}, explained: map[*policyMember]bool{}}
	if e.satisfied(p.quorum) {
		return nil
	}
	if p.quorum.v != nil {
		return &policyQuorumError{fmt.Sprintf("witness %s: %s", p.quorum.name, e.status[p.quorum])}
	}
	e.explained[p.quorum] = true
	return &policyQuorumError{fmt.Sprintf("group %s %s", p.quorum.name, e.why(p.quorum))}
}

// policyQuorumError is ErrQuorumUnmet with the reason as its whole message.
type policyQuorumError struct{ msg string }

func (e *policyQuorumError) Error() string        { return e.msg }
func (e *policyQuorumError) Is(target error) bool { return target == ErrQuorumUnmet }

// policyEvaluation checks one checkpoint's cosignatures against a policy. Each
// witness's cosignature is verified once, and each group is decided once,
// however many groups share it.
type policyEvaluation struct {
	p      *WitnessPolicy
	signed []byte
	// status is, per witness, "" when its cosignature verified, else why
	// it does not count.
	status    map[*policyMember]string
	met       map[*policyMember]bool // per group
	explained map[*policyMember]bool // groups whose failure is already told
}

const statusCosigned = ""

func (e *policyEvaluation) satisfied(m *policyMember) bool {
	if m.v != nil {
		s, ok := e.status[m]
		if !ok {
			s = e.cosignature(m)
			e.status[m] = s
		}
		return s == statusCosigned
	}
	if met, ok := e.met[m]; ok {
		return met
	}
	n := 0
	for _, c := range m.members {
		if e.satisfied(c) {
			n++
		}
	}
	e.met[m] = n >= m.k
	return e.met[m]
}

// cosignature verifies a witness's cosignature with its key alone, through
// the note package and formats' cosignature/v1 verifier.
func (e *policyEvaluation) cosignature(w *policyMember) string {
	_, err := note.Open(e.signed, note.VerifierList(w.v))
	var unverified *note.UnverifiedNoteError
	var invalid *note.InvalidSignatureError
	switch {
	case err == nil:
		return statusCosigned
	case errors.As(err, &invalid):
		return "signature does not verify"
	case errors.As(err, &unverified):
		for _, s := range unverified.Note.UnverifiedSigs {
			if s.Name == w.v.Name() && !e.p.keys[policyKeyID{s.Name, s.Hash}] {
				return fmt.Sprintf("cosigned by another key named %s (key hash %08x, not the policy's %08x)", s.Name, s.Hash, w.v.KeyHash())
			}
		}
		return "no cosignature"
	default:
		return err.Error()
	}
}

// why tells why a group is not met: its threshold and members, those that
// count, and why each other one does not. A group already told about, as
// a member of another, is not told again.
func (e *policyEvaluation) why(g *policyMember) string {
	var names, cosigners, metGroups, reasons []string
	onlyWitnesses := true
	for _, m := range g.members {
		names = append(names, m.name)
		switch {
		case m.v == nil && e.satisfied(m):
			metGroups = append(metGroups, m.name)
		case e.satisfied(m):
			cosigners = append(cosigners, m.name)
		case m.v != nil:
			reasons = append(reasons, m.name+": "+e.status[m])
		case e.explained[m]:
			reasons = append(reasons, m.name+": not met (see above)")
		default:
			e.explained[m] = true
			reasons = append(reasons, m.name+": "+e.why(m))
		}
		onlyWitnesses = onlyWitnesses && m.v != nil
	}
	var counted string
	switch {
	case len(cosigners) == 0 && len(metGroups) == 0 && onlyWitnesses:
		counted = "none cosigned"
	case len(cosigners) == 0 && len(metGroups) == 0:
		counted = "none met"
	default:
		var parts []string
		if len(cosigners) > 0 {
			parts = append(parts, strings.Join(cosigners, ", ")+" cosigned")
		}
		if len(metGroups) > 0 {
			parts = append(parts, strings.Join(metGroups, ", ")+" met")
		}
		counted = "only " + strings.Join(parts, " and ")
	}
	s := fmt.Sprintf("needs %d of %s; %s", g.k, strings.Join(names, ", "), counted)
	if len(reasons) > 0 {
		s += " (" + strings.Join(reasons, "; ") + ")"
	}
	return s
}

func policySigNames(sigs []note.Signature) string {
	if len(sigs) == 0 {
		return "no key"
	}
	var out []string
	for i, s := range sigs {
		if i == 5 {
			out = append(out, fmt.Sprintf("and %d more", len(sigs)-i))
			break
		}
		out = append(out, fmt.Sprintf("%s+%08x", clip([]byte(s.Name)), s.Hash))
	}
	return strings.Join(out, ", ")
}

func policyKeyNames(vs []note.Verifier) string {
	out := make([]string, len(vs))
	for i, v := range vs {
		out[i] = fmt.Sprintf("%s+%08x", v.Name(), v.KeyHash())
	}
	return strings.Join(out, ", ")
}
