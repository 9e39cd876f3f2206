package harness

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"time"
)

// ToxiproxyInstallHint says how to get the binary the region tests need.
const ToxiproxyInstallHint = "run `make tools` (it builds toxiproxy-server v2.5.0 from tools/toxiproxy/go.mod into .tools/bin)"

// Toxiproxy is a real toxiproxy-server process, driven through its HTTP API.
type Toxiproxy struct {
	api string
	cmd *exec.Cmd
}

// StartToxiproxy runs .tools/bin/toxiproxy-server on a free loopback port.
func StartToxiproxy(logs io.Writer) (*Toxiproxy, error) {
	root, err := RepoRoot()
	if err != nil {
		return nil, err
	}
	bin := filepath.Join(root, ".tools", "bin", "toxiproxy-server")
	if _, err := os.Stat(bin); err != nil {
		return nil, fmt.Errorf("toxiproxy-server: %w; %s", err, ToxiproxyInstallHint)
	}
	port, err := FreePort()
	if err != nil {
		return nil, err
	}
	t := &Toxiproxy{api: "http://127.0.0.1:" + strconv.Itoa(port)}
	t.cmd = exec.Command(bin, "-host", "127.0.0.1", "-port", strconv.Itoa(port))
	t.cmd.Stdout, t.cmd.Stderr = logs, logs
	t.cmd.Env = append(os.Environ(), "LOG_LEVEL=error") // its info and trace lines would bury knhk's
	if err := t.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start toxiproxy-server: %w", err)
	}
	if err := Poll(10*time.Second, 20*time.Millisecond, func() error { return HTTPOK(t.api + "/version") }); err != nil {
		t.Close()
		return nil, fmt.Errorf("toxiproxy-server not up: %w", err)
	}
	return t, nil
}

// Close stops the server.
func (t *Toxiproxy) Close() {
	_ = t.cmd.Process.Kill()
	_ = t.cmd.Wait()
}

func (t *Toxiproxy) post(path string, body any, want int) error {
	b, err := json.Marshal(body)
	if err != nil {
		return err
	}
	resp, err := http.Post(t.api+path, "application/json", bytes.NewReader(b))
	if err != nil {
		return err
	}
	defer func() { _ = resp.Body.Close() }()
	out, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != want {
		return fmt.Errorf("toxiproxy POST %s: %s: %s", path, resp.Status, bytes.TrimSpace(out))
	}
	return nil
}

// Proxy forwards listen to upstream until disabled.
func (t *Toxiproxy) Proxy(name, listen, upstream string) error {
	return t.post("/proxies", map[string]any{"name": name, "listen": listen, "upstream": upstream, "enabled": true}, http.StatusCreated)
}

// SetEnabled cuts (false: existing connections are closed and new ones
// refused) or restores a proxy: a partition.
func (t *Toxiproxy) SetEnabled(name string, on bool) error {
	return t.post("/proxies/"+name, map[string]any{"enabled": on}, http.StatusOK)
}

// Latency adds latency (and jitter) to a proxy's traffic both ways.
func (t *Toxiproxy) Latency(name string, latency, jitter time.Duration) error {
	for _, stream := range []string{"upstream", "downstream"} {
		if err := t.post("/proxies/"+name+"/toxics", map[string]any{
			"name": "latency-" + stream, "type": "latency", "stream": stream,
			"attributes": map[string]any{"latency": latency.Milliseconds(), "jitter": jitter.Milliseconds()},
		}, http.StatusOK); err != nil {
			return err
		}
	}
	return nil
}

// Bandwidth limits a proxy's traffic to kbps KB/s both ways.
func (t *Toxiproxy) Bandwidth(name string, kbps int) error {
	for _, stream := range []string{"upstream", "downstream"} {
		if err := t.post("/proxies/"+name+"/toxics", map[string]any{
			"name": "bandwidth-" + stream, "type": "bandwidth", "stream": stream,
			"attributes": map[string]any{"rate": kbps},
		}, http.StatusOK); err != nil {
			return err
		}
	}
	return nil
}

// Clear removes every toxic from a proxy.
func (t *Toxiproxy) Clear(name string) error {
	for _, toxic := range []string{"latency-upstream", "latency-downstream", "bandwidth-upstream", "bandwidth-downstream"} {
		req, err := http.NewRequest(http.MethodDelete, t.api+"/proxies/"+name+"/toxics/"+toxic, nil)
		if err != nil {
			return err
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return err
		}
		_ = resp.Body.Close()
		if resp.StatusCode != http.StatusNoContent && resp.StatusCode != http.StatusNotFound {
			return fmt.Errorf("toxiproxy DELETE toxic %s of %s: %s", toxic, name, resp.Status)
		}
	}
	return nil
}
