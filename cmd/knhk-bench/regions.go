package main

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/knhk/knhk/internal/harness"
	"github.com/knhk/knhk/pkg/config"
)

// regionsBench: three regions on 127.0.0.1/.2/.3 that witness and mirror
// each other through Toxiproxy, beside one knhk with receipts and no
// regions, in the same run: the latency and CPU regions add, the time
// from a checkpoint to its quorum and the bytes between regions at a high
// rate, and how fast a peer catches up after a 60 s partition.
func regionsBench(bin, work string, logs *harness.LogBuffer) error {
	const interval = 500 * time.Millisecond
	off, err := harness.StartStack(harness.StackOptions{BinDir: bin, Dir: filepath.Join(work, "regions-off"), Weight: 20, FailureModeAllow: true, Logs: logs,
		Configure: func(c *config.Config) {
			c.Receipts.Enabled, c.Receipts.CheckpointInterval = true, config.Duration(interval)
		}})
	if err != nil {
		return err
	}
	defer func() { _ = off.Close() }()
	rs, err := harness.StartRegions(harness.RegionsOptions{BinDir: bin, Dir: filepath.Join(work, "regions"), Logs: logs, Quorum: 2,
		Names: []string{"us-east", "eu-west", "ap-south"}, IPs: []string{"127.0.0.1", "127.0.0.2", "127.0.0.3"},
		Configure: func(c *config.Config) { c.Receipts.CheckpointInterval = config.Duration(interval) }})
	if err != nil {
		return err
	}
	defer rs.Close()
	origin, eu := rs.List[0], rs.List[1]
	on := origin.Stack

	const rate = 500
	fmt.Printf("\nregions: three regions (quorum 2, each mirroring the others) against receipts without regions; checkpoints every %v\n", interval)
	a, b := abRounds(off.URL, on.URL, rate)
	fmt.Printf("%d req/s, 3 interleaved rounds of 8 s (median)\n| setup | p50 | p99 |\n|---|---|---|\n| receipts, no regions | %s | %s |\n| receipts, 3 regions | %s | %s |\n",
		rate, ms(a.p50), ms(a.p99), ms(b.p50), ms(b.p99))
	fmt.Printf("added by regions: p50 %s, p99 %s\n", ms(b.p50-a.p50), ms(b.p99-a.p99))
	for _, s := range []struct {
		name string
		url  string
		pids []int
	}{{"no regions", off.URL, []int{off.Knhk.Pid()}}, {"3 regions", on.URL, []int{origin.Knhk.Pid(), eu.Knhk.Pid(), rs.List[2].Knhk.Pid()}}} {
		before := make([]float64, len(s.pids))
		for i, p := range s.pids {
			if before[i], err = cpuSeconds(p); err != nil {
				return err
			}
		}
		x := attack(s.url, rate, 8*time.Second)
		var cells []string
		for i, p := range s.pids {
			after, err := cpuSeconds(p)
			if err != nil {
				return err
			}
			cells = append(cells, us(time.Duration((after-before[i])/float64(x.sent)*1e9)))
		}
		fmt.Printf("CPU per request at %d req/s, %s: %s (the origin first, then each peer)\n", rate, s.name, strings.Join(cells, ", "))
	}

	const high = 2000
	hist0, err := delayBuckets(origin.Knhk.AdminURL())
	if err != nil {
		return err
	}
	bytes0, err := wireBytes(origin.Knhk.AdminURL())
	if err != nil {
		return err
	}
	x := attack(on.URL, high, 20*time.Second)
	// Until the step's last checkpoint has reached its quorum.
	err = harness.Poll(30*time.Second, 50*time.Millisecond, func() error {
		lag, err := promValue(origin.Knhk.AdminURL(), "knhk_region_durable_lag_entries")
		if err == nil && lag > 0 {
			err = fmt.Errorf("%.0f receipts not yet durable", lag)
		}
		return err
	})
	if err != nil {
		return err
	}
	hist1, err := delayBuckets(origin.Knhk.AdminURL())
	if err != nil {
		return err
	}
	bytes1, err := wireBytes(origin.Knhk.AdminURL())
	if err != nil {
		return err
	}
	receipts := x.throughput * 20
	d := subtract(hist1, hist0)
	fmt.Printf("at %d req/s offered (%.0f served): checkpoint to quorum p50 %s, p99 %s (%0.f checkpoints; from the origin's knhk_region_quorum_delay_seconds)\n",
		high, x.throughput, secs(quantile(d, 0.5)), secs(quantile(d, 0.99)), d[len(d)-1].n)
	fmt.Printf("bytes on the wire per receipt, the origin to its two peers: %.0f sent, %.0f received (TLS-less loopback; HTTP, witness and mirror pushes included; knhk_region_wire_bytes_total)\n",
		(bytes1["sent"]-bytes0["sent"])/receipts, (bytes1["received"]-bytes0["received"])/receipts)

	// 60 s partition of eu-west under load, then catch-up.
	const partRate = 1000
	load := harness.StartLoad(on.URL, partRate, "partition")
	if err := rs.SetLinks(eu, false, rs.List[0], rs.List[2]); err != nil {
		return err
	}
	time.Sleep(60 * time.Second) // the partition's length is the measurement
	size, err := promValue(origin.Knhk.AdminURL(), "knhk_region_checkpoint_size")
	if err != nil {
		return err
	}
	held0, err := mirrorHeld(eu.Knhk, origin.Config.Receipts.Origin)
	if err != nil {
		return err
	}
	if err := rs.SetLinks(eu, true, rs.List[0], rs.List[2]); err != nil {
		return err
	}
	healed := time.Now()
	err = harness.Poll(5*time.Minute, 100*time.Millisecond, func() error {
		n, err := mirrorHeld(eu.Knhk, origin.Config.Receipts.Origin)
		if err != nil {
			return err
		}
		if float64(n) < size {
			return fmt.Errorf("eu-west's mirror holds %d of %.0f", n, size)
		}
		return nil
	})
	took := time.Since(healed)
	load.Stop()
	if err != nil {
		return err
	}
	behind := size - float64(held0)
	fmt.Printf("after a 60 s partition at %d req/s: eu-west was %.0f entries behind and caught up in %s with the load still on (%.0f entries/s)\n",
		partRate, behind, took.Round(100*time.Millisecond), behind/took.Seconds())
	return nil
}

