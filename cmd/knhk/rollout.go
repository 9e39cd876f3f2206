package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/knhk/knhk/internal/server"
	"github.com/knhk/knhk/pkg/promotion"
)

const defaultAdmin = "http://127.0.0.1:9090"

// adminURL registers --admin, defaulting to KNHK_ADMIN, then the contract's
// loopback address. Read it with adminFlagBase after Parse.
func adminURL(fs *flag.FlagSet) {
	def := os.Getenv("KNHK_ADMIN")
	if def == "" {
		def = defaultAdmin
	}
	fs.String("admin", def, "knhk admin API: host:port or an http(s):// URL (or KNHK_ADMIN)")
}

// adminFlagBase is adminBase over the parsed --admin of fs; an error names
// where the bad value came from (--admin or KNHK_ADMIN).
func adminFlagBase(fs *flag.FlagSet) (string, error) {
	src := "--admin"
	set := false
	fs.Visit(func(f *flag.Flag) { set = set || f.Name == "admin" })
	if !set && os.Getenv("KNHK_ADMIN") != "" {
		src = "KNHK_ADMIN"
	}
	base, err := adminBase(fs.Lookup("admin").Value.String())
	if err != nil {
		return "", fmt.Errorf("%s %w", src, err)
	}
	return base, nil
}

// adminBase turns an --admin / KNHK_ADMIN value into the base URL of the
// admin API, without a trailing slash. host:port means http://host:port, the
// form listen.admin is written in; http:// and https:// URLs are kept, a path
// prefix too (a proxy in front of knhk).
func adminBase(raw string) (string, error) {
	raw = strings.TrimSpace(raw)
	const want = "want host:port or an http:// or https:// URL"
	if raw == "" {
		return "", fmt.Errorf("is empty: %s", want)
	}
	if !strings.Contains(raw, "://") {
		host, port, err := net.SplitHostPort(raw)
		if err != nil {
			return "", fmt.Errorf("%q: %s", raw, want)
		}
		if err := checkPort(raw, port); err != nil {
			return "", err
		}
		if host == "" { // ":9090", as in a listen address: this machine
			host = "127.0.0.1"
		}
		return "http://" + net.JoinHostPort(host, port), nil
	}
	u, err := url.Parse(raw)
	if err != nil {
		return "", fmt.Errorf("%q: %s", raw, want)
	}
	switch {
	case u.Scheme != "http" && u.Scheme != "https":
		return "", fmt.Errorf("%q: scheme must be http or https", raw)
	case u.Host == "" || u.Hostname() == "":
		return "", fmt.Errorf("%q: no host: %s", raw, want)
	case u.RawQuery != "" || u.Fragment != "":
		return "", fmt.Errorf("%q: no query or fragment: the commands add the path", raw)
	}
	if p := u.Port(); p != "" {
		if err := checkPort(raw, p); err != nil {
			return "", err
		}
	}
	u.Path = strings.TrimRight(u.Path, "/")
	u.RawPath = ""
	return u.String(), nil
}

func checkPort(raw, port string) error {
	if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
		return fmt.Errorf("%q: port must be 1..65535", raw)
	}
	return nil
}

var httpClient = &http.Client{Timeout: 10 * time.Second}

// adminCall sends one request to the admin API at base. When the API cannot
// be reached, the error says where it looked and how to point elsewhere.
// adminGet reads an admin API page: its body on 200, else an error
// carrying the status and the body.
func adminGet(base, path string, limit int64) ([]byte, error) {
	resp, err := adminCall(http.MethodGet, base, path)
	if err != nil {
		return nil, err
	}
	defer func() { _ = resp.Body.Close() }()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, limit))
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("HTTP %d: %s", resp.StatusCode, body)
	}
	return body, nil
}

func adminCall(method, base, path string) (*http.Response, error) {
	// The admin URL is the operator's own flag; calling it is the point.
	req, err := http.NewRequest(method, base+path, nil) //nolint:gosec
	if err != nil {
		return nil, err
	}
	if method == http.MethodPost {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := httpClient.Do(req) //nolint:gosec
	if err != nil {
		return nil, unreachable(base, err)
	}
	return resp, nil
}

// unreachable explains a failed call to the admin API at base: the cause
// without Go's request dump, and what to check.
func unreachable(base string, err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err
	}
	reason := err.Error()
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		reason = "connection refused"
	case errors.As(err, &ne) && ne.Timeout():
		reason = fmt.Sprintf("no answer within %s", httpClient.Timeout)
	}
	return fmt.Errorf("cannot reach the admin API at %s: %s (is knhk running? set --admin or KNHK_ADMIN)", base, reason)
}

