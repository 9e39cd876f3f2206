// Package extproc is knhk's Envoy-facing gRPC service: it translates Envoy's
// ext_proc messages into decisions made by pkg/* and the decisions back into
// header mutations. It holds no policy of its own.
package extproc

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/knhk/knhk/pkg/admission"
	"github.com/knhk/knhk/pkg/canary"
	"github.com/knhk/knhk/pkg/flags"
)

// Header names of the contract.
const (
	HeaderPrefix  = "x-knhk-"
	HeaderVersion = "x-knhk-version"
	HeaderFlags   = "x-knhk-flags"
	// ClusterAttribute is the Envoy attribute (requested in the filter's
	// response_attributes) naming the cluster that actually served a request,
	// so responses routed by weighted_clusters still report their version.
	ClusterAttribute = "xds.cluster_name"
)

// Clusters maps Envoy cluster names to versions.
type Clusters struct {
	Stable, Canary string
}

func (c Clusters) version(name string) canary.Version {
	switch name {
	case c.Stable:
		return canary.Stable
	case c.Canary:
		return canary.Canary
	}
	// In Istio, istiod names the clusters: "outbound|<port>|<subset>|<host>",
	// with DestinationRule subsets named stable and canary (envoy/istio/).
	if rest, ok := strings.CutPrefix(name, "outbound|"); ok {
		if parts := strings.SplitN(rest, "|", 3); len(parts) == 3 {
			switch parts[1] {
			case "stable":
				return canary.Stable
			case "canary":
				return canary.Canary
			}
		}
	}
	return canary.None
}

// Observer receives every finished request: the version that served it,
// whether it failed (an upstream 5xx or Envoy's reply for it) and its
// latency from request headers to response headers.
type Observer interface {
	Observe(v canary.Version, failed bool, latency time.Duration)
}

// Server implements envoy.service.ext_proc.v3.ExternalProcessor.
type Server struct {
	extprocv3.UnimplementedExternalProcessorServer

	router     atomic.Pointer[canary.Router]
	flags      atomic.Pointer[flags.Set]
	admission  atomic.Pointer[Admission]
	receipts   atomic.Pointer[receipts]
	receiptLog failureLog
	limits     atomic.Pointer[HeaderLimits]
	clusters   Clusters
	metrics    *Metrics
	log        *slog.Logger
	observer   Observer
	now        func() time.Time
}

// NewServer returns a server routing with r. metrics may be shared with
// other servers; log must not be nil; obs may be nil.
func NewServer(r *canary.Router, clusters Clusters, m *Metrics, log *slog.Logger, obs Observer) *Server {
	s := &Server{clusters: clusters, metrics: m, log: log, observer: obs, now: time.Now}
	s.router.Store(r)
	return s
}

// HeaderLimits are Envoy's header limits (count, and bytes of names and
// values) that knhk's mutations must keep within: past them Envoy turns the
// request or response into a bare 500. Zero fields are not checked.
type HeaderLimits struct {
	Count, RequestBytes, ResponseBytes int
}

// SetHeaderLimits sets the limits knhk's mutations must fit.
func (s *Server) SetHeaderLimits(l HeaderLimits) { s.limits.Store(&l) }

// overflows reports whether hs with mut applied, plus a header reserve
// whose value is reserveLen bytes (0: none), would exceed the limits. The
// reserve lets the response path keep room for the receipt without
// building it first.
func (s *Server) overflows(hs headerView, mut *extprocv3.HeaderMutation, response bool, reserve string, reserveLen int) bool {
	l := s.limits.Load()
	if l == nil {
		return false
	}
	maxBytes := l.RequestBytes
	if response {
		maxBytes = l.ResponseBytes
	}
	n, size := len(hs), 0
	for _, h := range hs {
		size += len(h.GetKey()) + len(h.GetValue()) + len(h.GetRawValue())
		if contains(mut.RemoveHeaders, h.GetKey()) {
			n--
			size -= len(h.GetKey()) + len(h.GetValue()) + len(h.GetRawValue())
		}
	}
	set := func(k string, valueLen int) {
		if old, ok := hs.Get(k); ok {
			size -= len(k) + len(old)
		} else {
			n++
		}
		size += len(k) + valueLen
	}
	for _, h := range mut.SetHeaders {
		set(h.GetHeader().GetKey(), len(h.GetHeader().GetRawValue()))
	}
	if reserve != "" {
		set(reserve, reserveLen)
	}
	return (l.Count > 0 && n > l.Count) || (maxBytes > 0 && size > maxBytes)
}

