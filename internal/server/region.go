package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	stdlog "log"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/url"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/transparency-dev/tessera"

	"github.com/knhk/knhk/pkg/config"
	"github.com/knhk/knhk/pkg/identity"
	"github.com/knhk/knhk/pkg/kms"
	"github.com/knhk/knhk/pkg/receipt"
	"github.com/knhk/knhk/pkg/region"
)

// regionParts are what listen.region runs: this region's witness of its
// peers' logs, and the listener the peers push checkpoints to.
type regionParts struct {
	policy    []byte // this region's witness policy, for GET /v1/region/policy
	cosigners *region.Cosigners
	quorum    int
	// durable follows this region's checkpoints to the newest that met
	// the quorum; track is its one writer, fed the published checkpoints
	// and, on cosigned, those the peers' mirrors cosigned since.
	cosigned  chan cosignature
	mirror    *region.Mirror
	mirrorKey *region.Cosigner
	pushers   []*region.Pusher
	pushing   sync.WaitGroup // the pushers and the mirror's retention
	durable   *region.Quorum
	tracked   chan struct{} // closed when track returns; nil until Serve starts it
	witness   *region.Witness
	key       *region.Cosigner
	lis       net.Listener
	http      *http.Server
}

// openRegion opens the witness and binds listen.region: mTLS that admits
// only the peers' SPIFFE IDs under identity, loopback plaintext otherwise
// (config validation refuses anything else).
func (s *Server) openRegion(cfg *config.Config) error {
	var key *region.Cosigner
	var err error
	if k := cfg.Region.WitnessKMS; k.Provider == "vault" {
		// Token empty: VAULT_TOKEN, as for receipts.kms. Errors name their key.
		key, err = region.OpenVaultKey(s.ctx, region.VaultKeyConfig{Address: k.Endpoint, Mount: k.Mount, Key: k.KeyID, Name: cfg.Region.Name})
	} else {
		keyPath := cfg.Region.WitnessKey
		if keyPath == "" {
			keyPath = filepath.Join(cfg.DataDir, "witness.key")
		}
		if key, err = region.LoadOrCreateKey(keyPath, cfg.Region.Name); err != nil {
			err = fmt.Errorf("region.witness_key: %w", err)
		}
	}
	if err != nil {
		return err
	}
	var logs []string
	var keys []region.PeerKeys
	allowed := make([]spiffeid.ID, 0, len(cfg.Region.Peers))
	for _, p := range cfg.Region.Peers {
		logs = append(logs, p.LogKeys...)
		keys = append(keys, region.PeerKeys{Name: p.Name, Witness: p.WitnessKey, Mirror: p.MirrorKey})
		if cfg.Identity.Enabled() {
			allowed = append(allowed, spiffeid.RequireFromString(p.SpiffeID)) // validated
		}
	}
	w, err := region.NewWitness(s.ctx, region.WitnessOptions{
		Key: key, Logs: logs, Path: filepath.Join(cfg.DataDir, "witness.db"), Log: s.log, Metrics: s.reg,
	})
	if err != nil {
		return fmt.Errorf("region: %w", err)
	}
	r := &regionParts{witness: w, key: key, policy: s.regionPolicy, quorum: cfg.RegionQuorum(), cosigned: make(chan cosignature, 16)}
	s.region = r // closeBy releases what is opened from here on
	if r.cosigners, err = region.NewCosigners(keys); err != nil {
		return fmt.Errorf("region.peers: %w", err)
	}
	mirrorPath := cfg.Region.MirrorKey
	if mirrorPath == "" {
		mirrorPath = filepath.Join(cfg.DataDir, "mirror.key")
	}
	if r.mirrorKey, err = region.LoadOrCreateKey(mirrorPath, cfg.Region.Name+region.MirrorSuffix); err != nil {
		return fmt.Errorf("region.mirror_key: %w", err)
	}
	if r.mirror, err = region.NewMirror(region.MirrorOptions{
		Key: r.mirrorKey, Path: filepath.Join(cfg.DataDir, "mirror.db"), Witness: w, Log: s.log, Metrics: s.reg,
	}); err != nil {
		return fmt.Errorf("region: %w", err)
	}
	w.AttachMirror(r.mirror)
	cos := r.cosigners
	peers := make([]string, 0, len(cfg.Region.Peers))
	for _, p := range cfg.Region.Peers {
		peers = append(peers, p.Name)
	}
	if r.durable, err = region.NewQuorum(region.QuorumOptions{
		Cosigners: cos, Peers: peers, Need: r.quorum, Path: filepath.Join(cfg.DataDir, "quorum.checkpoint"), Log: s.log, Metrics: s.reg,
	}); err != nil {
		return fmt.Errorf("region: %w", err)
	}
	if r.lis, err = net.Listen("tcp", cfg.Listen.Region); err != nil {
		return fmt.Errorf("listen.region %s: %w", cfg.Listen.Region, err)
	}
	if cfg.Identity.Enabled() {
		// With no peers yet (a region started to mint its witness key)
		// nobody may push.
		r.lis = tls.NewListener(r.lis, identity.ServerTLS(s.identity, s.identity, allowed))
	}
	refused := prometheus.NewCounter(prometheus.CounterOpts{Name: "knhk_region_handshakes_refused_total",
		Help: "Connections to listen.region refused at the TLS handshake (no certificate, or a SPIFFE ID no peer has)."})
	s.reg.MustRegister(refused)
	r.http = &http.Server{Handler: w.Handler(), ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 30 * time.Second,
		ErrorLog: stdlog.New(serverErrors{log: s.log, refused: refused}, "", 0)}
	if s.receipts == nil {
		return nil
	}
	pm := region.NewPusherMetrics(s.reg)
	for _, p := range cfg.Region.Peers {
		if p.MirrorKey == "" {
			continue // it witnesses this region's log, and does not mirror it
		}
		pu, err := region.NewPusher(region.PusherOptions{
			Peer: p.Name, URL: p.URL, MirrorKey: p.MirrorKey, Origin: cfg.Receipts.Origin, Client: s.regionClient,
			Source: s.receipts, Log: s.log, Metrics: pm,
			Cosigned: func(checkpoint, line []byte) {
				select {
				case r.cosigned <- cosignature{checkpoint, line}:
				default: // the tracker is behind: a newer cosignature supersedes this one
				}
			},
		})
		if err != nil {
			return err
		}
		r.pushers = append(r.pushers, pu)
	}
	if len(r.pushers) > 0 {
		s.receipts.SetPruneBound(func() uint64 {
			least := uint64(math.MaxUint64)
			for _, p := range r.pushers {
				least = min(least, p.Held())
			}
			return least
		})
	}
	return nil
}

