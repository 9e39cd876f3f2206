// Command knhk is the sidecar beside Envoy: `knhk serve` runs it,
// `knhk envoy-config` prints the Envoy bootstrap that goes with a config.
package main

import (
	"fmt"
	"io"
	"os"
)

const usage = `knhk — canary routing, admission and receipts beside Envoy

usage:
  knhk serve [--config FILE] [--data-dir DIR] [--grpc-addr ADDR] [--xds-addr ADDR] [--admin-addr ADDR] [--log-level LEVEL]
  knhk envoy-config [--config FILE] [--listener-port N] [--admin-port N] [--failure-mode-allow=BOOL] [--xds-api delta|sotw]
  knhk start|promote|pause|resume|abort [--admin HOST:PORT|URL]
  knhk status [--watch] [--json] [--admin HOST:PORT|URL]
  knhk capacity [--json] [--admin HOST:PORT|URL]
  knhk receipt verify [--keys FILE|URL] [--bundle FILE|URL] [--admin HOST:PORT|URL] [--wait DURATION] [TOKEN]
  knhk region policy [--admin HOST:PORT|URL]
  knhk version

--admin (default $KNHK_ADMIN, then 127.0.0.1:9090) is the admin API: host:port or http(s)://host:port.
`

var version = "dev"

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	switch args[0] {
	case "serve":
		return serve(args[1:], stderr)
	case "envoy-config":
		return envoyConfig(args[1:], stdout, stderr)
	case "start", "promote", "pause", "resume", "abort":
		return rolloutAction(args[0], args[1:], stdout, stderr)
	case "status":
		return status(args[1:], stdout, stderr)
	case "capacity":
		return capacityCmd(args[1:], stdout, stderr)
	case "receipt":
		return receiptCmd(args[1:], stdout, stderr)
	case "region":
		return regionCmd(args[1:], stdout, stderr)
	case "version":
		fmt.Fprintln(stdout, "knhk", version)
		return 0
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "knhk: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
}