// tooLarge is knhk's own answer, with a receipt, when its headers would not
// fit Envoy's limits: better than Envoy's bare 500, and never blamed on a
// version.
func (s *Server) tooLarge(st *stream, code typev3.StatusCode, why string) *extprocv3.ProcessingResponse {
	s.metrics.headerOverflows.Inc()
	resp := &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ImmediateResponse{
		ImmediateResponse: &extprocv3.ImmediateResponse{
			Status:  &typev3.HttpStatus{Code: code},
			Headers: &extprocv3.HeaderMutation{},
			Body:    []byte(why + "\n"),
			Details: "knhk_header_limit",
		},
	}}
	h, refuse := s.issue(st, int(code), "refused:header_limit", nil)
	if refuse {
		return refusedForReceipt()
	}
	if h != nil {
		ir := resp.GetImmediateResponse()
		ir.Headers.SetHeaders = append(ir.Headers.SetHeaders, h)
	}
	return resp
}

// SetFlags swaps the feature flags (config reload); nil means none.
func (s *Server) SetFlags(f *flags.Set) { s.flags.Store(f) }

// SetRouter swaps the routing decision (config reload); in-flight streams
// keep the router they started with.
func (s *Server) SetRouter(r *canary.Router) { s.router.Store(r) }

// Router returns the current router.
func (s *Server) Router() *canary.Router { return s.router.Load() }

// stream is the per-request state: fixed size, whatever the client sends.
type stream struct {
	ctx           context.Context // Envoy's stream: done when Envoy gives up
	router        *canary.Router
	flags         *flags.Set
	admission     *Admission
	limiter       *admission.Limiter // set while the request holds a slot
	tracked       bool               // offered to capacity planning without admission
	class         admission.Class
	classified    bool
	latency       time.Duration // request headers → response headers; -1 unknown
	version       canary.Version
	start         time.Time
	facts         requestFacts // for the receipt
	sawRequest    bool
	sawResponse   bool
	observability bool
}

// Process handles one HTTP request's ext_proc stream.
func (s *Server) Process(srv extprocv3.ExternalProcessor_ProcessServer) error {
	s.metrics.streamsActive.Inc()
	defer s.metrics.streamsActive.Dec()
	st := stream{ctx: srv.Context(), router: s.router.Load(), flags: s.flags.Load(), admission: s.admission.Load(), latency: -1}
	defer s.streamEnded(&st)
	for {
		req, err := srv.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err // stream cancelled or transport failure: nothing to answer
		}
		resp, err := s.handle(&st, req)
		if err != nil {
			s.metrics.streamErrors.WithLabelValues(status.Code(err).String()).Inc()
			s.log.Warn("ext_proc stream rejected", "error", err)
			return err
		}
		if resp == nil {
			continue
		}
		if err := srv.Send(resp); err != nil {
			return err
		}
	}
}

// handle answers one message. It returns a gRPC status error for anything a
// headers-only processor should never be sent.
func (s *Server) handle(st *stream, req *extprocv3.ProcessingRequest) (*extprocv3.ProcessingResponse, error) {
	if req.GetObservabilityMode() {
		st.observability = true
	}
	var resp *extprocv3.ProcessingResponse
	switch r := req.GetRequest().(type) {
	case *extprocv3.ProcessingRequest_RequestHeaders:
		if st.sawRequest {
			return nil, status.Error(codes.InvalidArgument, "request_headers sent twice on one stream")
		}
		st.sawRequest = true
		resp = s.requestHeaders(st, r.RequestHeaders, req)
	case *extprocv3.ProcessingRequest_ResponseHeaders:
		if st.sawResponse {
			return nil, status.Error(codes.InvalidArgument, "response_headers sent twice on one stream")
		}
		st.sawResponse = true
		resp = s.responseHeaders(st, req)
	case nil:
		return nil, status.Error(codes.InvalidArgument, "processing request has no request_headers, response_headers, body or trailers set")
	default:
		return nil, status.Errorf(codes.InvalidArgument,
			"unexpected %s: knhk processes headers only; set processing_mode to SEND headers and NONE bodies/trailers (knhk envoy-config does)",
			req.ProtoReflect().WhichOneof(req.ProtoReflect().Descriptor().Oneofs().ByName("request")).Name())
	}
	if st.observability {
		return nil, nil
	}
	return resp, nil
}

// streamEnded counts a request that got no response headers. It is never
// a failure of its version: an upstream that resets or times out still
// produces response headers (Envoy's 503 or 504, with the cluster named),
// so a stream that ends without them was ended by the client or by Envoy
// itself, and any client can do that on purpose.
func (s *Server) streamEnded(st *stream) {
	st.release(s)
	if st.sawRequest && !st.sawResponse {
		s.metrics.resets.Inc()
	}
}

