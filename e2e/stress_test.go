package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"math"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/knhk/knhk/internal/harness"
	"github.com/knhk/knhk/internal/server"
	"github.com/knhk/knhk/pkg/config"
)

const (
	stressFor    = 20 * time.Second
	answerWithin = 2 * time.Second // the most any admin call may take
	stressDrain  = 2 * time.Second // drain_timeout
	// adminCallTimeout is longer than answerWithin, so a slow answer is
	// measured rather than cut off, and short enough that a wedged knhk
	// cannot hold the loops long after stressFor.
	adminCallTimeout = 5 * time.Second
	stressRate       = 150 // req/s through Envoy
	// The action loops leave the rollout Progressing for longer than
	// rollout.interval between actions, so the rollout loop's own checks
	// fire too (about 50 of them in a run).
	loopAEvery    = 150 * time.Millisecond
	loopBEvery    = 110 * time.Millisecond
	readerEvery   = 5 * time.Millisecond
	hupEvery      = 50 * time.Millisecond
	stressCheckIn = 100 * time.Millisecond // rollout.interval
)

// TestControlPlaneStress guards against a control plane that wedges (issue
// 10): rollout actions, the rollout loop's own checks, SIGHUP reloads and
// readers of /v1/canary and /v1/rollout once took knhk's locks in a cycle, so
// every admin call hung for good, the rollout loop stopped (a failing canary
// would never be rolled back) and SIGTERM no longer stopped the process. It
// runs that scenario against the real binary, with Envoy and traffic, for
// 20 s, then asserts that every admin call was answered within 2 s, that the
// weight in /v1/rollout, /v1/canary, Envoy's route and the hash split seen
// through Envoy agree, that the rollout loop still runs, and that SIGTERM
// exits within drain_timeout + 2 s.
func TestControlPlaneStress(t *testing.T) {
	s := startStack(t, harness.StackOptions{Weight: 0, Configure: func(c *config.Config) {
		c.Rollout.Steps = []float64{5, 10, 20, 35, 50, 100}
		c.Rollout.Interval = config.Duration(stressCheckIn)
		c.Rollout.Window = config.Duration(time.Second)
		c.Rollout.MinRequests = 5
		c.DrainTimeout = config.Duration(stressDrain)
		c.Log.Level = "warn" // keep the output readable if a goroutine dump is needed
		c.Flags = map[string]config.Flag{"stress-flag": {Default: false}}
		// The stress loads two shared cores on purpose; it judges the
		// control plane, not whether ext_proc answers within 200 ms then.
		c.Envoy.MessageTimeout = config.Duration(time.Second)
	}})
	// Two valid configs a reload alternates between: another idle weight and
	// another flag default, so each reload rebuilds the router and flags.
	variants := [2]config.Config{s.Knhk.Config, s.Knhk.Config}
	variants[0].Canary.Weight, variants[0].Flags = 0, map[string]config.Flag{"stress-flag": {Default: false}}
	variants[1].Canary.Weight, variants[1].Flags = 20, map[string]config.Flag{"stress-flag": {Default: true}}

	admin := &http.Client{Timeout: adminCallTimeout, Transport: &http.Transport{MaxIdleConnsPerHost: 8}}
	rec := newAdminRecorder(admin, s.Knhk.AdminURL())
	load := harness.StartLoad(s.URL, stressRate, "stress")

	ctx, cancel := context.WithTimeout(context.Background(), stressFor)
	defer cancel()
	var wg sync.WaitGroup
	// paced runs step every period until ctx ends; a step in flight at the
	// deadline finishes (at most adminCallTimeout later).
	paced := func(every time.Duration, step func(i int)) {
		wg.Go(func() {
			tk := time.NewTicker(every)
			defer tk.Stop()
			for i := 0; ; i++ {
				select {
				case <-ctx.Done():
					return
				case <-tk.C:
				}
				if ctx.Err() != nil {
					return
				}
				step(i)
			}
		})
	}
	actionsA := []string{"start", "promote", "abort"}
	actionsB := []string{"pause", "resume", "start"}
	paced(loopAEvery, func(i int) { rec.call(http.MethodPost, "/v1/rollout/"+actionsA[i%3]) })
	paced(loopBEvery, func(i int) { rec.call(http.MethodPost, "/v1/rollout/"+actionsB[i%3]) })
	paced(readerEvery, func(int) { rec.call(http.MethodGet, "/v1/canary") })
	paced(readerEvery, func(int) { rec.call(http.MethodGet, "/v1/canary") })
	paced(readerEvery, func(int) { rec.call(http.MethodGet, "/v1/rollout") })
	var hups atomic.Int64
	var hupOnce sync.Once
	var hupErr error // read after wg.Wait
	paced(hupEvery, func(i int) {
		err := s.Knhk.ReplaceConfig(variants[i%2])
		if err == nil {
			err = s.Knhk.Signal(syscall.SIGHUP)
		}
		if err != nil {
			hupOnce.Do(func() { hupErr = err })
			return
		}
		hups.Add(1)
	})
	wg.Wait()
	samples := load.Stop()

	served := 0
	codes := map[uint16]int{}
	for _, x := range samples {
		codes[x.Code]++
		if x.Code == http.StatusOK {
			served++
		}
	}
	t.Logf("traffic: %d requests sent, %d served 200 (by status: %v); %d SIGHUPs sent; admin calls: %d answered, %d unanswered",
		len(samples), served, codes, hups.Load(), rec.answered(), rec.unanswered())
	if hupErr != nil {
		t.Errorf("sending a reload: %v", hupErr)
	}
	if served < len(samples)/2 {
		t.Errorf("only %d of %d requests through Envoy were served 200 (by status: %v)", served, len(samples), codes)
	}
	rec.check(t)
	logStressMetrics(t, admin, s.Knhk.AdminURL())

	if agreed := settleAndAgree(t, s, admin); agreed {
		rolloutLoopRuns(t, s, admin)
	}

	// SIGTERM with Envoy still connected, as in production.
	sent := time.Now()
	if err := s.Knhk.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	exited, exitErr := s.Knhk.WaitExit(stressDrain + 2*time.Second)
	switch {
	case !exited:
		t.Errorf("knhk still running %s after SIGTERM, want an exit within drain_timeout %s + 2s; its goroutine dump (SIGQUIT) is in the knhk output below",
			time.Since(sent).Round(time.Millisecond), stressDrain)
		_ = s.Knhk.Signal(syscall.SIGQUIT)
		if ok, _ := s.Knhk.WaitExit(10 * time.Second); !ok {
			s.Knhk.Kill()
		}
	case exitErr != nil:
		t.Errorf("knhk exited %s after SIGTERM with %v, want exit status 0", time.Since(sent).Round(time.Millisecond), exitErr)
	default:
		t.Logf("SIGTERM → exit 0 in %s", time.Since(sent).Round(time.Millisecond))
	}
}

