#!/usr/bin/env bash
# The project's test command (see README): builds the test cluster's binaries if they are not
# cached, checks formatting and lints, then runs every test against real etcd, kube-apiserver,
# kube-controller-manager and kube-scheduler with kwok nodes, the k3s helm-controller and helm.
# Benchmarks are not part of it.
#
#   SHAPEBLOCK_CACHE   cache root outside the checkout (default ~/.cache/shapeblock)
#   CARGO_TARGET_DIR   defaults to $SHAPEBLOCK_CACHE/cargo-target, so fresh clones reuse builds
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export SHAPEBLOCK_CACHE=${SHAPEBLOCK_CACHE:-$HOME/.cache/shapeblock}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$SHAPEBLOCK_CACHE/cargo-target}
SHAPEBLOCK_BIN_DIR=$(tools/build-control-plane.sh)
export SHAPEBLOCK_BIN_DIR
"$SHAPEBLOCK_BIN_DIR/kube-apiserver" --version

cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings
# The Python client (clients/python) and the FastAPI example on it: ruff and mypy here; their
# pytest suites run in tests/python_client.rs and tests/fastapi_example.rs against a real hub
# and agent.
clients/python/tools/check.sh
examples/fastapi/check.sh
# One test at a time within each test binary: each runs agents, hubs and helm Jobs against a
# whole simulated cluster on the same 2 cores, and concurrent ones turned into timeouts there
# (tests/tunnel.rs, once in six full runs). Set RUST_TEST_THREADS to override.
export RUST_TEST_THREADS=${RUST_TEST_THREADS:-1}
# --workspace: the crates' unit and doc tests as well as the root package's integration tests.
cargo test --locked --workspace "$@"
