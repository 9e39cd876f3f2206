package harness

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	funce "github.com/tetratelabs/func-e"
	"github.com/tetratelabs/func-e/api"
)

// Envoy is an Envoy process run through func-e with a local binary.
type Envoy struct {
	AdminPort int
	cancel    context.CancelFunc
	done      chan error
	stopOnce  sync.Once
	stopErr   error
}

// StartEnvoy runs Envoy with the bootstrap file and extra Envoy flags.
// workDir holds func-e's state (logs, admin address file); logs receive
// Envoy's output.
func StartEnvoy(bootstrap string, adminPort int, workDir string, logs io.Writer, extra ...string) (*Envoy, error) {
	bin, err := EnvoyPath()
	if err != nil {
		return nil, err
	}
	home := filepath.Join(workDir, "func-e")
	if err := os.MkdirAll(home, 0o700); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	e := &Envoy{AdminPort: adminPort, cancel: cancel, done: make(chan error, 1)}
	args := []string{"-c", bootstrap, "--log-level", "warn", "--concurrency", "2", "--drain-time-s", "1", "--base-id-path", filepath.Join(home, "base-id")}
	// Envoy's shared-memory base id must differ per instance on one host.
	args = append(args, "--use-dynamic-base-id")
	args = append(args, extra...)
	go func() {
		e.done <- funce.Run(ctx, args,
			api.EnvoyPath(bin), api.HomeDir(home),
			api.Out(logs), api.EnvoyOut(logs), api.EnvoyErr(logs))
	}()
	return e, nil
}

// WaitReady polls Envoy's admin /ready until it answers LIVE.
func (e *Envoy) WaitReady(timeout time.Duration) error {
	url := "http://127.0.0.1:" + strconv.Itoa(e.AdminPort) + "/ready"
	return Poll(timeout, 50*time.Millisecond, func() error {
		select {
		case err := <-e.done:
			e.done <- err
			return errors.Join(errors.New("envoy exited"), err)
		default:
		}
		return HTTPOK(url)
	})
}

// AdminURL returns the admin base URL.
func (e *Envoy) AdminURL() string { return "http://127.0.0.1:" + strconv.Itoa(e.AdminPort) }

// Stop ends Envoy and waits for it; calling it again returns the same result.
func (e *Envoy) Stop() error {
	e.stopOnce.Do(func() {
		e.cancel()
		select {
		case err := <-e.done:
			if err != nil && !errors.Is(err, context.Canceled) {
				e.stopErr = err
			}
		case <-time.After(10 * time.Second):
			e.stopErr = fmt.Errorf("envoy did not stop within 10s")
		}
	})
	return e.stopErr
}