// witnessing has the receipt log ask every peer region to cosign each
// checkpoint, under the policy `knhk region policy` prints.
func (s *Server) witnessing(cfg *config.Config, signer kms.Signer) (receipt.Witnessing, error) {
	policy, err := regionPolicy(cfg, signer, cfg.RegionQuorum(), true)
	if err != nil {
		return receipt.Witnessing{}, err
	}
	// Tessera stops asking once its policy is met, so a policy of quorum −
	// 1 peers would publish only the fastest peers' cosignatures, and the
	// others' progress would go unseen. It is asked for every peer instead:
	// each checkpoint carries all that came back within witnessTimeout
	// (FailOpen), and quorum is judged by this region (regionParts.bundle).
	push, err := regionPolicy(cfg, signer, 1+len(cfg.Region.Peers), false)
	if err != nil {
		return receipt.Witnessing{}, err
	}
	g, err := tessera.NewWitnessGroupFromPolicy(push)
	if err != nil {
		return receipt.Witnessing{}, fmt.Errorf("region: witness policy: %w", err)
	}
	s.regionPolicy = policy
	// One transport for the witness pushes and the mirror pushes, dialing
	// only the peers' URLs and counting the bytes on each connection.
	peerAt, ids := map[string]string{}, map[string]spiffeid.ID{}
	for _, p := range cfg.Region.Peers {
		u, _ := url.Parse(p.URL) // validated
		peerAt[hostPort(u)] = p.Name
		if cfg.Identity.Enabled() {
			ids[hostPort(u)] = spiffeid.RequireFromString(p.SpiffeID)
		}
	}
	wire := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "knhk_region_wire_bytes_total",
		Help: "Bytes this region sent to and received from each peer on the connections it opened (witness and mirror pushes; TLS and HTTP included).",
	}, []string{"peer", "direction"})
	if err := s.reg.Register(wire); err != nil {
		return receipt.Witnessing{}, err
	}
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		peer, ok := peerAt[addr]
		if !ok {
			return nil, fmt.Errorf("region: %s is not a peer's URL", addr)
		}
		var d net.Dialer
		c, err := d.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return &countingConn{Conn: c, sent: wire.WithLabelValues(peer, "sent"), received: wire.WithLabelValues(peer, "received")}, nil
	}
	t := &http.Transport{DialContext: dial, MaxIdleConnsPerHost: 4}
	if cfg.Identity.Enabled() {
		// Each peer URL must present that peer's SPIFFE ID, not any peer's.
		t.DialTLSContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := dial(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			tc := tls.Client(c, identity.ClientTLS(s.identity, s.identity, ids[addr]))
			if err := tc.HandshakeContext(ctx); err != nil {
				_ = c.Close()
				return nil, err
			}
			return tc, nil
		}
	}
	// A mirror catching up takes up to 32 packages a request: more time
	// than a cosignature.
	s.regionClient = &http.Client{Timeout: 30 * time.Second, Transport: t}
	return receipt.Witnessing{Witnesses: &g, Timeout: witnessTimeout, Client: &http.Client{Timeout: witnessTimeout, Transport: t}}, nil
}

