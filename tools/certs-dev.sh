#!/usr/bin/env bash
# Development PKI in one command: a CA and the hub's server certificate for localhost in
# certs-dev/ (ignored by git), then how to start the hub with them. Never for production.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec cargo run --quiet --locked --bin shapeblock-hub -- dev-certs --out certs-dev "$@"
