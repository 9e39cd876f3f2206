package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"math"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/knhk/knhk/internal/receipttest"
	"github.com/knhk/knhk/pkg/receipt"
)

// receiptAdmin serves /v1/keys and /v1/receipts/{id} from a real receipt
// service, answering as the admin API does (404, Retry-After and the
// checkpoint interval while a receipt is not yet in a checkpoint). It
// counts those 404s.
func receiptAdmin(t *testing.T, interval time.Duration) (*receipt.Service, string, *atomic.Int32) {
	t.Helper()
	rs, _ := receipttest.Open(t, interval)
	var notYet atomic.Int32
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/keys", func(w http.ResponseWriter, _ *http.Request) {
		k, _ := rs.Published()
		_ = json.NewEncoder(w).Encode(k)
	})
	mux.HandleFunc("GET /v1/receipts/{id}", func(w http.ResponseWriter, r *http.Request) {
		tok, err := receipt.ParseToken(r.PathValue("id"))
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		b, err := rs.Bundle(r.Context(), tok.ID)
		var ni *receipt.NotIntegratedError
		if errors.As(err, &ni) {
			notYet.Add(1)
			secs := max(1, int(math.Ceil(ni.RetryAfter.Seconds())))
			w.Header().Set("Retry-After", strconv.Itoa(secs))
			w.WriteHeader(http.StatusNotFound)
			_ = json.NewEncoder(w).Encode(notIntegrated{err.Error(), secs, ni.CheckpointInterval.Seconds()})
			return
		}
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		_ = json.NewEncoder(w).Encode(b)
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return rs, srv.URL, &notYet
}

func freshToken(t *testing.T, rs *receipt.Service) string {
	t.Helper()
	r := receipt.Receipt{Time: time.Now().UnixNano(), Method: "GET", Path: "/", Status: 200}
	tok, err := rs.Issue(context.Background(), &r)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// TestReceiptVerifyWaitsForTheCheckpoint: verify run right after the
// request waits (by default one checkpoint interval, as the server
// reports it) until a signed checkpoint covers the receipt, then passes.
func TestReceiptVerifyWaitsForTheCheckpoint(t *testing.T) {
	rs, admin, notYet := receiptAdmin(t, 2*time.Second)
	tok := freshToken(t, rs)
	var out, errb bytes.Buffer
	start := time.Now()
	if code := receiptCmd([]string{"verify", "--admin", admin, tok}, &out, &errb); code != 0 {
		t.Fatalf("exit %d after %s\n%s%s", code, time.Since(start), out.String(), errb.String())
	}
	if notYet.Load() == 0 {
		t.Fatal("the receipt was already in a checkpoint: the test did not exercise waiting")
	}
	if !strings.Contains(out.String(), "verified") || !strings.Contains(errb.String(), "waiting up to") {
		t.Fatalf("stdout %q, stderr %q", out.String(), errb.String())
	}
}

// TestReceiptVerifyWaitBounds: --wait 0 does not wait, and a --wait
// shorter than the checkpoint interval gives up at its end with a reason.
func TestReceiptVerifyWaitBounds(t *testing.T) {
	rs, admin, _ := receiptAdmin(t, 3*time.Second)
	tok := freshToken(t, rs)
	for _, c := range []struct {
		wait string
		max  time.Duration
	}{{"0", 5 * time.Second}, {"300ms", 10 * time.Second}} {
		var out, errb bytes.Buffer
		start := time.Now()
		code := receiptCmd([]string{"verify", "--admin", admin, "--wait", c.wait, tok}, &out, &errb)
		took := time.Since(start)
		if code != 1 || !strings.Contains(errb.String(), "not yet in a signed checkpoint") || !strings.Contains(errb.String(), "--wait") {
			t.Fatalf("--wait %s: exit %d, stderr %q", c.wait, code, errb.String())
		}
		if took > c.max {
			t.Fatalf("--wait %s took %s", c.wait, took)
		}
		if c.wait == "300ms" && took < 300*time.Millisecond {
			t.Fatalf("--wait 300ms gave up after %s", took)
		}
	}
	var errb bytes.Buffer
	if code := receiptCmd([]string{"verify", "--admin", admin, "--wait", "soon", tok}, &bytes.Buffer{}, &errb); code != 2 {
		t.Fatalf("--wait soon: exit %d, %s", code, errb.String())
	}
}
