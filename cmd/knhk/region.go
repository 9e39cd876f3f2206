package main

import (
	"flag"
	"fmt"
	"io"
)

// regionCmd: `knhk region policy` prints GET /v1/region/policy, the
// witness policy (Sigsum/tessera grammar) this region's log is witnessed
// under.
func regionCmd(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] != "policy" {
		fmt.Fprintln(stderr, "usage: knhk region policy [--admin HOST:PORT|URL]")
		return 2
	}
	fs := flag.NewFlagSet("region policy", flag.ContinueOnError)
	fs.SetOutput(stderr)
	adminURL(fs)
	if err := fs.Parse(args[1:]); err != nil {
		return 2
	}
	base, err := adminFlagBase(fs)
	if err != nil {
		fmt.Fprintln(stderr, "knhk region policy:", err)
		return 2
	}
	body, err := adminGet(base, "/v1/region/policy", 1<<20)
	if err != nil {
		fmt.Fprintln(stderr, "knhk region policy:", err)
		return 1
	}
	_, _ = stdout.Write(body)
	return 0
}
