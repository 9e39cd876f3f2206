package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"time"

	"github.com/knhk/knhk/internal/server"
)

const defaultAdmin = "http://127.0.0.1:9090"

func adminURL(fs *flag.FlagSet) *string {
	def := os.Getenv("KNHK_ADMIN")
	if def == "" {
		def = defaultAdmin
	}
	return fs.String("admin", def, "knhk admin URL (or KNHK_ADMIN)")
}

var httpClient = &http.Client{Timeout: 10 * time.Second}

// rolloutAction posts start|promote|pause|resume|abort and prints the state.
func rolloutAction(action string, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet(action, flag.ContinueOnError)
	fs.SetOutput(stderr)
	admin := adminURL(fs)
	if err := fs.Parse(args); err != nil {
		return 2
	}
	// The admin URL is the operator's own flag; calling it is the point.
	resp, err := httpClient.Post(strings.TrimRight(*admin, "/")+"/v1/rollout/"+action, "application/json", nil) //nolint:gosec
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

func fetchRollout(admin string) (server.RolloutView, error) {
	var v server.RolloutView
	resp, err := httpClient.Get(strings.TrimRight(admin, "/") + "/v1/rollout")
	if err != nil {
		return v, err
	}
	defer func() { _ = resp.Body.Close() }()
	if resp.StatusCode != http.StatusOK {
		return v, fmt.Errorf("GET /v1/rollout: %s", resp.Status)
	}
	return v, json.NewDecoder(resp.Body).Decode(&v)
}

// status prints the rollout once, or redraws it every second with --watch.
func status(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	fs.SetOutput(stderr)
	admin := adminURL(fs)
	watch := fs.Bool("watch", false, "redraw every second until Ctrl-C")
	asJSON := fs.Bool("json", false, "print the raw JSON of GET /v1/rollout")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	for {
		v, err := fetchRollout(*admin)
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
	fmt.Fprintf(&b, "rollout  %-11s step %d/%d  weight %s%%\n", v.Phase, v.Step+1, len(v.Steps), trimFloat(v.Weight))
	fmt.Fprintf(&b, "         [%s%s]\n", strings.Repeat("█", filled), strings.Repeat("·", width-filled))
	marks := make([]string, len(v.Steps))
	for i, s := range v.Steps {
		marks[i] = trimFloat(s)
		if i == v.Step && (v.Phase == "Progressing" || v.Phase == "Paused") {
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
	for _, d := range ds {
		fmt.Fprintf(&b, "  %s  %-8s %5s%%  %s\n", d.Time.Local().Format("15:04:05"), d.Decision, trimFloat(d.Weight), d.Detail)
	}
	return b.String()
}
