#!/usr/bin/env bash
# Builds the test control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler) from the Go modules pinned under tools/, one binary at a time,
# into a cache folder outside the checkout. A binary is rebuilt only when its
# key (pinned version, Go version, go.sum) changes. Prints the bin directory.
#
#   SHAPEBLOCK_CACHE  cache root (default: ~/.cache/shapeblock)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${SHAPEBLOCK_CACHE:-$HOME/.cache/shapeblock}
go_version=$(go env GOVERSION)

# Go's own caches live beside ours so that a warm machine skips the compile.
export GOCACHE=${GOCACHE:-$cache/go-build}
export GOMODCACHE=${GOMODCACHE:-$(go env GOMODCACHE)}
export CGO_ENABLED=0
export GOFLAGS=-buildvcs=false

module_version() { # module dir, module path
  (cd "$1" && go list -m -f '{{.Version}}' "$2")
}

key_for() { # module dir, version
  printf '%s-%s-%s' "$2" "$go_version" "$(sha256sum "$1/go.sum" | cut -c1-12)"
}

build() { # module dir, package, binary name, key, [ldflags]
  local dir=$1 pkg=$2 name=$3 key=$4 ldflags=${5:-}
  local out=$cache/bin/$key
  if [[ -x $out/$name ]]; then
    return
  fi
  mkdir -p "$out"
  echo "building $name ($key)..." >&2
  local start=$SECONDS
  (cd "$dir" && go build -trimpath -ldflags "-s -w $ldflags" -o "$out/$name.tmp" "$pkg")
  mv "$out/$name.tmp" "$out/$name"
  echo "built $name in $((SECONDS - start))s" >&2
}

kube_dir=$here/kube
etcd_dir=$here/etcd
kube_version=$(module_version "$kube_dir" k8s.io/kubernetes)
etcd_version=$(module_version "$etcd_dir" go.etcd.io/etcd/server/v3)
kube_key=$(key_for "$kube_dir" "kube-$kube_version")
etcd_key=$(key_for "$etcd_dir" "etcd-$etcd_version")

minor=${kube_version#v*.}; minor=${minor%%.*}
major=${kube_version#v}; major=${major%%.*}
kube_ldflags="-X k8s.io/component-base/version.gitVersion=$kube_version \
 -X k8s.io/component-base/version.gitMajor=$major \
 -X k8s.io/component-base/version.gitMinor=$minor \
 -X k8s.io/component-base/version.gitTreeState=clean \
 -X k8s.io/component-base/version.buildDate=1970-01-01T00:00:00Z"

build "$etcd_dir" go.etcd.io/etcd/server/v3 etcd "$etcd_key"
for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  build "$kube_dir" "k8s.io/kubernetes/cmd/$cmd" "$cmd" "$kube_key" "$kube_ldflags"
done

# One stable directory of links, so callers need not know the keys.
bin=$cache/bin/current
mkdir -p "$bin"
ln -sfn "$cache/bin/$etcd_key/etcd" "$bin/etcd"
for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  ln -sfn "$cache/bin/$kube_key/$cmd" "$bin/$cmd"
done
# Binaries of older pins are dead weight (each set is ~400 MB): keep only the current keys.
for old in "$cache"/bin/kube-* "$cache"/bin/etcd-*; do
  [[ -d $old && $old != "$cache/bin/$kube_key" && $old != "$cache/bin/$etcd_key" ]] && rm -rf "$old"
done
echo "$bin"
