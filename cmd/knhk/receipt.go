package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/knhk/knhk/pkg/receipt"
	"github.com/knhk/knhk/pkg/region"
)

// receiptCmd is `knhk receipt verify`.
func receiptCmd(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] != "verify" {
		fmt.Fprintln(stderr, "usage: knhk receipt verify [--keys FILE|URL] [--bundle FILE|URL] [--policy FILE] [--admin HOST:PORT|URL] [--wait DURATION] [TOKEN]")
		return 2
	}
	fs := flag.NewFlagSet("receipt verify", flag.ContinueOnError)
	fs.SetOutput(stderr)
	adminURL(fs)
	keysSrc := fs.String("keys", "", "published keys (GET /v1/keys) as a file or URL; default: the admin URL's")
	bundleSrc := fs.String("bundle", "", "the JSON of GET /v1/receipts/{id} as a file or URL; default: fetched for TOKEN")
	policySrc := fs.String("policy", "", "a witness policy `FILE` (the grammar \"knhk region policy\" prints) that the verifier keeps; "+
		"never fetched: the checkpoint must be signed by one of its log keys, not the published ones, and cosigned to its quorum")
	var wait waitFlag
	fs.Var(&wait, "wait", "how long to keep asking while the receipt is not yet in a signed checkpoint; "+
		"default: one checkpoint interval as the server reports it, plus a second; 0: do not wait")
	if err := fs.Parse(args[1:]); err != nil {
		return 2
	}
	token := strings.TrimSpace(fs.Arg(0))
	var policy *region.WitnessPolicy
	if *policySrc != "" {
		var err error
		if policy, err = loadPolicy(*policySrc); err != nil {
			fmt.Fprintln(stderr, "knhk receipt verify: policy:", err)
			return 1
		}
	}
	if *keysSrc == "" || *bundleSrc == "" {
		base, err := adminFlagBase(fs)
		if err != nil {
			fmt.Fprintln(stderr, "knhk receipt verify:", err)
			return 2
		}
		if *keysSrc == "" {
			*keysSrc = base + "/v1/keys"
		}
		if *bundleSrc == "" {
			if token == "" {
				fmt.Fprintln(stderr, "knhk receipt verify: give a TOKEN or --bundle")
				return 2
			}
			*bundleSrc = base + "/v1/receipts/" + token
		}
	}
	var keys receipt.PublishedKeys
	if err := load(*keysSrc, &keys); err != nil {
		fmt.Fprintln(stderr, "knhk receipt verify: keys:", err)
		return 1
	}
	var b receipt.Bundle
	if err := loadBundle(*bundleSrc, wait, &b, stderr); err != nil {
		fmt.Fprintln(stderr, "knhk receipt verify: receipt:", err)
		return 1
	}
	if token != "" {
		b.Token = token // the client's copy carries its signature (and, kr2, its batch's audit path)
	}
	var instead *receipt.Check // the policy's own answer in the checkpoint check's place
	if policy != nil {
		// The policy is the trust root: the checkpoint is verified with its
		// log keys alone, never with those the origin publishes.
		instead = policyCheckpoint(policy, []byte(b.Checkpoint), &keys)
	}
	checks := receipt.Verify(b, keys)
	if policy != nil && instead == nil && checks[len(checks)-1].Err == nil {
		checks = append(checks, receipt.Check{Name: "policy", Err: policy.Check([]byte(b.Checkpoint))})
	}
	for _, c := range checks {
		if c.Name == "checkpoint" && instead != nil {
			c = *instead
		}
		if c.Err != nil {
			fmt.Fprintf(stdout, "✗ %-11s %v\n", c.Name, c.Err)
			fmt.Fprintf(stderr, "knhk receipt verify: %s check failed\n", c.Name)
			return 1
		}
		if c.Note != "" {
			fmt.Fprintf(stdout, "✓ %-11s %s\n", c.Name, c.Note)
			continue
		}
		fmt.Fprintf(stdout, "✓ %s\n", c.Name)
	}
	fmt.Fprintf(stdout, "receipt %d verified\n", b.Index)
	return 0
}

// maxPolicy bounds a policy file: a few lines per region.
const maxPolicy = 1 << 20

// loadPolicy reads and parses --policy: a file only, since a policy
// fetched from the log it vouches for would vouch for nothing.
func loadPolicy(path string) (*region.WitnessPolicy, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }()
	text, err := io.ReadAll(io.LimitReader(f, maxPolicy+1))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if len(text) > maxPolicy {
		return nil, fmt.Errorf("%s: over %d bytes", path, maxPolicy)
	}
	return region.ParseWitnessPolicy(path, text)
}

