package harness

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/knhk/knhk/pkg/config"
)

// Knhk is a `knhk serve` process.
type Knhk struct {
	Config     config.Config
	ConfigPath string
	// HTTP reaches the admin API; with identity configured it must present
	// an SVID allowed on the admin listener (nil: http.DefaultClient).
	HTTP *http.Client
	bin  string
	logs io.Writer
	cmd  *exec.Cmd
	done chan error
}

// WriteConfig writes cfg as YAML to path.
func WriteConfig(path string, cfg config.Config) error {
	b, err := yaml.Marshal(cfg)
	if err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o600)
}

// StartKnhk writes cfg into dir and starts `bin serve --config` on it.
func StartKnhk(bin, dir string, cfg config.Config, logs io.Writer, admin *http.Client) (*Knhk, error) {
	path := filepath.Join(dir, "knhk.yaml")
	if err := WriteConfig(path, cfg); err != nil {
		return nil, err
	}
	k := &Knhk{Config: cfg, ConfigPath: path, HTTP: admin, bin: bin, logs: logs}
	return k, k.start()
}

func (k *Knhk) start() error {
	k.done = make(chan error, 1)
	k.cmd = exec.Command(k.bin, "serve", "--config", k.ConfigPath)
	k.cmd.Stdout, k.cmd.Stderr = k.logs, k.logs
	if err := k.cmd.Start(); err != nil {
		return fmt.Errorf("start knhk: %w", err)
	}
	cmd, done := k.cmd, k.done
	go func() { done <- cmd.Wait() }()
	return nil
}

// Restart stops knhk (SIGTERM, or SIGKILL when hard) and starts it again on
// the same config and data directory, waiting until it is ready.
func (k *Knhk) Restart(hard bool) error {
	if hard {
		k.Kill()
	} else if err := k.Stop(10 * time.Second); err != nil {
		return err
	}
	if err := k.start(); err != nil {
		return err
	}
	return k.WaitReady(20 * time.Second)
}

// AdminURL returns the admin base URL.
func (k *Knhk) AdminURL() string {
	if k.Config.Identity.Enabled() {
		return "https://" + k.Config.Listen.Admin
	}
	return "http://" + k.Config.Listen.Admin
}

// Get fetches an admin API path and fails on a non-2xx answer.
func (k *Knhk) Get(path string) ([]byte, error) {
	c := k.HTTP
	if c == nil {
		c = http.DefaultClient
	}
	resp, err := c.Get(k.AdminURL() + path)
	if err != nil {
		return nil, err
	}
	defer func() { _ = resp.Body.Close() }()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode/100 != 2 {
		return b, fmt.Errorf("GET %s: %s: %s", path, resp.Status, bytes.TrimSpace(b))
	}
	return b, nil
}

// WaitReady polls /readyz.
func (k *Knhk) WaitReady(timeout time.Duration) error {
	return Poll(timeout, 25*time.Millisecond, func() error {
		select {
		case err := <-k.done:
			k.done <- err
			return fmt.Errorf("knhk exited: %w", err)
		default:
		}
		_, err := k.Get("/readyz")
		return err
	})
}

// Reload rewrites the config file and sends SIGHUP.
func (k *Knhk) Reload(cfg config.Config) error {
	if err := WriteConfig(k.ConfigPath, cfg); err != nil {
		return err
	}
	k.Config = cfg
	return k.cmd.Process.Signal(syscall.SIGHUP)
}

// Stop sends SIGTERM and waits; it returns the exit error (nil = exit 0).
func (k *Knhk) Stop(timeout time.Duration) error {
	if k.cmd.ProcessState != nil {
		return nil
	}
	_ = k.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-k.done:
		k.done <- err
		return err
	case <-time.After(timeout):
		_ = k.cmd.Process.Kill()
		return fmt.Errorf("knhk did not exit within %s of SIGTERM", timeout)
	}
}

// Kill ends the process at once (SIGKILL).
func (k *Knhk) Kill() {
	_ = k.cmd.Process.Kill()
	err := <-k.done
	k.done <- err
}

// EnvoyConfig runs `bin envoy-config --config cfgPath` and writes the
// bootstrap to out.
func EnvoyConfig(bin, cfgPath, out string, extra ...string) error {
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(bin, append([]string{"envoy-config", "--config", cfgPath}, extra...)...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("knhk envoy-config: %w: %s", err, stderr.String())
	}
	return os.WriteFile(out, stdout.Bytes(), 0o600)
}
