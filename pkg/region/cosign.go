package region

import (
	"fmt"
	"strings"
	"time"

	fnote "github.com/transparency-dev/formats/note"
	"golang.org/x/mod/sumdb/note"
)

// Cosignature is one peer region's cosignature on a checkpoint.
type Cosignature struct {
	Region    string    `json:"region"`
	Role      string    `json:"role"`   // witness: checked consistency; mirror: holds the entries too
	KeyID     string    `json:"key_id"` // the C2SP key hash, hex
	Timestamp time.Time `json:"timestamp"`
}

// Roles of a cosignature.
const (
	RoleWitness = "witness"
	RoleMirror  = "mirror"
)

// PeerKeys are the cosigning keys this region pins for a peer: its
// witness key and, when it mirrors this region's log, its mirror key.
type PeerKeys struct {
	Name, Witness, Mirror string
}

// Cosigners check which peer regions cosigned a checkpoint, and which of
// them count toward the quorum: a peer that mirrors counts once it holds
// the entries (its mirror cosignature); one that only witnesses, by its
// witness cosignature.
type Cosigners struct {
	vs       []note.Verifier
	mirrored map[string]bool
}

// NewCosigners takes the peers' cosignature/v1 verifier keys.
func NewCosigners(peers []PeerKeys) (*Cosigners, error) {
	c := &Cosigners{mirrored: map[string]bool{}}
	for _, p := range peers {
		for _, k := range []string{p.Witness, p.Mirror} {
			if k == "" {
				continue
			}
			v, err := fnote.NewVerifierForCosignatureV1(k)
			if err != nil {
				return nil, fmt.Errorf("cosigning key %q: %w", clip([]byte(k)), err)
			}
			c.vs = append(c.vs, v)
		}
		if p.Mirror != "" {
			c.mirrored[p.Name] = true
		}
	}
	return c, nil
}

// Of lists the verified peer cosignatures on a signed checkpoint, one per
// key; signatures by other keys (the log's own) are ignored.
func (c *Cosigners) Of(checkpoint []byte) []Cosignature {
	out := []Cosignature{}
	if len(c.vs) == 0 {
		return out
	}
	n, err := note.Open(checkpoint, note.VerifierList(c.vs...))
	if err != nil {
		return out
	}
	seen := map[string]bool{}
	for _, s := range n.Sigs {
		if seen[s.Name] {
			continue
		}
		ts, err := fnote.CoSigV1Timestamp(s)
		if err != nil {
			continue
		}
		seen[s.Name] = true
		cs := Cosignature{Region: s.Name, Role: RoleWitness, KeyID: fmt.Sprintf("%08x", s.Hash), Timestamp: ts.UTC()}
		if r, ok := strings.CutSuffix(s.Name, MirrorSuffix); ok {
			cs.Region, cs.Role = r, RoleMirror
		}
		out = append(out, cs)
	}
	return out
}

// Counted is how many peer regions count toward the quorum.
func (c *Cosigners) Counted(cs []Cosignature) int {
	regions := map[string]bool{}
	for _, s := range cs {
		if (s.Role == RoleMirror) == c.mirrored[s.Region] {
			regions[s.Region] = true
		}
	}
	return len(regions)
}
