#!/usr/bin/env bash
# Builds the agent as the image ships it: one static binary (glibc linked statically with
# crt-static on the gnu target; the musl target may not be installable here), then proves what
# can be proven without a container engine: it runs (--version, --help), it has no interpreter
# and no shared libraries (ldd), and how big it is. Prints the binary's path last.
#
#   SHAPEBLOCK_CACHE   cache root (default ~/.cache/shapeblock); the build is cached in
#                      $SHAPEBLOCK_CACHE/cargo-target-static, apart from the test builds.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cache=${SHAPEBLOCK_CACHE:-$HOME/.cache/shapeblock}
target_dir=$cache/cargo-target-static
host=$(rustc -vV | sed -n 's/^host: //p')
case "$host" in
  *-linux-gnu) ;;
  *) echo "error: crt-static needs a linux-gnu host, not $host" >&2; exit 1 ;;
esac

# --target keeps RUSTFLAGS off the build scripts and proc macros, which must stay dynamic.
# --no-default-features: the agent alone, without compiling the hub (SQLite) or the test harness.
RUSTFLAGS='-C target-feature=+crt-static' cargo build --locked --profile image \
  -p shapeblock --no-default-features --bin shapeblock-agent --target "$host" --target-dir "$target_dir" >&2
bin=$target_dir/$host/image/shapeblock-agent

"$bin" --version >&2
"$bin" --help >/dev/null
"$bin" run --help >/dev/null
"$bin" rbac --markdown >/dev/null
# ldd says "not a dynamic executable" (or "statically linked") for a static binary.
if ldd_out=$(ldd "$bin" 2>&1); [[ "$ldd_out" != *"not a dynamic executable"* && "$ldd_out" != *"statically linked"* ]]; then
  echo "error: $bin is dynamically linked:" >&2
  echo "$ldd_out" >&2
  exit 1
fi
if command -v readelf >/dev/null && readelf -l "$bin" | grep -q 'Requesting program interpreter'; then
  echo "error: $bin asks for a program interpreter" >&2
  exit 1
fi
size=$(stat -c %s "$bin")
echo "static binary: $size bytes ($(( (size + 524288) / 1048576 )) MiB), no shared libraries" >&2
echo "$bin"
