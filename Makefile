# podsock — every target installs what it needs (pinned) through scripts/.
# clang-19 is pinned in datapath/gen.go and installed by scripts/install-deps.sh.
SHELL := /bin/bash
export PATH := /usr/local/go/bin:$(CURDIR)/bin:$(PATH)

GOLANGCI_LINT_VERSION := v2.15.0
GENERATED := datapath/socklb_bpfel.go datapath/socklb_bpfel.o datapath/sockiter_bpfel.go datapath/sockiter_bpfel.o \
	datapath/mapcount_bpfel.go datapath/mapcount_bpfel.o \
	test/revnat/lrubase_bpfel.go test/revnat/lrubase_bpfel.o
# Directories that hold generated files (an untracked file there is a stale one).
GENERATED_DIRS := datapath/ test/revnat/

.PHONY: all deps build generate generate-check lint test test-privileged fuzz soak bench demo demo-kubernetes clean

all: build

deps:
	@scripts/install-deps.sh
	@scripts/install-runtime.sh
	@scripts/install-crio.sh
	@scripts/install-kube.sh

build:
	go build -o bin/podsock ./cmd/podsock

# clang orders some of an object's BTF types by the directory it builds in, so the objects
# are always generated in one fixed directory, whatever the checkout's path (one make at a
# time: the lock).
GENERATE_DIR := /tmp/podsock-generate

generate: deps
	@flock $(GENERATE_DIR).lock sh -ec '\
		rm -rf $(GENERATE_DIR); mkdir -p $(GENERATE_DIR)/test; \
		cp -r bpf datapath go.mod go.sum $(GENERATE_DIR)/; \
		cp -r test/revnat $(GENERATE_DIR)/test/; \
		(cd $(GENERATE_DIR)/datapath && go generate ./...); \
		(cd $(GENERATE_DIR)/test/revnat && go generate .); \
		cp $(GENERATE_DIR)/datapath/*_bpfel.go $(GENERATE_DIR)/datapath/*_bpfel.o $(CURDIR)/datapath/; \
		cp $(GENERATE_DIR)/test/revnat/*_bpfel.go $(GENERATE_DIR)/test/revnat/*_bpfel.o $(CURDIR)/test/revnat/; \
		rm -rf $(GENERATE_DIR)'

# Fails when the committed BPF objects differ from what the pinned clang builds now.
generate-check: generate
	@if ! git diff --quiet -- $(GENERATED) || [ -n "$$(git status --porcelain -- $(GENERATED_DIRS) | grep '^??')" ]; then \
		echo "generate-check: generated BPF files are stale; run 'make generate' and commit them" >&2; \
		git status --short -- $(GENERATED_DIRS) >&2; exit 1; \
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

# The fuzz targets: the config parser, the NRI handlers against the real datapath (root),
# and the control socket's query parsing.
FUZZ_TARGETS := FuzzParse:./config FuzzNRIEvents:./agent FuzzSocketQuery:./api

define fuzz-each
	@set -e; for t in $(FUZZ_TARGETS); do \
		echo "fuzz $${t%%:*} for $(1)"; \
		go test -run='^$$' -fuzz="^$${t%%:*}$$" -fuzztime=$(1) $${t##*:}; \
	done
endef

test: deps generate-check lint
	go vet ./...
	go test -count=1 -p 1 -timeout 30m ./...
	$(call fuzz-each,15s)

fuzz:
	$(call fuzz-each,5m)

# The reliability suite ten times longer (kill -9 under load, backend churn, pod cycles,
# upgrade), then the fuzzers for 5 minutes each. Root; about an hour.
soak: deps
	PODSOCK_SOAK=1 go test -count=1 -p 1 -timeout 60m \
		-run 'Kill9RepeatedUnderLoad|BackendChurnUnderConnects|NRIPodChurn|UpgradeWithLiveSockets|SocketCountsEqualTheTruth|PodEventsDuringLargeApply' ./...
	$(call fuzz-each,5m)

bench: deps build
	go run ./test/bench

# RUNTIME=crio runs it under CRI-O instead of containerd.
RUNTIME ?= containerd
demo: deps build
	RUNTIME=$(RUNTIME) scripts/demo.sh

# The same node with its service from a private kube-apiserver (kubectl apply, scale down).
demo-kubernetes: deps build
	KUBERNETES=1 scripts/demo.sh

clean:
	rm -rf bin
