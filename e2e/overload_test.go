package e2e

import (
	"fmt"
	"io"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/knhk/knhk/internal/harness"
	"github.com/knhk/knhk/pkg/config"
	"github.com/knhk/knhk/pkg/receipt"
)

// TestOverloadAnswersEveryRequestAtOnce offers, open loop through real
// Envoy, far more than knhk sustains with receipts on this machine
// (1,500–2,000 req/s), with envoy.knhk_max_requests at 16 so that Envoy's
// breaker overflows on any machine: every request is answered within the
// contract, and knhk serves every request with its receipt afterwards. It
// checks correctness under overload, not speed (goodput is make bench's).
//
//   - receipts.required (fail-closed), at 6,000 req/s: a 200 with a receipt
//     that parses, or 503 x-knhk-shed: receipt, which Envoy gives itself
//     past the breaker, at once (their median is asserted loosely).
//   - receipts not required (fail-open, the default), at 3,000 req/s: a 200
//     with or without a receipt. Fail-open serves the overflow through
//     Envoy to the upstream, so at 6,000 this would measure Envoy and the
//     test's own upstream (Envoy alone tops out near 6,000 req/s here with
//     nothing else running), not knhk.
//
// Without the bound, requests queue behind knhk: at 3,000 req/s the median
// waited 370 ms and 1 in 11 hit Envoy's message timeout; at 6,000 clients
// gave up after 5 s, and Envoy's knhk circuit breaker never overflowed.
func TestOverloadAnswersEveryRequestAtOnce(t *testing.T) {
	for _, tc := range []struct {
		required bool
		rate     int
	}{{true, 6000}, {false, 3000}} {
		t.Run(fmt.Sprintf("required=%v", tc.required), func(t *testing.T) {
			lg := logs(t)
			s := startStack(t, harness.StackOptions{Weight: 20, FailureModeAllow: !tc.required, Logs: lg, Configure: func(c *config.Config) {
				c.Receipts.Required = tc.required
				c.Envoy.KnhkMaxRequests = 16
			}})
			load := harness.StartLoad(s.URL, tc.rate, "flood")
			time.Sleep(5 * time.Second) // the length of the flood, not a synchronisation
			samples := load.Stop()

			if want := tc.rate * 5 * 9 / 10; len(samples) < want {
				t.Fatalf("the load generator sent %d requests, not the %d of %d req/s for 5 s: the test did not offer the overload", len(samples), want, tc.rate)
			}
			var withReceipt, shed, without int
			var shedLat []time.Duration
			other := map[string]int{}
			lat := make([]time.Duration, 0, len(samples))
			for _, x := range samples {
				lat = append(lat, x.Latency)
				switch {
				case x.Code == http.StatusOK && x.Receipt != "":
					if _, err := receipt.ParseToken(x.Receipt); err != nil {
						t.Fatalf("a 200's receipt does not parse: %v", err)
					}
					withReceipt++
				case x.Code == http.StatusServiceUnavailable && x.Shed == "receipt" && tc.required:
					shed++
					shedLat = append(shedLat, x.Latency)
				case x.Code == http.StatusOK && !tc.required:
					without++
				default: // code 0: the client gave up (5 s) or the connection failed
					other[fmt.Sprintf("%d shed=%q receipt=%v", x.Code, x.Shed, x.Receipt != "")]++
				}
			}
			slices.Sort(lat)
			p99 := lat[len(lat)*99/100]
			overflow := envoyStat(t, s.Envoy.AdminURL(), "cluster.knhk_grpc.upstream_rq_active_overflow")
			t.Logf("%d requests at %d/s: %d with a receipt, %d refused (503 receipt), %d without a receipt; p99 %v; Envoy's knhk circuit breaker overflowed %d times; other %v",
				len(samples), tc.rate, withReceipt, shed, without, p99, overflow, other)
			if len(other) > 0 {
				t.Errorf("answers outside the contract: %v", other)
			}
			if withReceipt == 0 {
				t.Error("no request got a receipt")
			}
			if overflow == 0 {
				t.Error("Envoy never refused a stream to knhk: envoy.knhk_max_requests is not in force")
			}
			// Envoy's refusals do not wait for knhk. The bound is loose: at
			// 6,000 req/s Envoy and the load generator saturate the two cores
			// (one run with a build beside it saw an overall p99 of 2.7 s);
			// a queue behind knhk would put the median near the 200 ms
			// message timeout or the client's 5 s.
			if tc.required {
				slices.Sort(shedLat)
				if len(shedLat) == 0 {
					t.Error("no request was refused at 6,000 req/s")
				} else if m := shedLat[len(shedLat)/2]; m > time.Second {
					t.Errorf("refusals took %v (median): they waited instead of being answered at once", m)
				}
			}

			// Afterwards, every request gets its receipt again.
			err := harness.Poll(30*time.Second, 200*time.Millisecond, func() error {
				for i := range 20 {
					r, err := get(s.URL+"/after", map[string]string{"x-user-id": fmt.Sprint("after-", i)})
					if err != nil {
						return err
					}
					if r.status != http.StatusOK || r.header.Get("x-knhk-receipt") == "" {
						return fmt.Errorf("after the flood: %d, receipt %q", r.status, r.header.Get("x-knhk-receipt"))
					}
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
		})
	}
}

// envoyStat reads one counter from Envoy's admin /stats.
func envoyStat(t *testing.T, adminURL, name string) int {
	t.Helper()
	resp, err := client.Get(adminURL + "/stats?filter=" + url.QueryEscape("^"+regexp.QuoteMeta(name)+"$"))
	if err != nil {
		t.Fatalf("Envoy stats: %v", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("Envoy stats: %v", err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, name+": "); ok {
			n, err := strconv.Atoi(v)
			if err != nil {
				t.Fatalf("Envoy stat %s: %q", name, v)
			}
			return n
		}
	}
	t.Fatalf("Envoy has no stat %s: %s", name, b)
	return 0
}
