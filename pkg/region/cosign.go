package region

import (
	"fmt"
	"time"

	fnote "github.com/transparency-dev/formats/note"
	"golang.org/x/mod/sumdb/note"
)

// Cosignature is one peer region's cosignature on a checkpoint.
type Cosignature struct {
	Region    string    `json:"region"`
	KeyID     string    `json:"key_id"` // the C2SP key hash, hex
	Timestamp time.Time `json:"timestamp"`
}

// Cosigners check which peer regions cosigned a checkpoint.
type Cosigners struct {
	vs []note.Verifier
}

// NewCosigners takes the peers' witness (cosignature/v1) verifier keys.
func NewCosigners(vkeys []string) (*Cosigners, error) {
	c := &Cosigners{}
	for _, k := range vkeys {
		v, err := fnote.NewVerifierForCosignatureV1(k)
		if err != nil {
			return nil, fmt.Errorf("witness key %q: %w", clip([]byte(k)), err)
		}
		c.vs = append(c.vs, v)
	}
	return c, nil
}

// Of lists the verified peer cosignatures on a signed checkpoint, one per
// region; signatures by other keys (the log's own) are ignored.
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
		out = append(out, Cosignature{Region: s.Name, KeyID: fmt.Sprintf("%08x", s.Hash), Timestamp: ts.UTC()})
	}
	return out
}