// settleAndAgree fixes the weight (pause, or already Paused, Promoted or
// RolledBack) and polls until /v1/rollout, /v1/canary and Envoy's route carry
// the same weight; then it checks the hash split through Envoy.
func settleAndAgree(t *testing.T, s *harness.Stack, admin *http.Client) bool {
	t.Helper()
	if code, body, err := adminDo(admin, http.MethodPost, s.Knhk.AdminURL()+"/v1/rollout/pause"); err != nil {
		t.Errorf("POST /v1/rollout/pause after the stress: %v", err)
		return false
	} else if code != http.StatusOK && code != http.StatusConflict {
		t.Errorf("POST /v1/rollout/pause after the stress: %d %s", code, body)
		return false
	}
	var weight float64
	err := harness.Poll(20*time.Second, 100*time.Millisecond, func() error {
		var rv server.RolloutView
		if err := adminJSON(admin, s.Knhk.AdminURL()+"/v1/rollout", &rv); err != nil {
			return err
		}
		if rv.Phase == "Progressing" {
			return fmt.Errorf("rollout still Progressing at %v%% after pause", rv.Weight)
		}
		var cv struct {
			Weight float64 `json:"weight"`
		}
		if err := adminJSON(admin, s.Knhk.AdminURL()+"/v1/canary", &cv); err != nil {
			return err
		}
		envoy := routeWeights(t, s.Envoy)
		want := math.Round(rv.Weight * 100)
		if cv.Weight != rv.Weight || envoy["knhk_canary"] != want || envoy["knhk_stable"] != 10000-want {
			return fmt.Errorf("%s: /v1/rollout %v%%, /v1/canary %v%%, Envoy's route %v (want knhk_canary %v of 10000)",
				rv.Phase, rv.Weight, cv.Weight, envoy, want)
		}
		weight = rv.Weight
		return nil
	})
	if err != nil {
		t.Errorf("weights never agreed after the stress: %v", err)
		return false
	}
	us := users("stress-split", 2000)
	canaryUsers := 0
	for _, v := range userVersions(t, s, us, nil) {
		if v == "canary" {
			canaryUsers++
		}
	}
	share := float64(canaryUsers) / float64(len(us)) * 100
	t.Logf("settled at %v%%: %d of %d users routed to canary through Envoy (%.1f%%)", weight, canaryUsers, len(us), share)
	switch {
	case weight == 0 || weight == 100:
		if share != weight {
			t.Errorf("weight %v%% but %.2f%% of %d users were routed to canary: the hash split disagrees", weight, share, len(us))
		}
	case math.Abs(share-weight) > 6: // ±6 points is over 5 standard deviations at 2000 users
		t.Errorf("weight %v%% but %.1f%% of %d users were routed to canary: the hash split disagrees", weight, share, len(us))
	}
	return true
}

