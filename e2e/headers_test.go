package e2e

import (
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/knhk/knhk/internal/harness"
)

// headerUpstream answers with its name and, when asked by
// x-test-response-headers, that many extra response headers.
func headerUpstream(t *testing.T, name string) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{ReadHeaderTimeout: 5 * time.Second, MaxHeaderBytes: 1 << 20,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			n, _ := strconv.Atoi(r.Header.Get("x-test-response-headers"))
			for i := range n {
				w.Header().Set(fmt.Sprintf("x-r-%d", i), "v")
			}
			_, _ = fmt.Fprintln(w, name)
		})}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Close() })
	return l.Addr().String()
}

// TestHeaderHeadroom: requests Envoy accepts under its default limits
// (100 headers, 60 KiB) and responses carrying many headers are still
// served after knhk adds its own headers: the bootstrap leaves headroom.
// Without it Envoy answers 500 ("After mutation, the total header count
// 105 exceeds the count limit 100").
func TestHeaderHeadroom(t *testing.T) {
	s := startStack(t, harness.StackOptions{Weight: 20,
		StableAddr: headerUpstream(t, "stable"), CanaryAddr: headerUpstream(t, "canary")})
	many := func(n int, size int) map[string]string {
		h := map[string]string{"x-user-id": "headroom-user"}
		for i := range n {
			h[fmt.Sprintf("x-h-%d", i)] = strings.Repeat("v", size)
		}
		return h
	}
	// Envoy's codec counts the URL and every header name and value; Go's
	// client adds Host, User-Agent and Accept-Encoding.
	goHeaders := len("host") + len(s.ListenerAddr()) + len("user-agentGo-http-client/1.1") + len("accept-encodinggzip") +
		len("x-user-idheadroom-user") + len("/")
	// block is n bytes of headers as Envoy counts them, in eight headers.
	block := func(n int) map[string]string {
		h := many(0, 0)
		per := (n - goHeaders) / 8
		for i := range 8 {
			h[fmt.Sprintf("x-h-%d", i)] = strings.Repeat("v", per-len("x-h-0"))
		}
		return h
	}
	withResponse := func(h map[string]string) map[string]string { h["x-test-response-headers"] = "95"; return h }
	for name, h := range map[string]map[string]string{
		"95 request headers": many(94, 1), // and x-user-id
		// Envoy's default limit, with Go's three and x-user-id.
		"100 request header lines":  many(96, 1),
		"59 KiB of request headers": block(59 * 1024),
		// Within Envoy's default 60 KiB, but over it after Envoy's and knhk's additions.
		"60 KiB less 96 bytes of request headers": block(60*1024 - 96),
		"95 response headers":                     withResponse(many(0, 0)),
		"95 headers each way":                     withResponse(many(93, 1)),
		"59 KiB and 95 response headers":          withResponse(block(59 * 1024)),
	} {
		t.Run(name, func(t *testing.T) {
			r, err := get(s.URL+"/", h)
			if err != nil {
				t.Fatal(err)
			}
			if r.status != http.StatusOK {
				t.Fatalf("status %d, want 200", r.status)
			}
			if r.version == "" || r.version != r.body {
				t.Fatalf("x-knhk-version %q but served by %q", r.version, r.body)
			}
		})
	}
}
