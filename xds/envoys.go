package xds

import (
	"cmp"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/genproto/googleapis/rpc/status"
)

// Bounds on what Envoys (untrusted peers) make the server store.
const (
	// defaultMaxStreams caps open ADS streams; each node needs one, so it
	// also caps the tracked Envoys. Streams past it are refused.
	defaultMaxStreams = 1024
	maxNodeBytes      = 1024 // node id and cluster
	maxErrorBytes     = 2048 // a NACK's error_detail as stored and shown
	// maxPendingNonces per stream: Envoy answers every response, so more
	// than a few unanswered ones means responses the stream never will.
	maxPendingNonces = 16
)

// trackedTypes are the resource types knhk serves; requests for others
// carry no ACK or NACK of knhk's.
var trackedTypes = []string{resource.ClusterType, resource.RouteType}

// streamKey names a stream: SotW and delta streams are numbered apart.
type streamKey struct {
	delta bool
	id    int64
}

type stream struct {
	envoy  *envoy            // nil until the first request names the node
	nonces map[string]uint64 // response nonce → snapshot version it carried
}

// envoy is one node id's state, shared by its open streams.
type envoy struct {
	id, cluster string
	since       time.Time
	streams     int
	acked       map[string]uint64 // type URL → newest version ACKed
	nack        map[string]NACK   // type URL → rejection not superseded by an ACK
}

// NACK describes a config an Envoy rejected.
type NACK struct {
	Node    string    `json:"node"`
	Version string    `json:"version"`
	TypeURL string    `json:"type_url"`
	Error   string    `json:"error"`
	Time    time.Time `json:"time"`
	version uint64
}

// request is the part of a SotW or delta DiscoveryRequest tracked here.
type request struct {
	node           *corev3.Node
	typeURL, nonce string
	version        string // SotW only: the version Envoy has accepted
	nack           *status.Status
}

func (s *Server) openStream(k streamKey) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.streams) >= s.maxStreams {
		return fmt.Errorf("xds: %d streams already open, the limit; refusing another", s.maxStreams)
	}
	s.streams[k] = &stream{nonces: map[string]uint64{}}
	return nil
}

// closeStream forgets the stream, and its Envoy with its last stream.
func (s *Server) closeStream(k streamKey) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st, ok := s.streams[k]
	if !ok { // refused at open
		return
	}
	delete(s.streams, k)
	if e := st.envoy; e != nil {
		if e.streams--; e.streams == 0 {
			delete(s.envoys, e.id)
		}
	}
}

// sent records which version a response nonce carried: a delta ACK names
// only the nonce, and a SotW NACK names the last good version, not the
// rejected one.
func (s *Server) sent(k streamKey, nonce, version string) {
	v, err := strconv.ParseUint(version, 10, 64)
	if err != nil { // not a version of Update's
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if st := s.streams[k]; st != nil {
		if len(st.nonces) >= maxPendingNonces {
			clear(st.nonces)
		}
		st.nonces[nonce] = v
	}
}

// received binds a stream to its node on the first request, then tracks
// ACKs and NACKs. An initial request (no nonce) is neither. A NACK is
// cleared when the same Envoy ACKs that type at a version at least as new.
// For a NACK of a known response it returns the rejected version.
func (s *Server) received(k streamKey, r request) (rejected string, _ error) {
	now := time.Now()
	s.mu.Lock()
	st := s.streams[k]
	if st == nil {
		s.mu.Unlock()
		return "", nil
	}
	if st.envoy == nil {
		e, err := s.join(r.node, now)
		if err != nil {
			s.mu.Unlock()
			return "", err
		}
		st.envoy = e
	}
	if r.nonce == "" || !slices.Contains(trackedTypes, r.typeURL) {
		s.mu.Unlock()
		return "", nil
	}
	e := st.envoy
	v, known := st.nonces[r.nonce]
	delete(st.nonces, r.nonce)
	if r.nack != nil {
		if !known {
			v = s.version
		}
		n := NACK{Node: e.id, Version: strconv.FormatUint(v, 10), TypeURL: r.typeURL,
			Error: clip(r.nack.GetMessage(), maxErrorBytes), Time: now, version: v}
		old, again := e.nack[r.typeURL]
		again = again && old.version == v
		e.nack[r.typeURL] = n
		s.mu.Unlock()
		s.nacks.Inc()
		if !again { // one line per rejected version and Envoy, however often it repeats
			s.log.Error("Envoy rejected xDS config (NACK); it keeps serving the last good one",
				"node", n.Node, "type_url", n.TypeURL, "rejected_version", n.Version, "error", n.Error)
		}
		if known {
			rejected = n.Version
		}
		return rejected, nil
	}
	if !known { // SotW: version_info is what Envoy now has
		v, _ = strconv.ParseUint(r.version, 10, 64)
	}
	var propagation time.Duration
	if v > e.acked[r.typeURL] {
		e.acked[r.typeURL] = v
		// A change made while this Envoy was connected; its first fetch is not one.
		if t, ok := s.sentAt[v]; ok && r.typeURL == resource.RouteType && t.After(e.since) {
			propagation = now.Sub(t)
			s.recent[s.recentN%uint64(len(s.recent))] = propagation
			s.recentN++
		}
	}
	n, nacked := e.nack[r.typeURL]
	cleared := nacked && v >= n.version
	if cleared {
		delete(e.nack, r.typeURL)
	}
	s.mu.Unlock()
	s.acks.Inc()
	if propagation > 0 {
		s.propagate.Observe(propagation.Seconds())
	}
	if cleared {
		s.log.Info("xDS config accepted again", "node", e.id, "type_url", r.typeURL, "version", v)
	}
	return "", nil
}

// join returns the node's state, creating it on its first stream. Must be
// called with mu held.
func (s *Server) join(node *corev3.Node, now time.Time) (*envoy, error) {
	id, cluster := node.GetId(), node.GetCluster()
	if len(id) > maxNodeBytes || len(cluster) > maxNodeBytes {
		return nil, fmt.Errorf("xds: node id of %d bytes or cluster of %d bytes, over the %d-byte limit", len(id), len(cluster), maxNodeBytes)
	}
	e := s.envoys[id]
	if e == nil {
		e = &envoy{id: id, cluster: cluster, since: now, acked: map[string]uint64{}, nack: map[string]NACK{}}
		s.envoys[id] = e
	}
	e.streams++
	return e, nil
}

// clip cuts s to at most n bytes on a rune boundary.
func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return strings.ToValidUTF8(s[:n], "") + "…"
}

