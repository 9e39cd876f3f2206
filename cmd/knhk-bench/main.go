// Command knhk-bench is `make bench`'s load part: open-loop, constant-rate
// load (vegeta as a library) through a real Envoy, in one run, for Envoy
// alone, Envoy + a no-op Go ext_proc server, and Envoy + knhk. It prints
// p50/p99 at a fixed rate (rounds interleaved, median of rounds), the
// highest sustained rate of each, and the ratios the targets are set on;
// then a capacity sweep (sweep.go) that adds knhk as shipped, with receipts.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"

	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"github.com/knhk/knhk/extproc"
	"github.com/knhk/knhk/internal/harness"
	"github.com/knhk/knhk/pkg/config"
)

func main() {
	if len(os.Args) > 2 && os.Args[1] == "noop-server" {
		if err := noopServer(os.Args[2]); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		return
	}
	rate := flag.Int("rate", 1000, "fixed request rate (req/s) for the latency comparison")
	dur := flag.Duration("duration", 8*time.Second, "length of each fixed-rate round")
	rounds := flag.Int("rounds", 3, "interleaved rounds per setup (the median is reported)")
	maxRates := flag.String("max-rates", "1000,2000,3000,4000,5000,6000,8000", "rates tried when searching the highest sustained rate")
	sweepRates := flag.String("sweep-rates", "500,1000,1500,2000,3000,4000,6000,8000", "rising rates of the capacity sweep (each setup stops past 4× its highest sustained rate)")
	step := flag.Duration("step", 4*time.Second, "length of each step of the sustained-rate search and of the capacity sweep")
	only := flag.String("only", "", "run one part: "+strings.Join(partNames, ", ")+" (default: all)")
	runs := flag.Int("runs", 20, "runs for the rollback and false-rollback benchmarks")
	flag.Parse()
	// Parsed before anything runs, so a typo fails at once.
	searchRates, sweep := parseRates("max-rates", *maxRates), parseRates("sweep-rates", *sweepRates)
	latency := func() error { return run(*rate, *dur, *rounds, searchRates, *step) }
	capacity := func(bin, work string, logs *harness.LogBuffer) error {
		return capacitySweep(bin, work, logs, sweep, *step)
	}
	if err := runAll(*only, *runs, latency, capacity); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// parseRates parses the comma-separated rates of --name, which must rise.
func parseRates(name, s string) []int {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n <= 0 {
			fmt.Fprintf(os.Stderr, "bench: --%s: %q is not a positive integer\n", name, f)
			os.Exit(2)
		}
		if len(out) > 0 && n <= out[len(out)-1] {
			fmt.Fprintf(os.Stderr, "bench: --%s: %d does not rise above %d\n", name, n, out[len(out)-1])
			os.Exit(2)
		}
		out = append(out, n)
	}
	return out
}

// partNames are the parts of a run, in the order they run.
var partNames = []string{"latency", "capacity", "rollback", "false-rollbacks", "xds", "overload", "receipts", "mtls", "regions"}

// runAll runs the latency comparison, the capacity sweep and the rollout
// benchmarks.
func runAll(only string, runs int, latency func() error, capacity func(bin, work string, logs *harness.LogBuffer) error) error {
	root, err := harness.RepoRoot()
	if err != nil {
		return err
	}
	bin := filepath.Join(root, "bin")
	work, err := os.MkdirTemp("", "knhk-bench-rollout")
	if err != nil {
		return err
	}
	defer func() { _ = os.RemoveAll(work) }()
	logs := &harness.LogBuffer{}
	parts := []struct {
		name string
		f    func() error
	}{
		{"latency", latency},
		{"capacity", func() error { return capacity(bin, work, logs) }},
		{"rollback", func() error { return rollbackReaction(bin, work, logs, runs) }},
		{"false-rollbacks", func() error { return falseRollbacks(bin, work, logs, runs) }},
		{"xds", func() error { return xdsPropagation(bin, work, logs, 100) }},
		{"overload", func() error { return overloadBench(bin, work, logs) }},
		{"receipts", func() error { return receiptsBench(bin, work, logs) }},
		{"mtls", func() error { return mtlsBench(bin, work, logs) }},
		{"regions", func() error { return regionsBench(bin, work, logs) }},
	}
	ran := false
	for _, p := range parts {
		if only != "" && only != p.name {
			continue
		}
		ran = true
		if err := p.f(); err != nil {
			fmt.Fprintln(os.Stderr, logs.String())
			return fmt.Errorf("%s: %w", p.name, err)
		}
	}
	if !ran {
		return fmt.Errorf("--only %q: want one of %s", only, strings.Join(partNames, ", "))
	}
	return nil
}