func secs(s float64) string { return fmt.Sprintf("%.0f ms", s*1000) }

func mirrorHeld(k *harness.Knhk, origin string) (uint64, error) {
	var ml struct {
		Logs []struct {
			Origin string `json:"origin"`
			Size   uint64 `json:"size"`
		} `json:"logs"`
	}
	if err := getJSON(k.AdminURL()+"/v1/region/mirror", &ml); err != nil {
		return 0, err
	}
	for _, l := range ml.Logs {
		if l.Origin == origin {
			return l.Size, nil
		}
	}
	return 0, nil
}

// bucket is a cumulative histogram bucket.
type bucket struct {
	le, n float64
}

// scrape returns the lines of admin's /metrics that start with prefix,
// without it.
func scrape(admin, prefix string) ([]string, error) {
	resp, err := http.Get(admin + "/metrics")
	if err != nil {
		return nil, err
	}
	defer func() { _ = resp.Body.Close() }()
	var out []string
	sc := bufio.NewScanner(io.LimitReader(resp.Body, 16<<20))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), prefix); ok {
			out = append(out, rest)
		}
	}
	return out, sc.Err()
}

// delayBuckets reads knhk_region_quorum_delay_seconds's buckets.
func delayBuckets(admin string) ([]bucket, error) {
	lines, err := scrape(admin, `knhk_region_quorum_delay_seconds_bucket{le="`)
	if err != nil {
		return nil, err
	}
	var out []bucket
	for _, rest := range lines {
		le, v, _ := strings.Cut(rest, `"} `)
		l, err1 := strconv.ParseFloat(le, 64)
		n, err2 := strconv.ParseFloat(v, 64)
		if err1 != nil || err2 != nil {
			continue
		}
		out = append(out, bucket{l, n})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].le < out[j].le })
	if len(out) == 0 {
		return nil, fmt.Errorf("%s/metrics: no knhk_region_quorum_delay_seconds", admin)
	}
	return out, nil
}

func subtract(a, b []bucket) []bucket {
	out := make([]bucket, len(a))
	for i := range a {
		out[i] = bucket{a[i].le, a[i].n - b[i].n}
	}
	return out
}

// quantile interpolates within the bucket holding q, as Prometheus's
// histogram_quantile does.
func quantile(bs []bucket, q float64) float64 {
	total := bs[len(bs)-1].n
	if total == 0 {
		return 0
	}
	rank, lo, prev := q*total, 0.0, 0.0
	for _, b := range bs {
		if b.n >= rank {
			if b.n == prev {
				return b.le
			}
			if b.le > 1e300 { // +Inf: the last finite bound
				return lo
			}
			return lo + (b.le-lo)*(rank-prev)/(b.n-prev)
		}
		lo, prev = b.le, b.n
	}
	return lo
}

// wireBytes sums knhk_region_wire_bytes_total by direction.
func wireBytes(admin string) (map[string]float64, error) {
	lines, err := scrape(admin, "knhk_region_wire_bytes_total{")
	if err != nil {
		return nil, err
	}
	out := map[string]float64{}
	for _, rest := range lines {
		labels, v, _ := strings.Cut(rest, "} ")
		n, err := strconv.ParseFloat(v, 64)
		if err != nil {
			continue
		}
		for _, dir := range []string{"sent", "received"} {
			if strings.Contains(labels, `direction="`+dir+`"`) {
				out[dir] += n
			}
		}
	}
	return out, nil
}
