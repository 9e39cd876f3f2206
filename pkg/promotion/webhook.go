package promotion

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"time"
)

// Webhooks POSTs every decision as JSON to each URL. Delivery runs on its
// own goroutine with retries and backoff; a slow or down receiver never
// blocks the rollout (when the queue is full the oldest undelivered
// decision is dropped and counted).
type Webhooks struct {
	targets  []WebhookTarget
	queue    chan Decision
	client   *http.Client
	log      *slog.Logger
	attempts int
	backoff  time.Duration
	OnResult func(url string, ok bool) // metrics hook; may be nil
	OnDrop   func()
}

// WebhookTarget is one receiver.
type WebhookTarget struct {
	URL     string
	Timeout time.Duration
}

// NewWebhooks returns a notifier; call Run to deliver.
func NewWebhooks(targets []WebhookTarget, log *slog.Logger) *Webhooks {
	return &Webhooks{targets: targets, queue: make(chan Decision, 256), client: &http.Client{},
		log: log, attempts: 5, backoff: 200 * time.Millisecond}
}

// Enqueue schedules d for delivery without blocking.
func (w *Webhooks) Enqueue(d Decision) {
	if len(w.targets) == 0 {
		return
	}
	for {
		select {
		case w.queue <- d:
			return
		default:
			select { // full: drop the oldest, keep the newest
			case <-w.queue:
				if w.OnDrop != nil {
					w.OnDrop()
				}
			default:
			}
		}
	}
}

// Run delivers until ctx ends.
func (w *Webhooks) Run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case d := <-w.queue:
			body, err := json.Marshal(d)
			if err != nil {
				continue
			}
			for _, t := range w.targets {
				w.deliver(ctx, t, body)
			}
		}
	}
}

func (w *Webhooks) deliver(ctx context.Context, t WebhookTarget, body []byte) {
	timeout := t.Timeout
	if timeout <= 0 {
		timeout = 2 * time.Second
	}
	wait := w.backoff
	var last error
	for attempt := 1; attempt <= w.attempts; attempt++ {
		last = w.post(ctx, t.URL, timeout, body)
		if last == nil {
			if w.OnResult != nil {
				w.OnResult(t.URL, true)
			}
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		wait = min(wait*2, 5*time.Second)
	}
	if w.OnResult != nil {
		w.OnResult(t.URL, false)
	}
	w.log.Warn("rollout webhook failed", "url", t.URL, "attempts", w.attempts, "error", last.Error())
}

func (w *Webhooks) post(ctx context.Context, url string, timeout time.Duration, body []byte) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := w.client.Do(req)
	if err != nil {
		return err
	}
	_ = resp.Body.Close()
	if resp.StatusCode >= 300 {
		return fmt.Errorf("status %s", resp.Status)
	}
	return nil
}
