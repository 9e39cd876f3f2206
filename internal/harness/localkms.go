package harness

import (
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"time"
)

// LocalKMSInstallHint is printed when the AWS KMS emulator is missing.
const LocalKMSInstallHint = "run `make tools` (it runs: GOBIN=$PWD/.tools/bin go install github.com/nsmithuk/local-kms@v0.0.0-20260228092603-2a5e92d09ab6)"

// LocalKMS is a running local-kms (an AWS KMS emulator).
type LocalKMS struct {
	Endpoint string
	bin, dir string
	port     int
	logs     io.Writer
	cmd      *exec.Cmd
	done     chan error
}

// StartLocalKMS runs local-kms on a free port with its data in dir.
func StartLocalKMS(dir string, logs io.Writer) (*LocalKMS, error) {
	root, err := RepoRoot()
	if err != nil {
		return nil, err
	}
	bin := filepath.Join(root, ".tools", "bin", "local-kms")
	if _, err := os.Stat(bin); err != nil {
		return nil, fmt.Errorf("local-kms not found at %s: %s", bin, LocalKMSInstallHint)
	}
	port, err := FreePort()
	if err != nil {
		return nil, err
	}
	k := &LocalKMS{Endpoint: "http://127.0.0.1:" + strconv.Itoa(port), bin: bin, dir: dir, port: port, logs: logs}
	if err := k.start(); err != nil {
		return nil, err
	}
	return k, nil
}

func (k *LocalKMS) start() error {
	k.done = make(chan error, 1)
	k.cmd = exec.Command(k.bin)
	k.cmd.Env = append(os.Environ(), "PORT="+strconv.Itoa(k.port), "KMS_DATA_PATH="+k.dir, "KMS_REGION=eu-west-1", "KMS_ACCOUNT_ID=111122223333")
	k.cmd.Stdout, k.cmd.Stderr = k.logs, k.logs
	if err := k.cmd.Start(); err != nil {
		return err
	}
	cmd, done := k.cmd, k.done
	go func() { done <- cmd.Wait() }()
	err := Poll(10*time.Second, 20*time.Millisecond, func() error {
		select {
		case err := <-done:
			done <- err
			return fmt.Errorf("local-kms exited: %w", err)
		default:
		}
		c, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(k.port))
		if err != nil {
			return err
		}
		return c.Close()
	})
	if err != nil {
		k.Stop()
	}
	return err
}

// Restart starts local-kms again on the same port and data (its keys
// survive), after Stop.
func (k *LocalKMS) Restart() error { return k.start() }

// Stop ends local-kms.
func (k *LocalKMS) Stop() {
	_ = k.cmd.Process.Kill()
	err := <-k.done
	k.done <- err
}
