#!/usr/bin/env bash
# Makes (once) the Python venv the client's checks and tests run in, keyed by the hash of
# requirements-dev.txt, under $SHAPEBLOCK_CACHE (default ~/.cache/shapeblock); prints its path.
# The package itself is not installed into it (checkouts share the venv): the tests put src/
# on the path (pyproject.toml).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache=${SHAPEBLOCK_CACHE:-$HOME/.cache/shapeblock}
# More requirement files (the FastAPI example's) may be named: the venv is then keyed by all.
requirements=("$here/requirements-dev.txt" "$@")
hash=$(cat "${requirements[@]}" | sha256sum | cut -c1-16)
venv="$cache/venv-$hash"
if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  for r in "${requirements[@]}"; do
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$r" >&2
  done
  touch "$venv/.complete"
fi
echo "$venv"
