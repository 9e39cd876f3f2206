package region

import (
	"fmt"
	"strings"
)

// PeerWitness is a peer region as this region's log sees it: a witness to
// push checkpoints to.
type PeerWitness struct {
	Name string
	Key  string // its cosignature/v1 verifier key
	URL  string // its listen.region root; /add-checkpoint is appended
	// MirrorKey, when the peer mirrors this region's log, is the key it
	// counts by for a verifier: its mirror cosignature (it holds the
	// entries). Leave it empty in the policy given to tessera, which
	// pushes to witnesses.
	MirrorKey string
}

// Policy writes the witness policy for this region's log, in the Sigsum
// grammar tessera reads (NewWitnessGroupFromPolicy) and verifiers use:
// one witness line per peer, and a group needing quorum − 1 of them, since
// this region counts as one.
func Policy(origin string, logKey string, peers []PeerWitness, quorum int) []byte {
	var b strings.Builder
	fmt.Fprintf(&b, "# knhk region witness policy for %s: %d of %d regions, this one included\n", origin, quorum, len(peers)+1)
	fmt.Fprintf(&b, "log %s\n", logKey)
	names := make([]string, 0, len(peers))
	for _, p := range peers {
		if p.MirrorKey != "" {
			fmt.Fprintf(&b, "witness %s%s %s\n", p.Name, MirrorSuffix, p.MirrorKey)
			names = append(names, p.Name+MirrorSuffix)
			continue
		}
		fmt.Fprintf(&b, "witness %s %s %s\n", p.Name, p.Key, p.URL)
		names = append(names, p.Name)
	}
	need := max(0, quorum-1)
	fmt.Fprintf(&b, "group peers %d %s\n", need, strings.Join(names, " "))
	b.WriteString("quorum peers\n")
	return []byte(b.String())
}
