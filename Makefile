# podsock — every target installs what it needs (pinned) through scripts/.
# clang-19 is pinned in datapath/gen.go and installed by scripts/install-deps.sh.
SHELL := /bin/bash
export PATH := /usr/local/go/bin:$(CURDIR)/bin:$(PATH)

GOLANGCI_LINT_VERSION := v2.15.0
GENERATED := datapath/socklb_bpfel.go datapath/socklb_bpfel.o datapath/sockiter_bpfel.go datapath/sockiter_bpfel.o

.PHONY: all deps build generate generate-check lint test test-privileged fuzz bench demo clean

all: build

deps:
	@scripts/install-deps.sh
	@scripts/install-runtime.sh

build:
	go build -o bin/podsock ./cmd/podsock

generate: deps
	cd datapath && go generate ./...

# Fails when the committed BPF objects differ from what the pinned clang builds now.
generate-check: generate
	@if ! git diff --quiet -- $(GENERATED) || [ -n "$$(git status --porcelain -- datapath/ | grep '^??')" ]; then \
		echo "generate-check: generated BPF files are stale; run 'make generate' and commit them" >&2; \
		git status --short -- datapath/ >&2; exit 1; \
	fi

bin/golangci-lint:
	GOBIN=$(CURDIR)/bin go install github.com/golangci/golangci-lint/v2/cmd/golangci-lint@$(GOLANGCI_LINT_VERSION)

lint: bin/golangci-lint
	bin/golangci-lint run ./...

# Unit tests need nothing special; privileged tests need root and run one package at a
# time because they share kernel state (cgroups, netns, bpffs). With CI=true a privileged
# test that cannot run fails instead of skipping.
test-privileged: deps
	go test -count=1 -p 1 -run 'Privileged' ./...

test: deps generate-check lint
	go vet ./...
	go test -count=1 -p 1 ./...
	go test -run='^$$' -fuzz=FuzzParse -fuzztime=15s ./config

fuzz:
	go test -run='^$$' -fuzz=FuzzParse -fuzztime=5m ./config

bench: deps build
	go run ./test/bench

demo: deps build
	scripts/demo.sh

clean:
	rm -rf bin
