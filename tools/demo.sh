#!/usr/bin/env bash
# The project's main job (see README): builds what is missing, starts a real local control
# plane (etcd, kube-apiserver, kube-controller-manager) with the ShapeBlock CRDs installed and
# the simulated cluster around it (kube-scheduler, kwok nodes, helm-controller, helm),
# and prints how to use it. Ctrl-C stops it and removes its files.
#
# Extra arguments go to `shapeblock-dev up` (see `--help`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export SHAPEBLOCK_CACHE=${SHAPEBLOCK_CACHE:-$HOME/.cache/shapeblock}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$SHAPEBLOCK_CACHE/cargo-target}
SHAPEBLOCK_BIN_DIR=$(tools/build-control-plane.sh)
export SHAPEBLOCK_BIN_DIR
cargo build --locked --quiet --bin shapeblock-dev --bin shapeblock-agent --bin shapeblock-hub
exec "$CARGO_TARGET_DIR/debug/shapeblock-dev" up --kubeconfig-out "$PWD/dev.kubeconfig" "$@"