// requestHeaders strips client x-knhk-* headers and sets the routing header.
func (s *Server) requestHeaders(st *stream, h *extprocv3.HttpHeaders, req *extprocv3.ProcessingRequest) *extprocv3.ProcessingResponse {
	st.start = s.now()
	hs := headerView(h.GetHeaders().GetHeaders())
	if s.receipts.Load() != nil {
		st.facts = facts(hs)
		st.facts.caller = attribute(req, PeerURIAttribute)
	}
	var key string
	st.version, key = canary.Route(st.router, hs)
	s.metrics.decisions[st.version].Inc()

	var trusted string
	if a := st.admission; a != nil && a.TrustedHeader != "" {
		trusted, _ = hs.Get(a.TrustedHeader)
	}
	if resp := s.admit(st, hs, req, trusted); resp != nil {
		ir := resp.GetImmediateResponse()
		h, refuse := s.issue(st, int(ir.GetStatus().GetCode()), "shed:"+ir.GetDetails(), nil)
		if refuse {
			return refusedForReceipt()
		}
		if h != nil {
			ir.Headers.SetHeaders = append(ir.Headers.SetHeaders, h)
		}
		return resp
	}

	mut := &extprocv3.HeaderMutation{}
	if st.version != canary.None {
		mut.SetHeaders = append(mut.SetHeaders, setHeader(HeaderVersion, versionRaw[st.version]))
	}
	if st.classified {
		mut.SetHeaders = append(mut.SetHeaders, setHeader(HeaderClass, classRaw[st.class]))
	}
	if st.flags != nil {
		if f := st.flags.Header(st.version, key, key != ""); f != "" {
			mut.SetHeaders = append(mut.SetHeaders, setHeader(HeaderFlags, []byte(f)))
		}
	}
	// Client x-knhk-* headers go; one knhk sets anyway is overwritten in
	// place instead (removing and adding it would be ambiguous, and would
	// count twice against Envoy's header limit).
	for _, hv := range hs {
		k := hv.GetKey()
		if !strings.HasPrefix(k, HeaderPrefix) || setsHeader(mut, k) {
			continue
		}
		if !contains(mut.RemoveHeaders, k) {
			mut.RemoveHeaders = append(mut.RemoveHeaders, k)
			s.metrics.stripped.Inc()
		}
	}
	if s.overflows(hs, mut, false, "", 0) {
		// Flags and the class are advisory: drop them before refusing.
		// The routing header is what the route table needs.
		mut.SetHeaders = slices.DeleteFunc(mut.SetHeaders, func(h *corev3.HeaderValueOption) bool {
			k := h.GetHeader().GetKey()
			if k == HeaderVersion {
				return false
			}
			// A client's copy was left to be overwritten: it must go now.
			if _, sent := hs.Get(k); sent && !contains(mut.RemoveHeaders, k) {
				mut.RemoveHeaders = append(mut.RemoveHeaders, k)
				s.metrics.stripped.Inc()
			}
			return true
		})
		if s.overflows(hs, mut, false, "", 0) {
			return s.tooLarge(st, typev3.StatusCode_RequestHeaderFieldsTooLarge,
				"request headers leave no room for knhk's routing header within Envoy's limits")
		}
	}
	s.countMutations(false, mut)
	return &extprocv3.ProcessingResponse{
		Response: &extprocv3.ProcessingResponse_RequestHeaders{
			RequestHeaders: &extprocv3.HeadersResponse{
				Response: &extprocv3.CommonResponse{HeaderMutation: mut, ClearRouteCache: true},
			},
		},
	}
}

