#!/usr/bin/env bash
# Lints and type-checks the Python client (ruff, mypy --strict) in its venv. Its pytest suite
# needs a hub and an agent: `cargo test --test python_client` runs it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv=$(tools/venv.sh)
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
"$venv/bin/mypy"
