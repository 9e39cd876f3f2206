package extproc

import (
	"context"
	"sync"
	"testing"

	"google.golang.org/protobuf/types/known/structpb"

	"github.com/knhk/knhk/pkg/receipt"
)

type issued struct {
	mu sync.Mutex
	rs []receipt.Receipt
}

func (i *issued) Issue(_ context.Context, r *receipt.Receipt) (string, error) {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.rs = append(i.rs, *r)
	return "kr1.test", nil
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
			s.SetReceipts(&got)
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
