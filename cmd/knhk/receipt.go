package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"

	"github.com/knhk/knhk/pkg/receipt"
)

// receiptCmd is `knhk receipt verify`.
func receiptCmd(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] != "verify" {
		fmt.Fprintln(stderr, "usage: knhk receipt verify [--keys FILE|URL] [--bundle FILE|URL] [--admin URL] [TOKEN]")
		return 2
	}
	fs := flag.NewFlagSet("receipt verify", flag.ContinueOnError)
	fs.SetOutput(stderr)
	admin := adminURL(fs)
	keysSrc := fs.String("keys", "", "published keys (GET /v1/keys) as a file or URL; default: the admin URL's")
	bundleSrc := fs.String("bundle", "", "the JSON of GET /v1/receipts/{id} as a file or URL; default: fetched for TOKEN")
	if err := fs.Parse(args[1:]); err != nil {
		return 2
	}
	token := strings.TrimSpace(fs.Arg(0))
	base := strings.TrimRight(*admin, "/")
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
	var keys receipt.PublishedKeys
	if err := load(*keysSrc, &keys); err != nil {
		fmt.Fprintln(stderr, "knhk receipt verify: keys:", err)
		return 1
	}
	var b receipt.Bundle
	if err := load(*bundleSrc, &b); err != nil {
		fmt.Fprintln(stderr, "knhk receipt verify: receipt:", err)
		return 1
	}
	if token != "" {
		b.Token = token // the client's copy carries the inline signature
	}
	checks := receipt.Verify(b, keys)
	for _, c := range checks {
		if c.Err != nil {
			fmt.Fprintf(stdout, "✗ %-11s %v\n", c.Name, c.Err)
			fmt.Fprintf(stderr, "knhk receipt verify: %s check failed\n", c.Name)
			return 1
		}
		fmt.Fprintf(stdout, "✓ %s\n", c.Name)
	}
	fmt.Fprintf(stdout, "receipt %d verified\n", b.Index)
	return 0
}

// load reads JSON from a file or an http(s) URL.
func load(src string, v any) error {
	var r io.Reader
	if strings.HasPrefix(src, "http://") || strings.HasPrefix(src, "https://") {
		resp, err := httpClient.Get(src) //nolint:gosec // the operator's own URL
		if err != nil {
			return err
		}
		defer func() { _ = resp.Body.Close() }()
		if resp.StatusCode != http.StatusOK {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
			return fmt.Errorf("GET %s: %s: %s", src, resp.Status, strings.TrimSpace(string(body)))
		}
		r = resp.Body
	} else {
		f, err := os.Open(src)
		if err != nil {
			return err
		}
		defer func() { _ = f.Close() }()
		r = f
	}
	if err := json.NewDecoder(r).Decode(v); err != nil {
		return fmt.Errorf("%s: %w", src, err)
	}
	return nil
}
