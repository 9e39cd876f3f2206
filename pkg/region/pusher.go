package region

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	fnote "github.com/transparency-dev/formats/note"
	"golang.org/x/mod/sumdb/note"
)

// MirrorSource is this region's own log, as the pusher reads it.
type MirrorSource interface {
	// Checkpoint is the latest published signed checkpoint.
	Checkpoint(ctx context.Context) ([]byte, error)
	// Entries are entries [from, to).
	Entries(ctx context.Context, from, to uint64) ([][]byte, error)
	// Consistency proves tree size from is a prefix of to.
	Consistency(ctx context.Context, from, to uint64) ([][]byte, error)
}

// PusherOptions configure a Pusher.
type PusherOptions struct {
	Peer      string // the peer's region name
	URL       string // its listen.region root
	MirrorKey string // its mirror cosignature/v1 verifier key, pinned
	Origin    string // this region's log
	Client    *http.Client
	Source    MirrorSource
	// Cosigned gets each checkpoint (as read from Source) and the peer's
	// mirror cosignature line on it, checked. It is called from Run's
	// goroutine, with no lock held.
	Cosigned func(checkpoint, line []byte)
	Log      *slog.Logger
	Metrics  *PusherMetrics
}

// PusherMetrics are shared by the pushers to every peer.
type PusherMetrics struct {
	next    *prometheus.GaugeVec
	results *prometheus.CounterVec
}

// NewPusherMetrics registers the pushers' metrics.
func NewPusherMetrics(reg prometheus.Registerer) *PusherMetrics {
	m := &PusherMetrics{
		next:    prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "knhk_region_mirror_peer_entries", Help: "Entries of this region's log the peer's mirror holds, as it last said."}, []string{"peer"}),
		results: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "knhk_region_mirror_push_total", Help: "add-entries requests to each peer, by result (cosigned, accepted, conflict, refused, error)."}, []string{"peer", "result"}),
	}
	if reg != nil {
		reg.MustRegister(m.next, m.results)
	}
	return m
}

// Pusher sends this region's entries to one peer's mirror, from what the
// mirror says it holds up to the latest checkpoint, and hands back the
// mirror's cosignature. Its progress is the mirror's own durable state
// (every answer says what the mirror holds), so a restart or a partition
// resumes where the mirror is, with nothing skipped or stored twice.
type Pusher struct {
	o    PusherOptions
	v    note.Verifier
	poke chan struct{} // Poke's signal
	held atomic.Uint64 // the entries the peer's mirror said it holds
}

// Held is how many of this region's entries the peer's mirror holds, as
// it last said (0 until it has).
func (p *Pusher) Held() uint64 { return p.held.Load() }

// NewPusher checks the peer's mirror key.
func NewPusher(o PusherOptions) (*Pusher, error) {
	v, err := fnote.NewVerifierForCosignatureV1(o.MirrorKey)
	if err != nil {
		return nil, fmt.Errorf("region.peers[%s].mirror_key: %w", o.Peer, err)
	}
	return &Pusher{o: o, v: v, poke: make(chan struct{}, 1)}, nil
}

// Poke says a new checkpoint may be out.
func (p *Pusher) Poke() {
	select {
	case p.poke <- struct{}{}:
	default:
	}
}

const (
	pushEvery   = 250 * time.Millisecond
	pushBackoff = 30 * time.Second
)

