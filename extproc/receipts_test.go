package extproc

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"google.golang.org/protobuf/types/known/structpb"

	"github.com/knhk/knhk/internal/harness"
	"github.com/knhk/knhk/pkg/admission"
	"github.com/knhk/knhk/pkg/receipt"
)

type issued struct {
	mu  sync.Mutex
	rs  []receipt.Receipt
	err error
	// block: Issue waits for its context, as a stalled log would.
	block bool
}

func (i *issued) Issue(ctx context.Context, r *receipt.Receipt) (string, error) {
	if i.block {
		<-ctx.Done()
		return "", ctx.Err()
	}
	i.mu.Lock()
	defer i.mu.Unlock()
	if i.err != nil {
		return "", i.err
	}
	i.rs = append(i.rs, *r)
	return "kr1.test", nil
}

// roundTrip sends one request and its response through s and returns
// knhk's answer to the response headers.
func roundTrip(t *testing.T, c extprocv3.ExternalProcessorClient) *extprocv3.ProcessingResponse {
	t.Helper()
	stream, err := c.Process(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(reqHeaders(":method", "GET", ":path", "/x", "x-user-id", "u1")); err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(respHeaders("knhk_stable")); err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	_ = stream.CloseSend()
	return resp
}

func receiptHeader(m *extprocv3.HeaderMutation) string {
	for _, h := range m.GetSetHeaders() {
		if h.GetHeader().GetKey() == HeaderReceipt {
			return string(h.GetHeader().GetRawValue())
		}
	}
	return ""
}

// TestReceiptFailure: with receipts.required a request that cannot get a
// receipt is refused with 503 x-knhk-shed: receipt; without it the response
// goes out unreceipted. Either way it is counted, and the log gets at most
// one line a second however many fail.
func TestReceiptFailure(t *testing.T) {
	for _, required := range []bool{false, true} {
		t.Run(fmt.Sprintf("required=%v", required), func(t *testing.T) {
			s, _ := newServer(t, 0)
			logs := &harness.LogBuffer{}
			s.log = slog.New(slog.NewJSONHandler(logs, nil))
			s.SetReceipts(&issued{err: errors.New("journal: disk full")}, ReceiptOptions{Required: required})
			c := dial(t, s)
			const n = 50
			for range n {
				resp := roundTrip(t, c)
				ir := resp.GetImmediateResponse()
				if required {
					if ir == nil || ir.GetStatus().GetCode() != typev3.StatusCode_ServiceUnavailable ||
						len(ir.GetHeaders().GetSetHeaders()) != 1 || ir.GetHeaders().GetSetHeaders()[0].GetHeader().GetKey() != HeaderShed ||
						string(ir.GetHeaders().GetSetHeaders()[0].GetHeader().GetRawValue()) != "receipt" {
						t.Fatalf("required receipt failed, answer %v, want 503 x-knhk-shed: receipt", resp)
					}
				} else if ir != nil || receiptHeader(resp.GetResponseHeaders().GetResponse().GetHeaderMutation()) != "" {
					t.Fatalf("answer %v, want the response served without a receipt", resp)
				}
			}
			if got := testutil.ToFloat64(s.metrics.receiptErrors); got != n {
				t.Errorf("receipt errors %v, want %d", got, n)
			}
			wantRefused := 0.0
			if required {
				wantRefused = n
			}
			if got := testutil.ToFloat64(s.metrics.receiptRefused); got != wantRefused {
				t.Errorf("refused %v, want %v", got, wantRefused)
			}
			if lines := strings.Count(logs.String(), "receipts not logged"); lines < 1 || lines > 3 {
				t.Errorf("%d log lines for %d failures within a second or so, want 1 to 3", lines, n)
			}
		})
	}
}

// TestReceiptIssueBoundedByMessageTimeout: a stalled log gives up after
// Envoy's message_timeout, not after seconds.
func TestReceiptIssueBoundedByMessageTimeout(t *testing.T) {
	s, _ := newServer(t, 0)
	s.SetReceipts(&issued{block: true}, ReceiptOptions{Timeout: 50 * time.Millisecond, Required: true})
	c := dial(t, s)
	start := time.Now()
	resp := roundTrip(t, c)
	if resp.GetImmediateResponse() == nil {
		t.Fatalf("answer %v, want a refusal", resp)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("a stalled receipt held the response %v; the bound is the 50 ms message timeout", d)
	}
}

// The caller's SPIFFE ID (Envoy's downstream peer URI SAN attribute) is
// recorded in the receipt; a client cannot claim one through headers.
func TestReceiptRecordsCallerSPIFFEID(t *testing.T) {
	for _, tc := range []struct{ name, attr, want string }{
		{"mtls caller", "spiffe://example.org/ns/shop/sa/web", "spiffe://example.org/ns/shop/sa/web"},
		{"no client certificate", "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, _ := newServer(t, 0)
			var got issued
			s.SetReceipts(&got, ReceiptOptions{})
			c := dial(t, s)
			stream, err := c.Process(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			req := reqHeaders(":method", "GET", ":path", "/x", "x-user-id", "u1", "x-knhk-caller", "spiffe://example.org/forged")
			if tc.attr != "" {
				st, _ := structpb.NewStruct(map[string]any{PeerURIAttribute: tc.attr})
				req.Attributes = map[string]*structpb.Struct{"envoy.filters.http.ext_proc": st}
			}
			if err := stream.Send(req); err != nil {
				t.Fatal(err)
			}
			if _, err := stream.Recv(); err != nil {
				t.Fatal(err)
			}
			if err := stream.Send(respHeaders("knhk_stable")); err != nil {
				t.Fatal(err)
			}
			if _, err := stream.Recv(); err != nil {
				t.Fatal(err)
			}
			got.mu.Lock()
			defer got.mu.Unlock()
			if len(got.rs) != 1 {
				t.Fatalf("%d receipts issued, want 1", len(got.rs))
			}
			if got.rs[0].Caller != tc.want {
				t.Fatalf("receipt caller %q, want %q", got.rs[0].Caller, tc.want)
			}
		})
	}
}

// TestHeadersThatWouldOverflowEnvoysLimits: a request (or response) whose
// headers leave no room for knhk's within Envoy's limits gets knhk's own
// 431 (502) with a receipt, not Envoy's bare 500 without one.
func TestHeadersThatWouldOverflowEnvoysLimits(t *testing.T) {
	s, _ := newServer(t, 50)
	s.SetHeaderLimits(HeaderLimits{Count: 120, RequestBytes: 64 << 10, ResponseBytes: 84 << 10})
	var got issued
	s.SetReceipts(&got, ReceiptOptions{})
	c := dial(t, s)
	send := func(kv []string, respKV []string) (req, resp *extprocv3.ProcessingResponse) {
		stream, err := c.Process(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = stream.CloseSend() }()
		if err := stream.Send(reqHeaders(kv...)); err != nil {
			t.Fatal(err)
		}
		if req, err = stream.Recv(); err != nil {
			t.Fatal(err)
		}
		if req.GetImmediateResponse() != nil || respKV == nil {
			return req, nil
		}
		r := respHeaders("knhk_stable")
		r.GetResponseHeaders().Headers = headers(respKV...)
		if err := stream.Send(r); err != nil {
			t.Fatal(err)
		}
		if resp, err = stream.Recv(); err != nil {
			t.Fatal(err)
		}
		return req, resp
	}
	pad := func(n int, kv ...string) []string {
		for i := range n {
			kv = append(kv, fmt.Sprintf("x-pad-%03d", i), "v")
		}
		return kv
	}
	base := []string{":method", "GET", ":path", "/", ":authority", "a", ":scheme", "http", "x-user-id", "u1"}

	req, _ := send(pad(120-len(base)/2, base...), nil) // at the limit, before knhk adds x-knhk-version
	ir := req.GetImmediateResponse()
	if ir == nil || ir.GetStatus().GetCode() != typev3.StatusCode_RequestHeaderFieldsTooLarge || receiptHeader(ir.GetHeaders()) == "" {
		t.Fatalf("120 headers + knhk's: %v, want 431 with a receipt", req)
	}
	req, _ = send(base[:len(base):len(base)], nil)
	if req.GetImmediateResponse() != nil {
		t.Fatalf("a small request was refused: %v", req)
	}
	big := append(base[:len(base):len(base)], "x-big", strings.Repeat("a", 64<<10-60))
	if req, _ := send(big, nil); req.GetImmediateResponse().GetStatus().GetCode() != typev3.StatusCode_RequestHeaderFieldsTooLarge {
		t.Fatalf("a header block at the byte limit: %v, want 431", req)
	}
	_, resp := send(base, pad(119, ":status", "200"))
	if ir := resp.GetImmediateResponse(); ir == nil || ir.GetStatus().GetCode() != typev3.StatusCode_BadGateway || receiptHeader(ir.GetHeaders()) == "" {
		t.Fatalf("a response at the count limit: %v, want 502 with a receipt", resp)
	}
	_, resp = send(base, pad(50, ":status", "200"))
	if resp.GetImmediateResponse() != nil || receiptHeader(resp.GetResponseHeaders().GetResponse().GetHeaderMutation()) == "" {
		t.Fatalf("an ordinary response: %v, want it served with a receipt", resp)
	}
}

// TestOverflowFallbackStillStripsClientHeaders: when knhk drops its own
// class header to fit Envoy's limits, the client's copy it meant to
// overwrite is removed instead of reaching the upstream.
func TestOverflowFallbackStillStripsClientHeaders(t *testing.T) {
	s, _ := newServer(t, 50)
	s.SetHeaderLimits(HeaderLimits{Count: 120})
	cl, err := admission.NewClassifier(nil, admission.W1, false)
	if err != nil {
		t.Fatal(err)
	}
	s.SetAdmission(&Admission{Classifier: cl})
	c := dial(t, s)
	kv := []string{":method", "GET", ":path", "/", ":authority", "a", ":scheme", "http", "x-user-id", "u1", "x-knhk-slo-class", "R1"}
	for i := 0; len(kv) < 240; i++ {
		kv = append(kv, fmt.Sprintf("x-pad-%03d", i), "v")
	}
	stream, err := c.Process(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = stream.CloseSend() }()
	if err := stream.Send(reqHeaders(kv...)); err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	mut := resp.GetRequestHeaders().GetResponse().GetHeaderMutation()
	if resp.GetImmediateResponse() != nil || !slices.Contains(mut.GetRemoveHeaders(), HeaderClass) {
		t.Fatalf("answer %v: the client's x-knhk-slo-class must be removed", resp)
	}
	for _, h := range mut.GetSetHeaders() {
		if h.GetHeader().GetKey() == HeaderClass {
			t.Fatalf("class header still set: %v", mut)
		}
	}
}
