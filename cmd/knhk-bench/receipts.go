package main

import (
	"fmt"
	"path/filepath"
	"time"

	"github.com/knhk/knhk/internal/harness"
	"github.com/knhk/knhk/pkg/config"
)

// receiptsBench: through real Envoy, knhk with receipts against knhk
// without, at a fixed rate (interleaved rounds), and the KMS call rate at a
// low and a high request rate.
func receiptsBench(bin, work string, logs *harness.LogBuffer) error {
	mk := func(name string, on bool) (*harness.Stack, error) {
		return harness.StartStack(harness.StackOptions{BinDir: bin, Dir: filepath.Join(work, name), Weight: 20,
			FailureModeAllow: true, Logs: logs, Configure: func(c *config.Config) { c.Receipts.Enabled = on }})
	}
	off, err := mk("receipts-off", false)
	if err != nil {
		return err
	}
	defer func() { _ = off.Close() }()
	on, err := mk("receipts-on", true)
	if err != nil {
		return err
	}
	defer func() { _ = on.Close() }()

	const rate = 500
	fmt.Printf("\nreceipts: %d req/s, 3 interleaved rounds of 8 s (median)\n", rate)
	a, b := abRounds(off.URL, on.URL, rate)
	fmt.Printf("| setup | p50 | p99 |\n|---|---|---|\n| knhk, receipts off | %s | %s |\n| knhk, receipts on | %s | %s |\n",
		ms(a.p50), ms(a.p99), ms(b.p50), ms(b.p99))
	fmt.Printf("added by receipts: p50 %s, p99 %s\n", ms(b.p50-a.p50), ms(b.p99-a.p99))

	calls := func() float64 {
		var v float64
		_ = harness.Poll(5*time.Second, 50*time.Millisecond, func() error {
			var err error
			v, err = promValue(on.Knhk.AdminURL(), "knhk_kms_sign_calls_total")
			return err
		})
		return v
	}
	for _, r := range []int{100, 1500, 5000} {
		before := calls()
		x := attack(on.URL, r, 20*time.Second)
		after := calls()
		fmt.Printf("KMS calls at %d req/s offered (%.0f achieved): %.0f in 20 s = %.2f/s\n", r, x.throughput, after-before, (after-before)/20)
	}
	return nil
}

// abRounds warms both setups, then runs 3 interleaved 8 s rounds of each at
// rate and returns the medians: the comparison of two setups in one run.
func abRounds(a, b string, rate int) (result, result) {
	attack(a, rate/2, 2*time.Second)
	attack(b, rate/2, 2*time.Second)
	var ra, rb []result
	for range 3 {
		ra = append(ra, attack(a, rate, 8*time.Second))
		rb = append(rb, attack(b, rate, 8*time.Second))
	}
	return median(ra), median(rb)
}
