package extproc

import (
	"context"
	"crypto/sha256"
	"slices"
	"strings"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"

	"github.com/knhk/knhk/pkg/receipt"
)

// HeaderReceipt carries the receipt token back to the client.
const HeaderReceipt = "x-knhk-receipt"

// Issuer durably logs a receipt and returns its token.
type Issuer interface {
	Issue(ctx context.Context, r *receipt.Receipt) (string, error)
}

// SetReceipts turns receipts on (nil: off).
func (s *Server) SetReceipts(i Issuer) {
	if i == nil {
		s.receipts.Store(nil)
		return
	}
	s.receipts.Store(&i)
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

// issue builds and logs the receipt; it returns the header to add, or nil
// when receipts are off or logging failed (then no token is promised).
func (s *Server) issue(st *stream, status int, decision string, resHeaders headerView) *corev3.HeaderValueOption {
	ip := s.receipts.Load()
	if ip == nil || !st.sawRequest {
		return nil
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
	// Generous: a receipt promised late is better than none, and Envoy's
	// route timeout bounds the request anyway.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	tok, err := (*ip).Issue(ctx, &r)
	if err != nil {
		s.metrics.receiptErrors.Inc()
		s.log.Error("receipt not logged; response goes without x-knhk-receipt", "error", err.Error())
		return nil
	}
	s.metrics.receipts.Inc()
	return setHeader(HeaderReceipt, []byte(tok))
}
