package extproc

import (
	"context"
	"crypto/sha256"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"

	"github.com/knhk/knhk/pkg/receipt"
)

// HeaderReceipt carries the receipt token back to the client.
const HeaderReceipt = "x-knhk-receipt"

// receiptTokenMax bounds a token (pkg/receipt keeps them within 512 bytes).
const receiptTokenMax = 512

// Issuer durably logs a receipt and returns its token.
type Issuer interface {
	Issue(ctx context.Context, r *receipt.Receipt) (string, error)
}

// ReceiptOptions say how receipts are issued.
type ReceiptOptions struct {
	// Required: a request that cannot get a receipt is answered 503 with
	// x-knhk-shed: receipt rather than served without one.
	Required bool
	// Timeout bounds one Issue call; Envoy's message_timeout, since past it
	// Envoy has given up on the answer anyway.
	Timeout time.Duration
}

type receipts struct {
	issuer Issuer
	opts   ReceiptOptions
}

// SetReceipts turns receipts on (nil: off).
func (s *Server) SetReceipts(i Issuer, opts ReceiptOptions) {
	if i == nil {
		s.receipts.Store(nil)
		return
	}
	if opts.Timeout <= 0 {
		opts.Timeout = 200 * time.Millisecond
	}
	s.receipts.Store(&receipts{issuer: i, opts: opts})
}

// requestFacts are the parts of the request a receipt records.
type requestFacts struct {
	method, authority, path string
	caller                  string // the downstream peer's SPIFFE ID, under mTLS
	headers                 [32]byte
}

func facts(hs headerView) requestFacts {
	var f requestFacts
	f.method, _ = hs.Get(":method")
	f.authority, _ = hs.Get(":authority")
	f.path, _ = hs.Get(":path")
	f.headers = headerDigest(hs)
	return f
}

// headerDigest hashes headers canonically: sorted "name\x00value\n"
// lines, without x-knhk-* headers (knhk's own, or stripped).
func headerDigest(hs headerView) [32]byte {
	lines := make([]string, 0, len(hs))
	for _, h := range hs {
		k := h.GetKey()
		if strings.HasPrefix(k, HeaderPrefix) {
			continue
		}
		v := h.GetValue()
		if raw := h.GetRawValue(); raw != nil {
			v = string(raw)
		}
		lines = append(lines, k+"\x00"+v+"\n")
	}
	slices.Sort(lines)
	h := sha256.New()
	for _, l := range lines {
		h.Write([]byte(l))
	}
	var out [32]byte
	h.Sum(out[:0])
	return out
}

// issue builds and logs the receipt. It returns the header to add, or nil
// when receipts are off; refuse is true when receipts are required and
// this one could not be logged, so the caller must not serve the response.
func (s *Server) issue(st *stream, status int, decision string, resHeaders headerView) (h *corev3.HeaderValueOption, refuse bool) {
	rc := s.receipts.Load()
	if rc == nil || !st.sawRequest {
		return nil, false
	}
	r := receipt.Receipt{
		Time: st.start.UnixNano(), Method: st.facts.method, Authority: st.facts.authority, Path: st.facts.path,
		Status: uint16(status), DurationUs: uint64(max(0, s.now().Sub(st.start).Microseconds())),
		Version: st.version.String(), Decision: decision, Caller: st.facts.caller, ReqHeaders: st.facts.headers,
	}
	if r.Version == "none" {
		r.Version = ""
	}
	if st.classified {
		r.Class = st.class.String()
	}
	if resHeaders != nil {
		r.ResHeaders = headerDigest(resHeaders)
	}
	// The stream's context ends when Envoy gives up on the request; the
	// timeout is Envoy's own message_timeout, past which it no longer
	// waits for this answer.
	ctx, cancel := context.WithTimeout(st.ctx, rc.opts.Timeout)
	defer cancel()
	tok, err := rc.issuer.Issue(ctx, &r)
	if err != nil {
		s.metrics.receiptErrors.Inc()
		if rc.opts.Required {
			s.metrics.receiptRefused.Inc()
		}
		s.receiptLog.failed(s.log, err, rc.opts.Required)
		return nil, rc.opts.Required
	}
	s.metrics.receipts.Inc()
	return setHeader(HeaderReceipt, []byte(tok)), false
}

// refusedForReceipt is the answer when receipts are required and none
// could be logged.
func refusedForReceipt() *extprocv3.ProcessingResponse {
	return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ImmediateResponse{
		ImmediateResponse: &extprocv3.ImmediateResponse{
			Status:  &typev3.HttpStatus{Code: typev3.StatusCode_ServiceUnavailable},
			Headers: &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{setHeader(HeaderShed, []byte("receipt"))}},
			Body:    []byte("receipt could not be logged (receipts.required)\n"),
			Details: "knhk_receipt_required",
		},
	}}
}

// failureLog logs receipt failures at most once a second, with how many
// there were since the last line: a client that can make issuing fail
// must not be able to flood the log.
type failureLog struct {
	mu     sync.Mutex
	last   time.Time
	missed int
}

func (f *failureLog) failed(log *slog.Logger, err error, required bool) {
	now := time.Now()
	f.mu.Lock()
	f.missed++
	if now.Sub(f.last) < time.Second {
		f.mu.Unlock()
		return
	}
	n := f.missed
	f.last, f.missed = now, 0
	f.mu.Unlock()
	what := "responses went without x-knhk-receipt"
	if required {
		what = "requests refused with 503 x-knhk-shed: receipt (receipts.required)"
	}
	log.Error("receipts not logged; "+what, "count", n, "error", err.Error())
}