// policyCheckpoint opens the checkpoint with the policy's log keys and
// makes the key that signed it the only log key the other checks use, so
// inclusion is proved against a checkpoint the policy vouches for. It
// returns the check to report in the checkpoint check's place when the
// policy does not vouch for it: "policy" for a policy without a log key,
// "checkpoint" for a checkpoint none of its keys signed.
func policyCheckpoint(p *region.WitnessPolicy, checkpoint []byte, keys *receipt.PublishedKeys) *receipt.Check {
	keys.LogVerifierKey, keys.LogVerifierKeys = "", nil
	vc, err := p.OpenCheckpoint(checkpoint)
	switch {
	case errors.Is(err, region.ErrPolicyNoLog):
		return &receipt.Check{Name: "policy", Err: err}
	case err != nil:
		return &receipt.Check{Name: "checkpoint", Err: err}
	}
	keys.LogVerifierKey, keys.LogVerifierKeys = vc.LogKey, []string{vc.LogKey}
	return nil
}

// waitFlag is --wait: unset means "what the server says".
type waitFlag struct {
	d   time.Duration
	set bool
}

func (w *waitFlag) String() string {
	if w == nil || !w.set {
		return ""
	}
	return w.d.String()
}

func (w *waitFlag) Set(s string) error {
	d, err := time.ParseDuration(s)
	if err != nil || d < 0 {
		return fmt.Errorf("want a duration such as 10s, not %q", s)
	}
	w.d, w.set = d, true
	return nil
}

// notIntegrated is the admin API's 404 for a receipt that is logged but
// not yet in a signed checkpoint (internal/server/receipts.go).
type notIntegrated struct {
	Error                     string  `json:"error"`
	RetryAfterSeconds         int     `json:"retry_after_seconds"`
	CheckpointIntervalSeconds float64 `json:"checkpoint_interval_seconds"`
}

// loadBundle is load for the bundle, polling — as Retry-After says — while
// the server answers that the receipt is not yet in a signed checkpoint,
// for up to wait (unset: the server's checkpoint interval and a second for
// the batch and the KMS signature).
func loadBundle(src string, wait waitFlag, b *receipt.Bundle, stderr io.Writer) error {
	if !isURL(src) {
		return load(src, b)
	}
	var deadline time.Time
	var d time.Duration
	for {
		ni, retry, err := fetchBundle(src, b)
		if err != nil || ni == nil {
			return err
		}
		now := time.Now()
		if deadline.IsZero() {
			d = wait.d
			if !wait.set {
				interval := time.Duration(ni.CheckpointIntervalSeconds * float64(time.Second))
				if interval <= 0 {
					interval = retry
				}
				d = interval + time.Second
			}
			deadline = now.Add(d)
			if d > 0 {
				fmt.Fprintf(stderr, "knhk receipt verify: %s; waiting up to %s\n", ni.Error, d.Round(time.Millisecond))
			}
		}
		left := deadline.Sub(now)
		if left <= 0 {
			return fmt.Errorf("%s after waiting %s (the server checkpoints every %gs; a longer --wait may do)",
				ni.Error, d, ni.CheckpointIntervalSeconds)
		}
		time.Sleep(min(retry, left)) // the poll period the server asked for
	}
}

// fetchBundle GETs a bundle. A receipt not yet in a checkpoint is not an
// error: it returns the server's answer and its Retry-After.
func fetchBundle(src string, b *receipt.Bundle) (*notIntegrated, time.Duration, error) {
	resp, err := httpClient.Get(src) //nolint:gosec // the operator's own URL
	if err != nil {
		return nil, 0, err
	}
	defer func() { _ = resp.Body.Close() }()
	retry := resp.Header.Get("Retry-After")
	if resp.StatusCode == http.StatusNotFound && retry != "" {
		secs, err := strconv.Atoi(retry)
		if err != nil || secs < 0 {
			return nil, 0, fmt.Errorf("GET %s: Retry-After %q is not a number of seconds", src, retry)
		}
		var ni notIntegrated
		if err := json.NewDecoder(io.LimitReader(resp.Body, 4096)).Decode(&ni); err != nil || ni.Error == "" {
			ni.Error = "receipt not yet in a signed checkpoint"
		}
		return &ni, max(time.Duration(secs)*time.Second, 100*time.Millisecond), nil
	}
	return nil, 0, decodeResponse(src, resp, b)
}

func isURL(src string) bool {
	return strings.HasPrefix(src, "http://") || strings.HasPrefix(src, "https://")
}

// load reads JSON from a file or an http(s) URL.
func load(src string, v any) error {
	if isURL(src) {
		resp, err := httpClient.Get(src) //nolint:gosec // the operator's own URL
		if err != nil {
			return err
		}
		defer func() { _ = resp.Body.Close() }()
		return decodeResponse(src, resp, v)
	}
	f, err := os.Open(src)
	if err != nil {
		return err
	}
	defer func() { _ = f.Close() }()
	if err := json.NewDecoder(f).Decode(v); err != nil {
		return fmt.Errorf("%s: %w", src, err)
	}
	return nil
}

func decodeResponse(src string, resp *http.Response, v any) error {
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		msg := strings.TrimSpace(string(body))
		var e struct {
			Error string `json:"error"`
		}
		if json.Unmarshal(body, &e) == nil && e.Error != "" {
			msg = e.Error
		}
		return fmt.Errorf("GET %s: %s: %s", src, resp.Status, msg)
	}
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		return fmt.Errorf("%s: %w", src, err)
	}
	return nil
}