// Run pushes until ctx ends, backing off (to 30 s) while the peer fails.
func (p *Pusher) Run(ctx context.Context) {
	next, known, cosigned := uint64(0), false, uint64(0)
	wait := time.Duration(0)
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		if wait > 0 {
			t.Reset(wait)
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		} else {
			t.Reset(pushEvery)
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			case <-p.poke:
			}
		}
		cp, err := p.o.Source.Checkpoint(ctx)
		if err != nil {
			wait = 0
			continue // none yet
		}
		size, err := checkpointSize(cp)
		if err != nil || (known && next >= size && cosigned == size) {
			wait = 0
			continue
		}
		start := size // the first request asks where the mirror is
		if known {
			start = min(next, size)
		}
		again, info, err := p.push(ctx, cp, start, size)
		switch {
		case err != nil:
			wait = min(max(2*wait, pushEvery), pushBackoff)
			p.o.Log.Warn("region: mirror push failed; retrying", "peer", p.o.Peer, "error", err.Error(), "retry_in", wait)
			continue
		case info != nil:
			next, known = info.Next, true
		default: // cosigned
			next, known, cosigned = size, true, size
		}
		p.held.Store(next)
		p.o.Metrics.next.WithLabelValues(p.o.Peer).Set(float64(next))
		wait = 0
		switch {
		case again:
			p.Poke()
		case info != nil:
			wait = time.Second // its witness has not cosigned this checkpoint yet
		}
	}
}

// push sends one add-entries request. It returns the mirror's info on 202
// or 409, nil on 200 (after handing on the cosignature), and whether to
// go on at once.
func (p *Pusher) push(ctx context.Context, cp []byte, start, size uint64) (bool, *MirrorInfo, error) {
	body, err := AddEntriesBody(p.o.Origin, start, size,
		func(from, to uint64) ([][]byte, error) { return p.o.Source.Entries(ctx, from, to) },
		func(at uint64) ([][]byte, error) { return p.o.Source.Consistency(ctx, at, size) })
	if err != nil {
		return false, nil, err
	}
	var z bytes.Buffer
	zw := gzip.NewWriter(&z)
	_, _ = zw.Write(body)
	_ = zw.Close()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, p.o.URL+"/add-entries", &z)
	if err != nil {
		return false, nil, err
	}
	req.Header.Set("Content-Type", "application/octet-stream")
	req.Header.Set("Content-Encoding", "gzip")
	resp, err := p.o.Client.Do(req)
	if err != nil {
		p.o.Metrics.results.WithLabelValues(p.o.Peer, "error").Inc()
		return false, nil, err
	}
	defer func() { _ = resp.Body.Close() }()
	rb, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return false, nil, err
	}
	switch resp.StatusCode {
	case http.StatusOK:
		// Exactly one line, by the pinned mirror key, over this checkpoint:
		// nothing else the peer sends reaches the checkpoint kept.
		text, _, ok := splitNote(cp)
		if !ok || bytes.Count(rb, []byte("\n")) != 1 || !bytes.HasSuffix(rb, []byte("\n")) {
			p.o.Metrics.results.WithLabelValues(p.o.Peer, "refused").Inc()
			return false, nil, fmt.Errorf("the mirror's answer is not one cosignature line: %q", clip(rb))
		}
		n, err := note.Open(append(append(append([]byte{}, text...), '\n'), rb...), note.VerifierList(p.v))
		if err != nil || len(n.Sigs) != 1 {
			p.o.Metrics.results.WithLabelValues(p.o.Peer, "refused").Inc()
			return false, nil, fmt.Errorf("the mirror's cosignature does not verify with its pinned key (%d signatures): %w", sigCount(n), err)
		}
		p.o.Metrics.results.WithLabelValues(p.o.Peer, "cosigned").Inc()
		if p.o.Cosigned != nil {
			p.o.Cosigned(cp, rb)
		}
		return false, nil, nil
	case http.StatusAccepted, http.StatusConflict:
		info, err := ParseMirrorInfo(rb)
		if err != nil {
			return false, nil, err
		}
		if resp.StatusCode == http.StatusAccepted {
			p.o.Metrics.results.WithLabelValues(p.o.Peer, "accepted").Inc()
			return true, &info, nil // more to send
		}
		p.o.Metrics.results.WithLabelValues(p.o.Peer, "conflict").Inc()
		// Resume from the mirror's next entry at once, unless that is
		// where this request started: then the peer's witness has not
		// cosigned this checkpoint yet, and the next one is awaited.
		return info.Next != start, &info, nil
	}
	p.o.Metrics.results.WithLabelValues(p.o.Peer, "refused").Inc()
	return false, nil, errors.New(resp.Status + ": " + string(bytes.TrimSpace(clip(rb))))
}