// noopServer runs the no-op ext_proc server in its own process, as knhk
// runs in its own, so both pay the same process and scheduling costs.
func noopServer(addr string) error {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	g := grpc.NewServer(extproc.GRPCServerOptions()...)
	extprocv3.RegisterExternalProcessorServer(g, noop{})
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	go func() { <-ctx.Done(); g.Stop() }()
	return g.Serve(l)
}

// startNoop starts the no-op ext_proc server (this binary's noop-server
// mode) on a free loopback address.
func startNoop(logs *harness.LogBuffer) (*exec.Cmd, string, error) {
	addr, err := freeAddr()
	if err != nil {
		return nil, "", err
	}
	self, err := os.Executable()
	if err != nil {
		return nil, "", err
	}
	cmd := exec.Command(self, "noop-server", addr)
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		return nil, "", fmt.Errorf("start the no-op ext_proc server: %w", err)
	}
	return cmd, addr, nil
}

func stopNoop(cmd *exec.Cmd) { _ = cmd.Process.Signal(syscall.SIGTERM); _ = cmd.Wait() }

// machineLine names the machine and date, which every figure depends on.
func machineLine() string {
	return fmt.Sprintf("machine: %s/%s, %d CPUs, %s; Envoy 1.40.0; %s", runtime.GOOS, runtime.GOARCH, runtime.NumCPU(), cpuModel(), time.Now().UTC().Format("2006-01-02"))
}

type setup struct {
	name string
	url  string
}

func run(rate int, dur time.Duration, rounds int, maxRates []int, step time.Duration) error {
	root, err := harness.RepoRoot()
	if err != nil {
		return err
	}
	bin := filepath.Join(root, "bin")
	work, err := os.MkdirTemp("", "knhk-bench")
	if err != nil {
		return err
	}
	defer func() { _ = os.RemoveAll(work) }()
	logs := &harness.LogBuffer{}
	defer func() {
		if err != nil {
			fmt.Fprintln(os.Stderr, logs.String())
		}
	}()

	up, err := harness.StartUpstream("stable")
	if err != nil {
		return err
	}
	defer up.Close()

	// knhk: the real binary with a real config, upstreams both pointing at
	// the same server so only the ext_proc work differs between setups.
	knhkStack, err := harness.StartStack(harness.StackOptions{
		BinDir: bin, Dir: filepath.Join(work, "knhk"), Weight: 20, FailureModeAllow: false, Logs: logs,
		StableAddr: up.Addr, CanaryAddr: up.Addr,
		// The routing step alone, as the no-op server does; `--only
		// receipts` measures what receipts add.
		Configure: func(c *config.Config) { c.Receipts.Enabled = false },
	})
	if err != nil {
		return err
	}
	defer func() { _ = knhkStack.Close() }()

	// Envoy alone and Envoy + no-op share knhk's config, re-pointed.
	noop, noopAddr, err := startNoop(logs)
	if err != nil {
		return err
	}
	defer stopNoop(noop)

	noopURL, noopEnvoy, err := extraEnvoy(bin, work, "noop", knhkStack, noopAddr, false, logs)
	if err != nil {
		return err
	}
	defer func() { _ = noopEnvoy.Stop() }()
	aloneURL, aloneEnvoy, err := extraEnvoy(bin, work, "alone", knhkStack, noopAddr, true, logs)
	if err != nil {
		return err
	}
	defer func() { _ = aloneEnvoy.Stop() }()

	setups := []setup{{"Envoy alone", aloneURL}, {"Envoy + no-op ext_proc", noopURL}, {"Envoy + knhk", knhkStack.URL}}
	fmt.Printf("%s\n\n", machineLine())

	// Warm up every path (connections, ext_proc streams, JIT-free but caches).
	for _, s := range setups {
		attack(s.url, rate/2, 2*time.Second)
	}

	fmt.Printf("fixed rate %d req/s, %s per round, %d interleaved rounds (median of rounds)\n", rate, dur, rounds)
	res := map[string][]result{}
	for r := range rounds {
		for _, s := range setups {
			x := attack(s.url, rate, dur)
			res[s.name] = append(res[s.name], x)
			fmt.Printf("  round %d %-24s p50 %8s  p99 %8s  success %.2f%%\n", r+1, s.name, ms(x.p50), ms(x.p99), x.success*100)
		}
	}
	med := map[string]result{}
	for _, s := range setups {
		med[s.name] = median(res[s.name])
	}

	fmt.Printf("\nhighest sustained rate (achieved ≥ 97%% of offered, ≥ 99.9%% success, p99 < 50 ms), %s steps\n", step)
	sustained := map[string]int{}
	for _, s := range setups {
		settle(s.url)
		best := 0
		for _, r := range maxRates {
			x := attack(s.url, r, step)
			ok := x.throughput >= 0.97*float64(r) && x.success >= 0.999 && x.p99 < 50*time.Millisecond
			fmt.Printf("  %-24s %6d req/s → %7.0f req/s, p99 %8s, success %.2f%% %s\n", s.name, r, x.throughput, ms(x.p99), x.success*100, mark(ok))
			if !ok {
				break
			}
			best = r
		}
		sustained[s.name] = best
	}

	alone, nop, knhk := med[setups[0].name], med[setups[1].name], med[setups[2].name]
	fmt.Printf("\n| setup | p50 | p99 | added p50 | added p99 | highest sustained rate |\n|---|---|---|---|---|---|\n")
	for _, s := range setups {
		m := med[s.name]
		fmt.Printf("| %s | %s | %s | %s | %s | %d req/s |\n", s.name, ms(m.p50), ms(m.p99), ms(m.p50-alone.p50), ms(m.p99-alone.p99), sustained[s.name])
	}
	addedKnhk, addedNoop := knhk.p99-alone.p99, nop.p99-alone.p99
	fmt.Printf("\nknhk ÷ no-op:        p50 %.2f×, p99 %.2f×, added p99 %.2f× (target ≤ 1.2×)\n",
		ratio(knhk.p50, nop.p50), ratio(knhk.p99, nop.p99), ratio(addedKnhk, addedNoop))
	fmt.Printf("knhk ÷ Envoy alone:  p50 %.2f×, p99 %.2f×, sustained rate %.2f×\n",
		ratio(knhk.p50, alone.p50), ratio(knhk.p99, alone.p99), float64(sustained[setups[2].name])/float64(max(1, sustained[setups[0].name])))
	return nil
}

