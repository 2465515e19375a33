#!/usr/bin/env bash
# Makes (once) the Python venv the client's checks and tests run in, keyed by the hash of
# requirements-dev.txt, under $SHAPEBLOCK_CACHE (default ~/.cache/shapeblock); prints its path.
# The package itself is not installed into it (checkouts share the venv): the tests put src/
# on the path (pyproject.toml).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache=${SHAPEBLOCK_CACHE:-$HOME/.cache/shapeblock}
hash=$(sha256sum "$here/requirements-dev.txt" | cut -c1-16)
venv="$cache/venv-$hash"
if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$here/requirements-dev.txt" >&2
  touch "$venv/.complete"
fi
echo "$venv"