// rolloutLoopRuns restarts the rollout and waits for a decision of the
// rollout loop's own (a hold without traffic): the loop did not wedge.
func rolloutLoopRuns(t *testing.T, s *harness.Stack, admin *http.Client) {
	t.Helper()
	var rv server.RolloutView
	if err := adminJSON(admin, s.Knhk.AdminURL()+"/v1/rollout", &rv); err != nil {
		t.Errorf("GET /v1/rollout: %v", err)
		return
	}
	action := "start"
	if rv.Phase == "Paused" {
		action = "resume"
	}
	from := time.Now()
	if code, body, err := adminDo(admin, http.MethodPost, s.Knhk.AdminURL()+"/v1/rollout/"+action); err != nil || code != http.StatusOK {
		t.Errorf("POST /v1/rollout/%s from %s: %d %s %v", action, rv.Phase, code, body, err)
		return
	}
	err := harness.Poll(10*time.Second, 50*time.Millisecond, func() error {
		if err := adminJSON(admin, s.Knhk.AdminURL()+"/v1/rollout", &rv); err != nil {
			return err
		}
		for _, d := range rv.Decisions {
			if d.Reason != "manual" && d.Time.After(from) {
				return nil
			}
		}
		return fmt.Errorf("no check since %s %s:%s", action, from.Format("15:04:05.000"), decisionLog(rv))
	})
	if err != nil {
		t.Errorf("the rollout loop made no decision after the stress: %v", err)
	}
}

// adminRecorder makes admin calls and keeps, per endpoint, the slowest
// answer, the status codes and the calls that got no answer.
type adminRecorder struct {
	client *http.Client
	base   string
	mu     sync.Mutex
	by     map[string]*endpointStats
}

type endpointStats struct {
	max        time.Duration
	codes      map[int]int
	unanswered int
	firstErr   string
}

func newAdminRecorder(c *http.Client, base string) *adminRecorder {
	return &adminRecorder{client: c, base: base, by: map[string]*endpointStats{}}
}

