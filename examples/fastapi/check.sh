#!/usr/bin/env bash
# Lints and type-checks the example (ruff, mypy --strict) in the client's venv with the
# example's packages; `cargo test --test fastapi_example` runs it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
venv=$(../../clients/python/tools/venv.sh "$PWD/requirements.txt")
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
"$venv/bin/mypy"
