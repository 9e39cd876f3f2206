package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/knhk/knhk/internal/server"
	"github.com/knhk/knhk/pkg/config"
)

// loadConfig reads --config (or the embedded defaults) and applies the
// flags that override it.
func loadConfig(path string, override func(*config.Config)) (config.Config, error) {
	cfg := config.Default()
	if path != "" {
		var err error
		if cfg, err = config.Load(path); err != nil {
			return cfg, err
		}
	}
	override(&cfg)
	if err := cfg.Validate(); err != nil {
		if path != "" {
			return cfg, fmt.Errorf("%w (after command-line flags over %s)", err, path)
		}
		return cfg, err
	}
	return cfg, nil
}

func serve(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfgPath := fs.String("config", "", "config file (YAML); embedded loopback defaults when empty")
	dataDir := fs.String("data-dir", "", "state directory (default ./data, or data_dir in the config)")
	grpcAddr := fs.String("grpc-addr", "", "ext_proc/health gRPC listen address (overrides listen.grpc)")
	xdsAddr := fs.String("xds-addr", "", "xDS (ADS) listen address for Envoy (overrides listen.xds)")
	adminAddr := fs.String("admin-addr", "", "admin HTTP listen address (overrides listen.admin)")
	logLevel := fs.String("log-level", "", "debug, info, warn or error (overrides log.level)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	override := func(c *config.Config) {
		if *dataDir != "" {
			c.DataDir = *dataDir
		}
		if *grpcAddr != "" {
			c.Listen.GRPC = *grpcAddr
		}
		if *xdsAddr != "" {
			c.Listen.XDS = *xdsAddr
		}
		if *adminAddr != "" {
			c.Listen.Admin = *adminAddr
		}
		if *logLevel != "" {
			c.Log.Level = *logLevel
		}
	}
	cfg, err := loadConfig(*cfgPath, override)
	if err != nil {
		fmt.Fprintln(stderr, "knhk:", err)
		return 1
	}
	var level slog.Level
	_ = level.UnmarshalText([]byte(cfg.Log.Level))
	log := slog.New(slog.NewJSONHandler(stderr, &slog.HandlerOptions{Level: level}))

	srv, err := server.New(cfg, log)
	if err != nil {
		log.Error("cannot start", "error", err.Error())
		fmt.Fprintln(stderr, "knhk:", err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()

	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer func() { signal.Stop(hup); close(hup) }() // no more signals after Stop: closing is safe
	go func() {
		for range hup {
			if *cfgPath == "" {
				log.Warn("SIGHUP ignored: no --config file to reload")
				continue
			}
			// The server counts and logs every rejected reload, a file that
			// does not load as much as a config it refuses.
			_ = srv.ReloadFrom(func() (config.Config, error) { return loadConfig(*cfgPath, override) })
		}
	}()

	if err := srv.Serve(ctx); err != nil {
		log.Error("serve failed", "error", err.Error())
		return 1
	}
	return 0
}