// countingConn counts the bytes a connection carries.
type countingConn struct {
	net.Conn
	sent, received prometheus.Counter
}

func (c *countingConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.received.Add(float64(n))
	return n, err
}

func (c *countingConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.sent.Add(float64(n))
	return n, err
}

// hostPort is the address a URL dials, with the scheme's default port.
func hostPort(u *url.URL) string {
	if u.Port() != "" {
		return u.Host
	}
	return net.JoinHostPort(u.Hostname(), map[string]string{"https": "443", "http": "80"}[u.Scheme])
}

// witnessTimeout bounds how long a checkpoint waits for cosignatures
// before it is published with those that came back.
const witnessTimeout = 3 * time.Second

// regionPolicy is this region's witness policy, needing quorum regions:
// for verifiers, a mirroring peer counts by its mirror key, as durability
// counts it; for tessera's pushes, every peer is a witness.
func regionPolicy(cfg *config.Config, signer kms.Signer, quorum int, verifier bool) ([]byte, error) {
	logKey, err := receipt.VerifierKey(cfg.Receipts.Origin, signer)
	if err != nil {
		return nil, err
	}
	peers := make([]region.PeerWitness, 0, len(cfg.Region.Peers))
	for _, p := range cfg.Region.Peers {
		pw := region.PeerWitness{Name: p.Name, Key: p.WitnessKey, URL: p.URL}
		if verifier {
			pw.MirrorKey = p.MirrorKey
		}
		peers = append(peers, pw)
	}
	return region.Policy(cfg.Receipts.Origin, logKey, peers, quorum), nil
}

// RegionAddr is listen.region as bound ("" when regions are off).
func (s *Server) RegionAddr() string {
	if s.region == nil {
		return ""
	}
	return s.region.lis.Addr().String()
}

