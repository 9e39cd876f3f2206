package identity

import (
	"context"
	"log/slog"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// WatchExpiry warns once per SVID when it comes within margin of expiry,
// and logs an error once it has expired. With the Workload API up, SPIRE
// rotates SVIDs at half their lifetime, so a warning means rotation is not
// happening (agent down, entry deleted) — while knhk keeps serving with the
// SVID it has.
func WatchExpiry(ctx context.Context, src x509svid.Source, margin, every time.Duration, log *slog.Logger) {
	t := time.NewTicker(every)
	defer t.Stop()
	var warned, expired string // serial of the SVID last reported
	for {
		if svid, err := src.GetX509SVID(); err == nil && len(svid.Certificates) > 0 {
			leaf := svid.Certificates[0]
			serial := leaf.SerialNumber.String()
			left := time.Until(leaf.NotAfter)
			switch {
			case left <= 0 && expired != serial:
				expired = serial
				log.Error("SVID has expired; mTLS handshakes will fail until a new one arrives",
					"spiffe_id", svid.ID.String(), "not_after", leaf.NotAfter)
			case left > 0 && left <= margin && warned != serial:
				warned = serial
				log.Warn("SVID expires soon and has not been rotated", "spiffe_id", svid.ID.String(),
					"expires_in", left.Round(time.Second).String(), "not_after", leaf.NotAfter)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
