package harness

import (
	"fmt"
	"net/http"
	"slices"
	"sync/atomic"
	"time"

	vegeta "github.com/tsenart/vegeta/v12/lib"
)

// ClassTally is what one class got during an overload run.
type ClassTally struct {
	Sent, OK, WithinBudget, Shed429, RetryAfter, Shed503, Other int
	Lat                                                         []time.Duration // of successes
}

func (c *ClassTally) P99() time.Duration {
	if len(c.Lat) == 0 {
		return 0
	}
	s := slices.Clone(c.Lat)
	slices.Sort(s)
	return s[len(s)*99/100]
}

// Budgets are the default class budgets the tallies judge against.
var Budgets = map[string]time.Duration{"R1": 50 * time.Millisecond, "W1": 500 * time.Millisecond, "C1": 24 * time.Hour}

// Overload offers rate req/s for d, 20 % R1 (/r1), 50 % W1 (/w1), 30 % C1
// (/c1), open loop, and tallies per class after a warm-up.
func Overload(url string, rate int, warm, d time.Duration) map[string]*ClassTally {
	var n atomic.Uint64
	paths := []string{"/r1", "/r1", "/w1", "/w1", "/w1", "/w1", "/w1", "/c1", "/c1", "/c1"}
	targeter := func(t *vegeta.Target) error {
		i := n.Add(1)
		t.Method = http.MethodGet
		t.URL = url + paths[(i*7)%10] + "?n=" + fmt.Sprint(i)
		t.Header = http.Header{"X-User-Id": []string{fmt.Sprint("u", i%1000)}}
		return nil
	}
	atk := vegeta.NewAttacker(vegeta.Timeout(10*time.Second), vegeta.KeepAlive(true), vegeta.Workers(64), vegeta.MaxBody(256))
	tally := map[string]*ClassTally{"R1": {}, "W1": {}, "C1": {}}
	start := time.Now()
	for r := range atk.Attack(targeter, vegeta.Rate{Freq: rate, Per: time.Second}, warm+d, "overload") {
		if r.Timestamp.Sub(start) < warm {
			continue
		}
		class := map[string]string{"/r1": "R1", "/w1": "W1", "/c1": "C1"}[r.URL[len(url):len(url)+3]]
		c := tally[class]
		c.Sent++
		switch {
		case r.Code == http.StatusOK:
			c.OK++
			c.Lat = append(c.Lat, r.Latency)
			if r.Latency <= Budgets[class] {
				c.WithinBudget++
			}
		case r.Code == http.StatusTooManyRequests:
			c.Shed429++
			if r.Headers.Get("Retry-After") != "" {
				c.RetryAfter++
			}
		case r.Code == http.StatusServiceUnavailable && r.Headers.Get("x-knhk-shed") == class:
			c.Shed503++
		default:
			c.Other++ // timeouts, Envoy 503/504, transport errors
		}
	}
	return tally
}