func (r *adminRecorder) call(method, path string) {
	start := time.Now()
	code, _, err := adminDo(r.client, method, r.base+path)
	took := time.Since(start)
	r.mu.Lock()
	defer r.mu.Unlock()
	key := method + " " + path
	st := r.by[key]
	if st == nil {
		st = &endpointStats{codes: map[int]int{}}
		r.by[key] = st
	}
	st.max = max(st.max, took)
	if err != nil {
		st.unanswered++
		if st.firstErr == "" {
			st.firstErr = err.Error()
		}
		return
	}
	st.codes[code]++
}

func (r *adminRecorder) answered() (n int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, st := range r.by {
		for _, c := range st.codes {
			n += c
		}
	}
	return n
}

func (r *adminRecorder) unanswered() (n int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, st := range r.by {
		n += st.unanswered
	}
	return n
}

// check fails for every endpoint with a call slower than answerWithin, a call
// without an answer, or a status other than 200 (and 409 for an action the
// phase does not allow).
func (r *adminRecorder) check(t *testing.T) {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, key := range slices.Sorted(maps.Keys(r.by)) {
		st := r.by[key]
		t.Logf("%-26s max %-9s statuses %v, unanswered %d", key, st.max.Round(time.Millisecond), st.codes, st.unanswered)
		if st.max > answerWithin {
			t.Errorf("%s: slowest call took %s, want every call answered within %s", key, st.max.Round(time.Millisecond), answerWithin)
		}
		if st.unanswered > 0 {
			t.Errorf("%s: %d calls got no answer; first: %s", key, st.unanswered, st.firstErr)
		}
		for code, n := range st.codes {
			if code != http.StatusOK && (code != http.StatusConflict || !strings.HasPrefix(key, http.MethodPost)) {
				t.Errorf("%s: %d calls answered %d", key, n, code)
			}
		}
	}
}

// adminDo sends an empty request and returns the status and body.
func adminDo(c *http.Client, method, url string) (int, string, error) {
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		return 0, "", err
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

func adminJSON(c *http.Client, url string, v any) error {
	code, body, err := adminDo(c, http.MethodGet, url)
	if err != nil {
		return err
	}
	if code != http.StatusOK {
		return fmt.Errorf("GET %s: %d %s", url, code, body)
	}
	return json.Unmarshal([]byte(body), v)
}

// logStressMetrics logs the reloads knhk applied and the decisions its
// rollout loop took on its own, and fails if none of either happened: the
// stress would then prove less than it claims.
func logStressMetrics(t *testing.T, c *http.Client, adminURL string) {
	t.Helper()
	code, body, err := adminDo(c, http.MethodGet, adminURL+"/metrics")
	if err != nil || code != http.StatusOK {
		t.Errorf("GET /metrics after the stress: %d %v", code, err)
		return
	}
	reloads := map[string]float64{}
	auto := map[string]float64{}
	sc := bufio.NewScanner(strings.NewReader(body))
	for sc.Scan() {
		line := sc.Text()
		name, rest, ok := strings.Cut(line, "{")
		if !ok {
			continue
		}
		labels, value, ok := strings.Cut(rest, "} ")
		if !ok {
			continue
		}
		var v float64
		if _, err := fmt.Sscan(value, &v); err != nil {
			continue
		}
		switch name {
		case "knhk_config_reloads_total":
			reloads[labels] += v
		case "knhk_rollout_decisions_total":
			if !strings.Contains(labels, `reason="manual"`) {
				auto[labels] += v
			}
		}
	}
	t.Logf("reloads applied: %v; the rollout loop's own decisions: %v", reloads, auto)
	if reloads[`result="ok"`] == 0 {
		t.Errorf("no reload was applied (%v): the stress did not exercise reloads", reloads)
	}
	total := 0.0
	for _, v := range auto {
		total += v
	}
	if total == 0 {
		t.Errorf("the rollout loop took no decision of its own during the stress: its checks were not exercised")
	}
}
