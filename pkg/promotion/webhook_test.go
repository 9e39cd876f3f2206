package promotion

import (
	"context"
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"
)

func TestWebhookRetriesUntilDelivered(t *testing.T) {
	var calls atomic.Int32
	got := make(chan Decision, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if calls.Add(1) < 3 {
			http.Error(w, "busy", http.StatusServiceUnavailable)
			return
		}
		var d Decision
		_ = json.NewDecoder(r.Body).Decode(&d)
		got <- d
	}))
	defer srv.Close()
	w := NewWebhooks([]WebhookTarget{{URL: srv.URL, Timeout: time.Second}}, slog.New(slog.DiscardHandler))
	w.backoff = time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go w.Run(ctx)
	w.Enqueue(Decision{Decision: "rollback", Reason: "error_rate", Weight: 0})
	select {
	case d := <-got:
		if d.Decision != "rollback" || d.Reason != "error_rate" {
			t.Fatalf("%+v", d)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("not delivered")
	}
	if calls.Load() != 3 {
		t.Fatalf("%d calls, want 3 (two retries)", calls.Load())
	}
}

func TestWebhookNeverBlocks(t *testing.T) {
	w := NewWebhooks([]WebhookTarget{{URL: "http://127.0.0.1:1"}}, slog.New(slog.DiscardHandler))
	dropped := 0
	w.OnDrop = func() { dropped++ }
	done := make(chan struct{})
	go func() {
		for range 1000 { // no Run: nothing drains the queue
			w.Enqueue(Decision{Decision: "hold"})
		}
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Enqueue blocked with a stuck receiver")
	}
	if dropped != 1000-cap(w.queue) {
		t.Fatalf("dropped %d, want %d", dropped, 1000-cap(w.queue))
	}
}