// handlePolicy serves GET /v1/region/policy: the witness policy a
// verifier of this region's receipts may start from (`knhk region
// policy`). A verifier should write its own; this one says what this
// region was told to trust.
func (s *Server) handlePolicy(w http.ResponseWriter, _ *http.Request) {
	if s.region == nil || s.region.policy == nil {
		writeJSON(w, http.StatusNotFound, apiError{"regions are off (listen.region is not set) or receipts are off"})
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	_, _ = w.Write(s.region.policy)
}

// regionBundle is a receipt bundle with its durability across regions: a
// receipt is durable once its checkpoint carries cosignatures from
// region.quorum regions, this one counting as one.
type regionBundle struct {
	receipt.Bundle
	Durable      bool                 `json:"durable"`
	Cosignatures []region.Cosignature `json:"cosignatures"`
}

// bundle proves a receipt against the newest checkpoint that met the
// quorum when the latest has not (a peer down): once durable, a receipt
// stays durable.
func (r *regionParts) bundle(ctx context.Context, rs *receipt.Service, id [16]byte, b receipt.Bundle) (regionBundle, error) {
	cs := r.cosigners.Of([]byte(b.Checkpoint))
	if 1+r.cosigners.Counted(cs) >= r.quorum {
		return regionBundle{Bundle: b, Durable: true, Cosignatures: cs}, nil
	}
	if q := r.durable.State(); q.Durable != nil && q.DurableSize > b.Index {
		qb, err := rs.BundleAt(ctx, id, q.Durable)
		if err != nil {
			return regionBundle{}, err
		}
		return regionBundle{Bundle: qb, Durable: true, Cosignatures: r.cosigners.Of(q.Durable)}, nil
	}
	return regionBundle{Bundle: b, Durable: false, Cosignatures: cs}, nil
}

// track feeds each newly published checkpoint to the quorum tracker until
// ctx ends. A file read four times a second costs nothing beside the
// receipts; it bounds how stale the lag metrics are.
func (r *regionParts) track(ctx context.Context, rs *receipt.Service, log *slog.Logger) {
	defer close(r.tracked)
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	var lastErr time.Time
	for {
		var raw []byte
		var err error
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if raw, err = rs.Checkpoint(ctx); err == nil {
				for _, p := range r.pushers {
					p.Poke()
				}
			}
		case c := <-r.cosigned:
			if err := r.durable.Cosigned(c.checkpoint, c.line, time.Now()); err != nil {
				log.Warn("region: a peer's mirror cosignature not kept", "error", err.Error())
			}
			continue
		}
		if err == nil {
			err = r.durable.Observe(raw, time.Now())
		}
		if err != nil && !errors.Is(err, receipt.ErrNoCheckpoint) && time.Since(lastErr) > time.Minute {
			lastErr = time.Now() // a line a minute, not four a second
			log.Warn("region: following this region's checkpoints", "error", err.Error())
		}
	}
}

// handleEvidence serves GET /v1/region/evidence.
func (s *Server) handleEvidence(w http.ResponseWriter, r *http.Request) {
	if s.region == nil {
		writeJSON(w, http.StatusNotFound, apiError{"regions are off (listen.region is not set)"})
		return
	}
	s.region.witness.EvidenceHandler().ServeHTTP(w, r)
}

// handleMirror serves GET /v1/region/mirror: the peers' logs this region
// mirrors, with the size held and the root of those entries, so mirrors
// can be compared.
func (s *Server) handleMirror(w http.ResponseWriter, _ *http.Request) {
	if s.region == nil {
		writeJSON(w, http.StatusNotFound, apiError{"regions are off (listen.region is not set)"})
		return
	}
	logs, err := s.region.mirror.Logs()
	if err != nil {
		s.internalError(w, "listing the mirrored logs", err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"logs": logs})
}

// serverErrors takes net/http's error lines for listen.region into the
// JSON log, and counts the refused handshakes: a peer that is not one is
// otherwise invisible.
type serverErrors struct {
	log     *slog.Logger
	refused prometheus.Counter
}

func (e serverErrors) Write(p []byte) (int, error) {
	msg := strings.TrimSpace(string(p))
	if strings.Contains(msg, "TLS handshake error") {
		e.refused.Inc()
	}
	e.log.Warn("region: listen.region", "error", msg)
	return len(p), nil
}

// retainMirrored applies this region's receipts.retention to the entries
// it mirrors, at start and every minute, until ctx ends.
func (r *regionParts) retainMirrored(ctx context.Context, keep time.Duration, log *slog.Logger, pruned prometheus.Counter) {
	t := time.NewTicker(time.Minute)
	defer t.Stop()
	for {
		now := time.Now()
		st, err := r.mirror.Prune(now.Add(-keep), now)
		pruned.Add(float64(st.Pruned))
		switch {
		case err != nil:
			log.Error("region: retention of mirrored receipts failed; the next pass tries again", "error", err.Error())
		case st.Pruned > 0:
			log.Info("region: mirrored receipt bodies pruned", "pruned", st.Pruned, "held", st.Held, "older_than", keep)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// cosignature is a peer mirror's cosignature line on a checkpoint of this
// region's log, for the tracker.
type cosignature struct{ checkpoint, line []byte }
