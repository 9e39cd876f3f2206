package extproc

import (
	"strings"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"

	"github.com/knhk/knhk/pkg/admission"
	"github.com/knhk/knhk/pkg/canary"
	"github.com/knhk/knhk/pkg/capacity"
)

// Header names of the admission contract.
const (
	HeaderClass = "x-knhk-slo-class"
	HeaderShed  = "x-knhk-shed"
	// RouteAttribute is the Envoy attribute naming the matched route, for
	// classification rules on routes.
	RouteAttribute = "xds.route_name"
	// PeerURIAttribute is the downstream client certificate's URI SAN —
	// its SPIFFE ID when the listener does mTLS (e.g. an Istio sidecar).
	PeerURIAttribute = "connection.uri_san_peer_certificate"
)

// CapacityKey says which part of a request the capacity sketches count.
type CapacityKey struct {
	Kind   string // "path", "route" or "header"
	Header string // lower-case, for Kind "header"
}

// Admission is the per-request admission setup; a reload swaps it whole.
type Admission struct {
	Enabled       bool // false: classify and label, never shed
	Classifier    *admission.Classifier
	Limiters      [3]*admission.Limiter // by canary.Version; None shares Stable's
	TrustedHeader string                // "" unless the config trusts one
	RetryAfter    string                // seconds, for C1's 429
	Tracker       *capacity.Tracker     // may be nil
	Key           CapacityKey
}

func (a *Admission) limiter(v canary.Version) *admission.Limiter {
	if l := a.Limiters[v]; l != nil {
		return l
	}
	return a.Limiters[canary.Stable]
}

// SetAdmission installs the admission setup (nil: no classes at all).
func (s *Server) SetAdmission(a *Admission) { s.admission.Store(a) }

// admit classifies the request, feeds the capacity sketches and, with
// admission on, asks the version's limiter. It returns the immediate
// response to send when the request is shed.
func (s *Server) admit(st *stream, hs headerView, req *extprocv3.ProcessingRequest, trusted string) *extprocv3.ProcessingResponse {
	a := st.admission
	if a == nil {
		return nil
	}
	path, _ := hs.Get(":path")
	q := admission.Request{TrustedClass: trusted}
	q.Method, _ = hs.Get(":method")
	q.Path = path
	q.Authority, _ = hs.Get(":authority")
	q.Route = attribute(req, RouteAttribute)
	q.SpiffeID = attribute(req, PeerURIAttribute)
	st.class = a.Classifier.Classify(&q)
	st.classified = true
	now := s.now()
	if a.Tracker != nil {
		a.Tracker.Observe(capacityKey(a.Key, hs, path, q.Route), now)
	}
	if !a.Enabled {
		// Capacity planning still sees every class's demand and latency:
		// everything offered is admitted.
		if a.Tracker != nil {
			a.Tracker.Offered(st.class, true, now)
			st.tracked = true
		}
		return nil
	}
	lim := a.limiter(st.version)
	verdict := lim.Acquire(st.class, now)
	if a.Tracker != nil {
		a.Tracker.Offered(st.class, verdict == admission.Admit, now)
	}
	s.metrics.admission[st.class][verdict].Inc()
	if verdict == admission.Admit {
		st.limiter = lim
		return nil
	}
	return shed(st.class, verdict, a.RetryAfter, lim.Estimate(st.class, now))
}

// shed builds the immediate response: 503 for R1/W1, 429 + Retry-After for
// C1 (its budget is a day: deferral, not failure).
func shed(c admission.Class, v admission.Verdict, retryAfter string, estimate time.Duration) *extprocv3.ProcessingResponse {
	code := typev3.StatusCode_ServiceUnavailable
	why := "no capacity left for its class"
	if v == admission.RejectOverBudget {
		why = "its class's latency estimate " + estimate.Round(time.Millisecond).String() + " already exceeds its budget"
	}
	hm := &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{
		setHeader(HeaderShed, []byte(c.String())),
		setHeader("content-type", []byte("text/plain; charset=utf-8")),
	}}
	if c == admission.C1 {
		code = typev3.StatusCode_TooManyRequests
		hm.SetHeaders = append(hm.SetHeaders, setHeader("retry-after", []byte(retryAfter)))
	}
	body := "knhk: " + c.String() + " request shed: " + why + "\n"
	return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ImmediateResponse{
		ImmediateResponse: &extprocv3.ImmediateResponse{
			Status:  &typev3.HttpStatus{Code: code},
			Headers: hm,
			Body:    []byte(body),
			Details: "knhk_shed_" + c.String() + "_" + v.Reason(),
		},
	}}
}

func capacityKey(k CapacityKey, hs headerView, path, route string) string {
	switch k.Kind {
	case "route":
		return route
	case "header":
		v, _ := hs.Get(k.Header)
		return v
	}
	if i := strings.IndexByte(path, '?'); i >= 0 {
		return path[:i]
	}
	return path
}

// attribute reads a request attribute, whatever filter name keys it.
func attribute(req *extprocv3.ProcessingRequest, name string) string {
	for _, st := range req.GetAttributes() {
		if v, ok := st.GetFields()[name]; ok {
			return v.GetStringValue()
		}
	}
	return ""
}

// release returns the request's slot (once) at the end of its stream.
func (st *stream) release(s *Server) {
	if st.limiter == nil && !st.tracked {
		return
	}
	now := s.now()
	if st.limiter != nil {
		st.limiter.Release(st.class, st.latency, now)
	}
	if a := st.admission; a != nil && a.Tracker != nil && st.latency > 0 {
		a.Tracker.Completed(st.class, st.latency, now)
	}
	st.limiter, st.tracked = nil, false
}
