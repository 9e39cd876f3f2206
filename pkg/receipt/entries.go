package receipt

import (
	"context"
	"fmt"

	"github.com/transparency-dev/tessera/client"
)

// Entries returns the log's entries [from, to), for a peer region's
// mirror; to must be at most the latest checkpoint's size. Bundles are
// read at the integrated size: a partial bundle exists only for sizes an
// integration ended at, which a package boundary need not be.
func (s *Service) Entries(ctx context.Context, from, to uint64) ([][]byte, error) {
	size, err := s.rlog.IntegratedSize(ctx)
	if err != nil {
		return nil, err
	}
	if to > size {
		return nil, fmt.Errorf("entries to %d: the log holds %d", to, size)
	}
	out := make([][]byte, 0, to-min(from, to))
	for i := from; i < to; {
		bi := i / layoutWidth
		b, err := client.GetEntryBundle(ctx, s.rlog.reader.ReadEntryBundle, bi, size)
		if err != nil {
			return nil, err
		}
		for j, e := range b.Entries {
			if idx := bi*layoutWidth + uint64(j); idx >= i && idx < to {
				out = append(out, e)
			}
		}
		i = (bi + 1) * layoutWidth
	}
	if uint64(len(out)) != to-min(from, to) {
		return nil, fmt.Errorf("entries [%d, %d): read %d", from, to, len(out))
	}
	return out, nil
}
