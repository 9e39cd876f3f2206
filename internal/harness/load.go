package harness

import (
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	vegeta "github.com/tsenart/vegeta/v12/lib"
)

// Sample is one response seen by a Load.
type Sample struct {
	At      time.Time // when the request was sent
	Code    uint16    // 0 when the request failed at the transport
	Version string    // the upstream that answered (its x-upstream header)
	Receipt string    // x-knhk-receipt, when knhk issued one
	Shed    string    // x-knhk-shed, on a refusal
	Latency time.Duration
}

// Load sends GET requests at a constant rate (open loop) until stopped,
// each with a fresh sticky user id, and keeps every sample.
type Load struct {
	atk     *vegeta.Attacker
	done    chan struct{}
	mu      sync.Mutex
	samples []Sample
}

// StartLoad attacks url at rate req/s. Users are "<prefix>-<n>" for n = 0, 1, …
func StartLoad(url string, rate int, prefix string) *Load {
	var n atomic.Uint64
	targeter := func(t *vegeta.Target) error {
		t.Method = http.MethodGet
		t.URL = url + "/"
		t.Header = http.Header{"X-User-Id": []string{prefix + "-" + strconv.FormatUint(n.Add(1)-1, 10)}}
		return nil
	}
	l := &Load{
		atk:  vegeta.NewAttacker(vegeta.Timeout(5*time.Second), vegeta.KeepAlive(true), vegeta.Workers(16), vegeta.MaxBody(64)),
		done: make(chan struct{}),
	}
	results := l.atk.Attack(targeter, vegeta.Rate{Freq: rate, Per: time.Second}, 0, "load")
	go func() {
		defer close(l.done)
		for r := range results {
			s := Sample{At: r.Timestamp, Code: r.Code, Latency: r.Latency}
			if r.Headers != nil {
				s.Version = r.Headers.Get("x-upstream")
				s.Receipt = r.Headers.Get("x-knhk-receipt")
				s.Shed = r.Headers.Get("x-knhk-shed")
			}
			l.mu.Lock()
			l.samples = append(l.samples, s)
			l.mu.Unlock()
		}
	}()
	return l
}

// Samples returns a copy of the samples so far.
func (l *Load) Samples() []Sample {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]Sample(nil), l.samples...)
}

// Stop ends the attack and returns every sample.
func (l *Load) Stop() []Sample {
	l.atk.Stop()
	<-l.done
	return l.Samples()
}