// rolloutAction posts start|promote|pause|resume|abort and prints the state.
func rolloutAction(action string, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet(action, flag.ContinueOnError)
	fs.SetOutput(stderr)
	adminURL(fs)
	if err := fs.Parse(args); err != nil {
		return 2
	}
	base, err := adminFlagBase(fs)
	if err != nil {
		fmt.Fprintf(stderr, "knhk %s: %v\n", action, err)
		return 2
	}
	resp, err := adminCall(http.MethodPost, base, "/v1/rollout/"+action)
	if err != nil {
		fmt.Fprintf(stderr, "knhk %s: %v\n", action, err)
		return 1
	}
	defer func() { _ = resp.Body.Close() }()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		var e struct{ Error string }
		if json.Unmarshal(body, &e) == nil && e.Error != "" {
			fmt.Fprintf(stderr, "knhk %s: %s (HTTP %d)\n", action, e.Error, resp.StatusCode)
		} else {
			fmt.Fprintf(stderr, "knhk %s: HTTP %d: %s\n", action, resp.StatusCode, body)
		}
		return 1
	}
	var v server.RolloutView
	if err := json.Unmarshal(body, &v); err != nil {
		fmt.Fprintf(stderr, "knhk %s: bad answer: %v\n", action, err)
		return 1
	}
	fmt.Fprintf(stdout, "%s: %s at %s%%\n", action, v.Phase, trimFloat(v.Weight))
	return 0
}

func fetchRollout(base string) (server.RolloutView, error) {
	var v server.RolloutView
	resp, err := adminCall(http.MethodGet, base, "/v1/rollout")
	if err != nil {
		return v, err
	}
	defer func() { _ = resp.Body.Close() }()
	if resp.StatusCode != http.StatusOK {
		return v, fmt.Errorf("GET /v1/rollout: %s", resp.Status)
	}
	if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
		return v, fmt.Errorf("GET /v1/rollout: bad answer: %w", err)
	}
	if v.Decisions == nil { // an empty log is a list, for scripts reading --json
		v.Decisions = []promotion.Decision{}
	}
	return v, nil
}

// status prints the rollout once, or redraws it every second with --watch.
func status(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	fs.SetOutput(stderr)
	adminURL(fs)
	watch := fs.Bool("watch", false, "redraw every second until Ctrl-C")
	asJSON := fs.Bool("json", false, "print the raw JSON of GET /v1/rollout")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	base, err := adminFlagBase(fs)
	if err != nil {
		fmt.Fprintln(stderr, "knhk status:", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	for {
		v, err := fetchRollout(base)
		if err != nil {
			fmt.Fprintln(stderr, "knhk status:", err)
			if !*watch {
				return 1
			}
		} else if *asJSON {
			b, _ := json.MarshalIndent(v, "", "  ")
			fmt.Fprintln(stdout, string(b))
		} else {
			if *watch {
				fmt.Fprint(stdout, "\033[H\033[2J") // clear screen
			}
			fmt.Fprint(stdout, renderStatus(v))
		}
		if !*watch {
			return 0
		}
		select {
		case <-ctx.Done():
			return 0
		case <-time.After(time.Second):
		}
	}
}

func trimFloat(f float64) string {
	s := fmt.Sprintf("%.2f", f)
	s = strings.TrimRight(strings.TrimRight(s, "0"), ".")
	return s
}

// renderStatus is the human view: stage, weight bar, live figures, log.
func renderStatus(v server.RolloutView) string {
	var b strings.Builder
	const width = 40
	filled := int(v.Weight / 100 * width)
	// A step exists only while a rollout runs; Idle, Promoted and RolledBack
	// have none.
	step := ""
	if inRollout(v.Phase) {
		step = fmt.Sprintf("step %d/%d  ", v.Step+1, len(v.Steps))
	}
	fmt.Fprintf(&b, "rollout  %-11s %sweight %s%%\n", v.Phase, step, trimFloat(v.Weight))
	fmt.Fprintf(&b, "         [%s%s]\n", strings.Repeat("█", filled), strings.Repeat("·", width-filled))
	marks := make([]string, len(v.Steps))
	for i, s := range v.Steps {
		marks[i] = trimFloat(s)
		if i == v.Step && inRollout(v.Phase) {
			marks[i] = "[" + marks[i] + "]"
		}
	}
	fmt.Fprintf(&b, "steps    %s\n\n", strings.Join(marks, " → "))
	fmt.Fprintf(&b, "last %.0fs   %10s %10s %10s\n", v.WindowSec, "requests", "errors", "p99")
	for _, name := range []string{"stable", "canary"} {
		st := v.Window[name]
		fmt.Fprintf(&b, "%-9s %10d %9.2f%% %8.1fms\n", name, st.Requests, st.ErrorRate()*100, st.P99Ms)
	}
	if v.Failures > 0 {
		fmt.Fprintf(&b, "\nconsecutive failed checks: %d\n", v.Failures)
	}
	if v.XDSNack != nil {
		fmt.Fprintf(&b, "\nENVOY REJECTED xDS version %s: %s\n", v.XDSNack.Version, v.XDSNack.Error)
	}
	b.WriteString("\ndecisions (newest last)\n")
	ds := v.Decisions
	if len(ds) > 10 {
		ds = ds[len(ds)-10:]
	}
	if len(ds) == 0 {
		b.WriteString("  (none yet)\n")
	}
	for _, d := range ds {
		fmt.Fprintf(&b, "  %s  %-8s %5s%%  %s\n", d.Time.Local().Format("15:04:05"), d.Decision, trimFloat(d.Weight), d.Detail)
	}
	return b.String()
}

func inRollout(p promotion.Phase) bool {
	return p == promotion.Progressing || p == promotion.Paused
}