// responseHeaders tells the client which version served the request: the
// cluster Envoy used when known, else the version knhk chose.
func (s *Server) responseHeaders(st *stream, req *extprocv3.ProcessingRequest) *extprocv3.ProcessingResponse {
	v, reached := s.servedBy(req)
	if v == canary.None {
		v = st.version
	}
	if st.sawRequest {
		st.latency = s.now().Sub(st.start)
		switch {
		case !reached:
			// Envoy answered before any upstream was chosen (a header
			// limit, a filter's refusal): not the version's doing, and any
			// client can provoke it.
			s.metrics.localReplies.Inc()
		case s.observer != nil:
			code := statusCode(req.GetResponseHeaders().GetHeaders().GetHeaders())
			s.observer.Observe(v, code >= 500 || code == 0, st.latency)
		}
	}
	mut := &extprocv3.HeaderMutation{}
	if v != canary.None {
		mut.SetHeaders = append(mut.SetHeaders, setHeader(HeaderVersion, versionRaw[v]))
	}
	rh := headerView(req.GetResponseHeaders().GetHeaders().GetHeaders())
	if s.receipts.Load() != nil && st.sawRequest {
		if s.overflows(rh, mut, true, HeaderReceipt, receiptTokenMax) {
			// x-knhk-version is informational: the receipt must fit.
			mut.SetHeaders = nil
			if s.overflows(rh, mut, true, HeaderReceipt, receiptTokenMax) {
				return s.tooLarge(st, typev3.StatusCode_BadGateway,
					"the upstream's response headers leave no room for x-knhk-receipt within Envoy's limits")
			}
		}
	} else if s.overflows(rh, mut, true, "", 0) {
		mut.SetHeaders = nil
	}
	h, refuse := s.issue(st, statusCode(rh), "admitted", rh)
	if refuse {
		return refusedForReceipt()
	}
	if h != nil {
		mut.SetHeaders = append(mut.SetHeaders, h)
	}
	s.countMutations(true, mut)
	return &extprocv3.ProcessingResponse{
		Response: &extprocv3.ProcessingResponse_ResponseHeaders{
			ResponseHeaders: &extprocv3.HeadersResponse{
				Response: &extprocv3.CommonResponse{HeaderMutation: mut},
			},
		},
	}
}

// servedBy reads the xds.cluster_name attribute, whatever filter name Envoy
// keys the attribute struct by. reached is false only when Envoy sent
// response attributes without a cluster: no upstream was chosen, so the
// response is Envoy's own local reply. Without any attributes (a filter
// configured without response_attributes) knhk cannot tell, and trusts
// its own routing decision.
func (s *Server) servedBy(req *extprocv3.ProcessingRequest) (v canary.Version, reached bool) {
	attrs := req.GetAttributes()
	for _, st := range attrs {
		if f, ok := st.GetFields()[ClusterAttribute]; ok && f.GetStringValue() != "" {
			return s.clusters.version(f.GetStringValue()), true
		}
	}
	return canary.None, len(attrs) == 0
}

// countMutations counts what a header answer asks of Envoy.
func (s *Server) countMutations(response bool, mut *extprocv3.HeaderMutation) {
	if n := len(mut.SetHeaders); n > 0 {
		s.metrics.mutation[b2i(response)][0].Add(float64(n))
	}
	if n := len(mut.RemoveHeaders); n > 0 {
		s.metrics.mutation[b2i(response)][1].Add(float64(n))
	}
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// setsHeader reports whether mut already sets k.
func setsHeader(mut *extprocv3.HeaderMutation, k string) bool {
	for _, h := range mut.SetHeaders {
		if h.GetHeader().GetKey() == k {
			return true
		}
	}
	return false
}

// versionRaw and classRaw hold header values once; protos only read them.
var (
	versionRaw = [...][]byte{canary.None: nil, canary.Stable: []byte("stable"), canary.Canary: []byte("canary")}
	classRaw   = [...][]byte{admission.R1: []byte("R1"), admission.W1: []byte("W1"), admission.C1: []byte("C1")}
)

// statusCode parses :status without allocating; 0 when absent or malformed.
func statusCode(hs []*corev3.HeaderValue) int {
	for _, h := range hs {
		if h.GetKey() != ":status" {
			continue
		}
		raw := h.GetRawValue()
		if raw == nil {
			raw = []byte(h.GetValue())
		}
		if len(raw) != 3 {
			return 0
		}
		n := 0
		for _, c := range raw {
			if c < '0' || c > '9' {
				return 0
			}
			n = n*10 + int(c-'0')
		}
		return n
	}
	return 0
}

func setHeader(k string, v []byte) *corev3.HeaderValueOption {
	return &corev3.HeaderValueOption{
		Header:       &corev3.HeaderValue{Key: k, RawValue: v},
		AppendAction: corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD,
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// headerView looks up Envoy's header list without building a map: requests
// carry a few dozen headers, so a scan is cheaper than hashing them all.
type headerView []*corev3.HeaderValue

// Get returns the first value of a lower-case header.
func (h headerView) Get(name string) (string, bool) {
	for _, hv := range h {
		if hv.GetKey() == name {
			if raw := hv.GetRawValue(); raw != nil {
				return string(raw), true
			}
			return hv.GetValue(), true
		}
	}
	return "", false
}
