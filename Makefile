# restic-manager developer entry points. `make run` and `make test` are the two a newcomer needs.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PORT ?= 8080
DEV_DIR ?= .dev
CARGO ?= cargo

.PHONY: help build run dev-bundle test lint fmt ci clean dist dist-agents bench image base-images image-fixtures upgrade screenshots

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

build: ## build every binary (debug)
	$(CARGO) build --workspace --bins

dev-bundle: build ## stage the host agent, install scripts and unit into .dev/bundled
	scripts/dev-bundle.sh target/debug $(DEV_DIR)

run: dev-bundle ## run the server on 127.0.0.1:PORT (default 8080) with a local data dir (.dev/data)
	RM_LISTEN=127.0.0.1:$(PORT) \
	RM_DATA_DIR=$(DEV_DIR)/data \
	RM_BUNDLED_ASSETS_DIR=$(DEV_DIR)/bundled \
	RM_PUBLIC_URL=http://127.0.0.1:$(PORT) \
	./target/debug/restic-manager-server

test: ## run every test (unit, in-process router, end-to-end on real sockets); skips are counted as skipped
	$(CARGO) build --workspace --bins
	mkdir -p target
	: >target/test-skips.log
	set -o pipefail; RM_SKIP_LOG=$(CURDIR)/target/test-skips.log $(CARGO) test --workspace 2>&1 | tee target/test.log
	@scripts/test-summary.sh target/test.log target/test-skips.log

screenshots: ## run the browser tests (chromium, chromium-driver) and copy their screenshots to docs/screenshots/
	$(CARGO) build --workspace --bins
	$(CARGO) test -p rm-e2e --test web_e2e --test web_assets_e2e --test web_plans_e2e
	mkdir -p docs/screenshots
	cp target/web-screenshots/*.png docs/screenshots/

dist: ## cross-compile the agents (linux amd64/arm64, windows amd64) and servers into dist/ (installs the toolchain; root)
	scripts/dist.sh all

dist-agents: ## like dist, agents only (what the cross-agent tests run under qemu and wine)
	scripts/dist.sh agents

image: ## build the server image restic-manager:dev (VERSION/COMMIT/DATE from git; PLATFORM=linux/arm64 for arm64)
	scripts/image.sh $(if $(PLATFORM),--platform $(PLATFORM)) --tag $(or $(IMAGE),restic-manager:dev)

base-images: ## build local stand-ins for the base images, for machines that cannot pull (root; starts no engine)
	scripts/base-images.sh

image-fixtures: ## engine + registry + the images tests/image_e2e.rs runs against (root; what .ci/run does)
	tests/fixtures/image-fixtures.sh

upgrade: ## move the compose deployment to TO=<tag|sha256:digest>, verify, roll back on failure (DRY_RUN=1 to plan)
	@test -n "$(TO)" || { echo "usage: make upgrade TO=v1.2.3 [DRY_RUN=1]" >&2; exit 2; }
	scripts/upgrade.sh $(if $(DRY_RUN),--dry-run) $(TO)

bench: ## benchmark against nginx and caddy into bench/results/ (installs wrk, nginx, caddy...; root; not a test)
	scripts/bench-tools.sh
	python3 bench/run.py

lint: ## rustfmt, clippy (warnings denied), shellcheck, actionlint, the deploy pin must be a digest
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	shellcheck scripts/*.sh tests/fixtures/*.sh
	scripts/lint-workflows.sh
	scripts/image-pin.sh check deploy/image-pin.env

fmt: ## format the code
	$(CARGO) fmt --all

ci: lint dist-agents image-fixtures test ## what .ci/run runs after installing tools

clean: ## remove build output, dist/ and the dev data
	$(CARGO) clean
	rm -rf $(DEV_DIR) dist
