package main

import (
	"net/http"
	"slices"
	"strconv"
	"sync/atomic"
	"time"

	vegeta "github.com/tsenart/vegeta/v12/lib"
)

// result is one attack's figures, with exact percentiles from every latency.
type result struct {
	p50, p99   time.Duration
	success    float64 // fraction 0..1
	throughput float64 // successful req/s
	sent       uint64  // requests sent
	good       uint64  // 200s answered within goodBudget
}

// goodBudget is the latency within which a 200 counts as goodput.
const goodBudget = 50 * time.Millisecond

// attack sends GET url at a constant rate (open loop: vegeta paces requests
// regardless of responses) from rotating sticky users.
func attack(url string, rate int, dur time.Duration) result {
	var n atomic.Uint64
	targeter := func(t *vegeta.Target) error {
		t.Method = http.MethodGet
		t.URL = url + "/"
		t.Header = http.Header{"X-User-Id": []string{"user-" + strconv.FormatUint(n.Add(1)%5000, 10)}}
		return nil
	}
	atk := vegeta.NewAttacker(vegeta.Timeout(5*time.Second), vegeta.KeepAlive(true), vegeta.Workers(32), vegeta.Connections(256))
	var m vegeta.Metrics
	var good uint64
	lat := make([]time.Duration, 0, int(float64(rate)*dur.Seconds())+16)
	for r := range atk.Attack(targeter, vegeta.Rate{Freq: rate, Per: time.Second}, dur, "bench") {
		m.Add(r)
		lat = append(lat, r.Latency)
		if r.Code == http.StatusOK && r.Latency <= goodBudget {
			good++
		}
	}
	m.Close()
	slices.Sort(lat)
	q := func(p float64) time.Duration {
		if len(lat) == 0 {
			return 0
		}
		return lat[min(len(lat)-1, int(p*float64(len(lat))))]
	}
	return result{p50: q(0.50), p99: q(0.99), success: m.Success, throughput: m.Throughput, sent: m.Requests, good: good}
}