// EnvoyStatus is one connected Envoy in GET /v1/xds.
type EnvoyStatus struct {
	Node                string    `json:"node"`
	Cluster             string    `json:"cluster"`
	ConnectedSince      time.Time `json:"connected_since"`
	Streams             int       `json:"streams"`
	AckedClusterVersion uint64    `json:"acked_cluster_version"`
	AckedRouteVersion   uint64    `json:"acked_route_version"`
	NACKs               []NACK    `json:"nacks,omitempty"`
}

// Status is the xDS view for GET /v1/xds.
type Status struct {
	Version uint64 `json:"version"`
	// AckedVersion is the newest route table every connected Envoy has
	// ACKed (0 with none connected).
	AckedVersion   uint64        `json:"acked_route_version"`
	NACK           *NACK         `json:"nack,omitempty"` // the first outstanding one, if any
	Propagations   int           `json:"propagation_samples"`
	PropagationP50 float64       `json:"propagation_p50_ms"`
	PropagationP99 float64       `json:"propagation_p99_ms"`
	Envoys         []EnvoyStatus `json:"envoys"`
}

// Status reports versions, each connected Envoy (by node id), any NACK
// and propagation percentiles over the last 1,024 samples (state change →
// an Envoy's ACK of the route table).
func (s *Server) Status() Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := Status{Version: s.version, Envoys: make([]EnvoyStatus, 0, len(s.envoys))}
	for _, e := range s.envoys {
		es := EnvoyStatus{Node: e.id, Cluster: e.cluster, ConnectedSince: e.since, Streams: e.streams,
			AckedClusterVersion: e.acked[resource.ClusterType], AckedRouteVersion: e.acked[resource.RouteType]}
		for _, t := range trackedTypes {
			if n, ok := e.nack[t]; ok {
				es.NACKs = append(es.NACKs, n)
			}
		}
		st.Envoys = append(st.Envoys, es)
	}
	slices.SortFunc(st.Envoys, func(a, b EnvoyStatus) int { return cmp.Compare(a.Node, b.Node) })
	for i, e := range st.Envoys {
		if i == 0 || e.AckedRouteVersion < st.AckedVersion {
			st.AckedVersion = e.AckedRouteVersion
		}
		if len(e.NACKs) > 0 && st.NACK == nil {
			n := e.NACKs[0]
			st.NACK = &n
		}
	}
	cnt := int(min(s.recentN, uint64(len(s.recent))))
	d := slices.Clone(s.recent[:cnt])
	slices.Sort(d)
	q := func(p float64) float64 {
		if cnt == 0 {
			return 0
		}
		return float64(d[min(cnt-1, int(p*float64(cnt)))]) / float64(time.Millisecond)
	}
	st.Propagations, st.PropagationP50, st.PropagationP99 = cnt, q(0.5), q(0.99)
	return st
}

// LastNACK returns an outstanding NACK, if any (the first by node id).
func (s *Server) LastNACK() *NACK {
	return s.Status().NACK
}

// Healthy is nil unless a connected Envoy has rejected a config it has not
// since accepted a newer version of; the error names that Envoy.
func (s *Server) Healthy() error {
	var first *NACK
	var others []string
	for _, e := range s.Status().Envoys {
		if len(e.NACKs) == 0 {
			continue
		}
		if first == nil {
			first = &e.NACKs[0]
			continue
		}
		others = append(others, strconv.Quote(e.Node))
	}
	if first == nil {
		return nil
	}
	err := fmt.Sprintf("envoy %q rejected xDS version %s (%s): %s", first.Node, first.Version, first.TypeURL, first.Error)
	if len(others) > 3 {
		others = append(others[:3], fmt.Sprintf("%d more", len(others)-3))
	}
	if len(others) > 0 {
		err += "; also rejected by " + strings.Join(others, ", ")
	}
	return fmt.Errorf("%s", err)
}
