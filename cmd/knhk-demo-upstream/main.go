// Command knhk-demo-upstream is a tiny HTTP service for demos and tests: it
// answers every request with its own name, so the version that served a
// request is visible end to end. Faults (an error rate, added latency) can
// be set by flag or at runtime, to show a rollback:
//
//	curl -X POST '127.0.0.1:8002/fault?error_rate=0.3&latency=50ms'
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/knhk/knhk/internal/upstream"
)

func main() {
	name := flag.String("name", "stable", "name returned in the body and the x-upstream header")
	addr := flag.String("addr", "127.0.0.1:8001", "listen address")
	errRate := flag.Float64("error-rate", 0, "fraction of requests answered 503, 0..1")
	latency := flag.Duration("latency", 0, "latency added to every response")
	flag.Parse()
	log := slog.New(slog.NewJSONHandler(os.Stderr, nil))

	u := upstream.New(*name)
	if err := u.SetFault(*errRate, *latency); err != nil {
		fmt.Fprintln(os.Stderr, "knhk-demo-upstream:", err)
		os.Exit(2)
	}
	srv := &http.Server{Addr: *addr, Handler: u, ReadHeaderTimeout: 5 * time.Second}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	log.Info("demo upstream listening", "name", *name, "addr", *addr, "error_rate", *errRate, "latency", latency.String())
	if err := srv.ListenAndServe(); !errors.Is(err, http.ErrServerClosed) {
		log.Error("listen", "error", err.Error())
		os.Exit(1)
	}
}
