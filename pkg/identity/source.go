package identity

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// Source is where SVIDs and bundles come from: the Workload API or files.
type Source interface {
	x509svid.Source
	x509bundle.Source
	Close() error
}

// Options choose the source.
type Options struct {
	TrustDomain spiffeid.TrustDomain
	// Socket is the Workload API address ("unix:///…"); empty uses
	// SPIFFE_ENDPOINT_SOCKET. With neither, or when it cannot be reached
	// within StartTimeout, the files are used if given.
	Socket                    string
	CertFile, KeyFile, Bundle string
	StartTimeout              time.Duration
}

type filesSource struct{ *Files }

func (f filesSource) Close() error { f.Files.Close(); return nil }

// Open returns the Workload API source, falling back to files.
func Open(ctx context.Context, o Options, log *slog.Logger) (Source, error) {
	socket := o.Socket
	if socket == "" {
		socket = os.Getenv("SPIFFE_ENDPOINT_SOCKET")
	}
	haveFiles := o.CertFile != "" && o.KeyFile != "" && o.Bundle != ""
	if path, ok := strings.CutPrefix(socket, "unix://"); ok && !haveFiles {
		// Without fallback files, a socket that is not there is a config
		// error now, not after the start timeout.
		if _, err := os.Stat(path); err != nil {
			return nil, fmt.Errorf("identity.workload_api_socket %s: %w", socket, err)
		}
	}
	if socket != "" {
		if o.StartTimeout <= 0 {
			o.StartTimeout = 10 * time.Second
		}
		cctx, cancel := context.WithTimeout(ctx, o.StartTimeout)
		defer cancel()
		src, err := workloadapi.NewX509Source(cctx, workloadapi.WithClientOptions(workloadapi.WithAddr(socket)))
		if err == nil {
			svid, err := src.GetX509SVID()
			if err == nil && svid.ID.TrustDomain() != o.TrustDomain {
				_ = src.Close()
				return nil, fmt.Errorf("identity.workload_api_socket %s: SVID %s is not in trust domain %s", socket, svid.ID, o.TrustDomain)
			}
			log.Info("identity from the Workload API", "socket", socket)
			return src, nil
		}
		if !haveFiles {
			return nil, fmt.Errorf("identity.workload_api_socket %s: %w", socket, err)
		}
		log.Warn("Workload API unreachable at start; using the identity files", "socket", socket, "error", err.Error())
	}
	if !haveFiles {
		return nil, errors.New("identity: no Workload API socket (identity.workload_api_socket or SPIFFE_ENDPOINT_SOCKET) and no identity.files")
	}
	f, err := LoadFiles(o.TrustDomain, o.CertFile, o.KeyFile, o.Bundle, log)
	if err != nil {
		return nil, err
	}
	go f.Watch(time.Second)
	log.Info("identity from files", "spiffe_id", f.SVIDID().String())
	return filesSource{f}, nil
}
