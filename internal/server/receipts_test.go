package server

import (
	"context"
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/knhk/knhk/internal/receipttest"
	"github.com/knhk/knhk/pkg/receipt"
)

// receiptServer is a Server with only receipts, on a local key in a fresh
// directory.
func receiptServer(t *testing.T, interval time.Duration) (*Server, string) {
	t.Helper()
	rs, dir := receipttest.Open(t, interval)
	return &Server{log: slog.New(slog.DiscardHandler), reg: prometheus.NewRegistry(), receipts: rs}, dir
}

func issueReceipts(t *testing.T, rs *receipt.Service, n int) []string {
	t.Helper()
	toks := make([]string, n)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Go(func() {
			r := receipt.Receipt{Time: time.Now().UnixNano(), Method: "GET", Path: "/" + strconv.Itoa(i), Status: 200}
			tok, err := rs.Issue(context.Background(), &r)
			if err != nil {
				errs <- err
			}
			toks[i] = tok
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	return toks
}

func get(h http.HandlerFunc, target string, pathValues ...string) *httptest.ResponseRecorder {
	req := httptest.NewRequest(http.MethodGet, target, nil)
	for i := 0; i+1 < len(pathValues); i += 2 {
		req.SetPathValue(pathValues[i], pathValues[i+1])
	}
	w := httptest.NewRecorder()
	h(w, req)
	return w
}

// TestConsistencyStatuses: proofs between sizes off any batch boundary are
// served; bad sizes are 400; a server failure is a 500 whose message
// names no file.
func TestConsistencyStatuses(t *testing.T) {
	s, dir := receiptServer(t, 100*time.Millisecond)
	toks := issueReceipts(t, s.receipts, 90)
	deadline := time.Now().Add(10 * time.Second)
	for _, tok := range toks {
		for {
			w := get(s.handleReceipt, "/v1/receipts/x", "id", tok)
			if w.Code == http.StatusOK {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("receipt not integrated: %d %s", w.Code, w.Body)
			}
			time.Sleep(20 * time.Millisecond) // poll period
		}
	}
	for q, want := range map[string]int{
		"from=1&to=2":    http.StatusOK,
		"from=64&to=80":  http.StatusOK,
		"from=0&to=90":   http.StatusOK,
		"from=89&to=90":  http.StatusOK,
		"from=2&to=1":    http.StatusBadRequest,
		"from=1&to=9999": http.StatusBadRequest,
		"from=x&to=2":    http.StatusBadRequest,
		"to=2":           http.StatusBadRequest,
	} {
		w := get(s.handleConsistency, "/v1/consistency?"+q)
		if w.Code != want {
			t.Errorf("%s: %d %s, want %d", q, w.Code, w.Body, want)
		}
	}
	// The tiles go missing: the server's failure, not the client's.
	if err := os.RemoveAll(filepath.Join(dir, "receipts", "log", "tile")); err != nil {
		t.Fatal(err)
	}
	w := get(s.handleConsistency, "/v1/consistency?from=1&to=2")
	if w.Code != http.StatusInternalServerError {
		t.Fatalf("missing tiles: %d %s, want 500", w.Code, w.Body)
	}
	if strings.Contains(w.Body.String(), dir) || strings.Contains(w.Body.String(), "tile") {
		t.Fatalf("the API message leaks a server path: %s", w.Body)
	}
}

// TestRetryAfterMatchesCheckpointInterval: a receipt not yet in a signed
// checkpoint gets a Retry-After that is the time to the checkpoint that
// covers it, not a fixed second, and the receipt is there by then.
func TestRetryAfterMatchesCheckpointInterval(t *testing.T) {
	const interval = 3 * time.Second
	s, _ := receiptServer(t, interval)
	tok := issueReceipts(t, s.receipts, 1)[0]
	start := time.Now()
	w := get(s.handleReceipt, "/v1/receipts/x", "id", tok)
	if w.Code != http.StatusNotFound {
		t.Fatalf("fresh receipt: %d %s, want 404", w.Code, w.Body)
	}
	ra, err := strconv.Atoi(w.Header().Get("Retry-After"))
	if err != nil || ra < 2 || ra > 4 {
		t.Fatalf("Retry-After %q with a %s checkpoint interval, want about 3", w.Header().Get("Retry-After"), interval)
	}
	var body struct {
		RetryAfter int     `json:"retry_after_seconds"`
		Interval   float64 `json:"checkpoint_interval_seconds"`
	}
	if err := json.Unmarshal(w.Body.Bytes(), &body); err != nil || body.RetryAfter != ra || body.Interval != interval.Seconds() {
		t.Fatalf("404 body %s: %v", w.Body, err)
	}
	// By Retry-After (and a margin for a loaded machine) it is in.
	deadline := start.Add(time.Duration(ra)*time.Second + 3*time.Second)
	for {
		w := get(s.handleReceipt, "/v1/receipts/x", "id", tok)
		if w.Code == http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("receipt still not in a checkpoint %s after Retry-After %ds: %d %s", time.Since(start), ra, w.Code, w.Body)
		}
		time.Sleep(50 * time.Millisecond) // poll period
	}
}

func TestRetryAfterSeconds(t *testing.T) {
	for d, want := range map[time.Duration]int{0: 1, -time.Second: 1, time.Millisecond: 1, time.Second: 1,
		1001 * time.Millisecond: 2, 5 * time.Second: 5, 5*time.Second + 50*time.Millisecond: 6} {
		if got := retryAfterSeconds(d); got != want {
			t.Errorf("retryAfterSeconds(%s) = %d, want %d", d, got, want)
		}
	}
}

// TestReceiptHealthExported: the index flush counter is on /metrics and a
// healthy service is not degraded; with receipts off nothing is.
func TestReceiptHealthExported(t *testing.T) {
	s, _ := receiptServer(t, 100*time.Millisecond)
	s.registerReceiptMetrics()
	mfs, err := s.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, mf := range mfs {
		if mf.GetName() == "knhk_receipt_index_flush_errors_total" {
			found = len(mf.GetMetric()) == 1 && mf.GetMetric()[0].GetCounter().GetValue() == 0
		}
	}
	if !found {
		t.Fatal("knhk_receipt_index_flush_errors_total is not exported as a counter at 0")
	}
	if failed, degraded := s.receiptsHealth(); failed != "" || degraded != "" {
		t.Fatalf("healthy receipts: failed %q, degraded %q", failed, degraded)
	}
	off := &Server{log: slog.New(slog.DiscardHandler), reg: prometheus.NewRegistry()}
	off.registerReceiptMetrics()
	if failed, degraded := off.receiptsHealth(); failed != "" || degraded != "" {
		t.Fatalf("receipts off: failed %q, degraded %q", failed, degraded)
	}
}
