package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"strings"

	"github.com/knhk/knhk/pkg/capacity"
)

// capacityCmd prints GET /v1/capacity as a table, or raw with --json.
func capacityCmd(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("capacity", flag.ContinueOnError)
	fs.SetOutput(stderr)
	adminURL(fs)
	asJSON := fs.Bool("json", false, "print the raw JSON of GET /v1/capacity")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	base, err := adminFlagBase(fs)
	if err != nil {
		fmt.Fprintln(stderr, "knhk capacity:", err)
		return 2
	}
	body, err := adminGet(base, "/v1/capacity", 64<<20)
	if err != nil {
		fmt.Fprintln(stderr, "knhk capacity:", err)
		return 1
	}
	if *asJSON {
		_, _ = stdout.Write(body)
		return 0
	}
	var r struct {
		capacity.Report
		Key string `json:"key"`
	}
	if err := json.Unmarshal(body, &r); err != nil {
		fmt.Fprintln(stderr, "knhk capacity: bad answer:", err)
		return 1
	}
	fmt.Fprint(stdout, renderCapacity(r.Report, r.Key))
	return 0
}

func renderCapacity(r capacity.Report, key string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "working set (key: %s)\n  distinct keys   %d (HyperLogLog, ±0.8 %%)\n  requests seen   %d\n\n", key, r.DistinctKeys, r.References)
	b.WriteString("cache size for a hit rate (LRU, SHARDS)\n")
	for _, c := range r.CacheSizes {
		if c.Reachable {
			fmt.Fprintf(&b, "  %3.0f %%   %10.0f keys\n", c.HitRate*100, c.Keys)
		} else {
			fmt.Fprintf(&b, "  %3.0f %%   not reachable (too many one-off keys)\n", c.HitRate*100)
		}
	}
	b.WriteString("\nhot keys\n")
	for _, h := range r.HotKeys {
		fmt.Fprintf(&b, "  %10d  %s\n", h.Count, h.Key)
	}
	l := r.Load
	fmt.Fprintf(&b, "\nload\n  now %.0f req/s, average %.0f req/s over %.0f s", l.CurrentRPS, l.AverageRPS, l.WindowSeconds)
	if l.WindowSeconds >= 30 {
		fmt.Fprintf(&b, ", trend %+.1f req/s per minute, forecast in 1 h: %.0f req/s\n", l.TrendPerMin, l.ForecastRPS1h)
	} else {
		b.WriteString(" (a trend needs 30 s of history)\n")
	}
	fmt.Fprintf(&b, "\n%-6s %12s %12s %12s %14s\n", "class", "offered/s", "admitted/s", "latency ms", "concurrency")
	for _, c := range r.Classes {
		fmt.Fprintf(&b, "%-6s %12.1f %12.1f %12.1f %14.1f\n", c.Class, c.OfferedRPS, c.AdmittedRPS, c.MeanLatencyMs, c.ConcurrencyNeeded)
	}
	cn := r.Concurrency
	fmt.Fprintf(&b, "\nconcurrency needed %.1f, upstream limit %.1f over %d replica(s)", cn.Needed, cn.Limit, cn.Replicas)
	if cn.RecommendedReplicas > 0 {
		fmt.Fprintf(&b, " → recommended replicas: %d", cn.RecommendedReplicas)
	}
	b.WriteString("\n\nrecommendations\n")
	for _, s := range r.Recommendations {
		fmt.Fprintf(&b, "  • %s\n", s)
	}
	return b.String()
}
