# The two commands of README.md: `make demo` and `make test`.
# Both install what is missing (scripts/setup), build the test guest, then run.

GUEST_DIR ?= $(CURDIR)/target/guest
export DWCP_GUEST_DIR := $(GUEST_DIR)

.PHONY: demo test setup guest build lint openapi bench-netlab

# Release: the demo compares dwcp's migration with QEMU's, and a debug
# build hashes and compresses several times slower.
demo: guest setup
	cargo build --release -p dwcp
	./target/release/dwcp demo --guest-dir $(GUEST_DIR)

test: guest
	cargo nextest run --workspace --no-fail-fast

lint: setup
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

setup:
	scripts/setup

guest: setup
	scripts/build-guest $(GUEST_DIR)

build: setup
	cargo build -p dwcp

# Regenerates the committed OpenAPI document.
openapi:
	cargo run -q -p dwcp -- openapi > api/openapi.json

# netlab's accuracy against iperf3 (BENCHMARKS.md); needs root, ~6 minutes.
bench-netlab: setup
	cargo build --release -p dwcp-netlab
	./target/release/netlab bench --traces $(CURDIR)/../shared/traces