// settle waits until a light load sees a quiet p99 again, so the backlog an
// overloaded step leaves (queued requests, open connections) does not count
// against the next setup.
func settle(url string) {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if x := attack(url, 200, time.Second); x.success == 1 && x.p99 < 5*time.Millisecond {
			return
		}
	}
}

func mark(ok bool) string {
	if ok {
		return "ok"
	}
	return "✗"
}

// extraEnvoy starts another Envoy for knhk's config with the ext_proc
// cluster pointed at addr (or no ext_proc at all).
func extraEnvoy(bin, work, name string, s *harness.Stack, extprocAddr string, alone bool, logs *harness.LogBuffer, flags ...string) (string, *harness.Envoy, error) {
	ports, err := harness.FreePorts(2)
	if err != nil {
		return "", nil, err
	}
	cfg := s.Knhk.Config
	cfg.Envoy.KnhkAddress = extprocAddr
	cfg.Envoy.ListenerPort, cfg.Envoy.AdminPort = ports[0], ports[1]
	dir := filepath.Join(work, name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", nil, err
	}
	p := filepath.Join(dir, "knhk.yaml")
	if err := harness.WriteConfig(p, cfg); err != nil {
		return "", nil, err
	}
	extra := flags
	if alone {
		extra = append(extra, "--baseline-without-knhk")
	}
	e, err := harness.StartEnvoyFor(bin, dir, "envoy", p, ports[1], logs, extra...)
	if err != nil {
		return "", nil, err
	}
	return "http://127.0.0.1:" + strconv.Itoa(ports[0]), e, nil
}

func freeAddr() (string, error) {
	p, err := harness.FreePort()
	return "127.0.0.1:" + strconv.Itoa(p), err
}

func ms(d time.Duration) string { return fmt.Sprintf("%.3fms", float64(d)/1e6) }

func ratio(a, b time.Duration) float64 {
	if b <= 0 {
		return 0
	}
	return float64(a) / float64(b)
}

func median(rs []result) result {
	pick := func(f func(result) time.Duration) time.Duration {
		v := make([]time.Duration, len(rs))
		for i, r := range rs {
			v[i] = f(r)
		}
		slices.Sort(v)
		return v[len(v)/2]
	}
	worst := 1.0
	for _, r := range rs {
		worst = min(worst, r.success)
	}
	// Success is the worst round's: a failure in any round must show.
	return result{p50: pick(func(r result) time.Duration { return r.p50 }), p99: pick(func(r result) time.Duration { return r.p99 }), success: worst}
}

func cpuModel() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "unknown CPU"
	}
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown CPU"
}
