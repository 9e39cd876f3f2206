package harness

import (
	"os"
	"path/filepath"
	"time"

	"github.com/knhk/knhk/pkg/config"
)

// Signal sends sig to the knhk process: SIGHUP without rewriting the config,
// SIGTERM to time the drain yourself, SIGQUIT for a goroutine dump.
func (k *Knhk) Signal(sig os.Signal) error { return k.cmd.Process.Signal(sig) }

// WaitExit waits up to timeout for the process to exit. exited is false
// when it is still running; exitErr is its exit error otherwise (nil = 0).
func (k *Knhk) WaitExit(timeout time.Duration) (exited bool, exitErr error) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case err := <-k.done:
		k.done <- err // Stop and Kill read it too
		return true, err
	case <-t.C:
		return false, nil
	}
}

// ReplaceConfig writes cfg to the config file through a rename, so a
// reload racing the write reads the old file or the new one, never half.
func (k *Knhk) ReplaceConfig(cfg config.Config) error {
	tmp := filepath.Join(filepath.Dir(k.ConfigPath), "."+filepath.Base(k.ConfigPath)+".next")
	if err := WriteConfig(tmp, cfg); err != nil {
		return err
	}
	return os.Rename(tmp, k.ConfigPath)
}
