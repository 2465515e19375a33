#!/usr/bin/env bash
# Builds the test cluster from the Go modules pinned under tools/, one binary at a
# time, into a cache folder outside the checkout: the control plane (etcd,
# kube-apiserver, kube-controller-manager, kube-scheduler, kubectl), the real node's kubelet
# and the kaniko executor and buildpacks lifecycle its builds run, and their peers (kwok's simulated nodes, the k3s
# helm-controller, the helm CLI). A binary is rebuilt only when its key (pinned version, Go version, go.sum) changes.
# Prints the bin directory.
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
kube_version=$(module_version "$kube_dir" k8s.io/kubernetes)
minor=${kube_version#v*.}; minor=${minor%%.*}
major=${kube_version#v}; major=${major%%.*}
kube_ldflags="-X k8s.io/component-base/version.gitVersion=$kube_version \
 -X k8s.io/component-base/version.gitMajor=$major \
 -X k8s.io/component-base/version.gitMinor=$minor \
 -X k8s.io/component-base/version.gitTreeState=clean \
 -X k8s.io/component-base/version.buildDate=1970-01-01T00:00:00Z"

# The real node's kubelet has its own module (more dependencies, so its own go.sum and cache
# key) but must be the control plane's release.
kubelet_version=$(module_version "$here/kubelet" k8s.io/kubernetes)
if [[ $kubelet_version != "$kube_version" ]]; then
  echo "error: tools/kubelet pins k8s.io/kubernetes $kubelet_version, tools/kube $kube_version: pin both to one release" >&2
  exit 1
fi

# name | module dir | pinned module | package | key prefix | ldflags ({v} = pinned version)
binaries=(
  "etcd|etcd|go.etcd.io/etcd/server/v3|go.etcd.io/etcd/server/v3|etcd|"
  "kube-apiserver|kube|k8s.io/kubernetes|k8s.io/kubernetes/cmd/kube-apiserver|kube|$kube_ldflags"
  "kube-controller-manager|kube|k8s.io/kubernetes|k8s.io/kubernetes/cmd/kube-controller-manager|kube|$kube_ldflags"
  "kube-scheduler|kube|k8s.io/kubernetes|k8s.io/kubernetes/cmd/kube-scheduler|kube|$kube_ldflags"
  "kubectl|kube|k8s.io/kubernetes|k8s.io/kubernetes/cmd/kubectl|kube|$kube_ldflags"
  "kubelet|kubelet|k8s.io/kubernetes|k8s.io/kubernetes/cmd/kubelet|kubelet|$kube_ldflags"
  "kwok|kwok|sigs.k8s.io/kwok|sigs.k8s.io/kwok/cmd/kwok|kwok|-X sigs.k8s.io/kwok/pkg/consts.Version={v}"
  "helm-controller|helm-controller|github.com/k3s-io/helm-controller|github.com/k3s-io/helm-controller|helm-controller|-X github.com/k3s-io/helm-controller/pkg/version.Version={v} -X github.com/k3s-io/helm-controller/pkg/version.GitCommit={v}"
  "helm|helm|helm.sh/helm/v4|helm.sh/helm/v4/cmd/helm|helm|-X helm.sh/helm/v4/internal/version.version={v}"
  "lifecycle|lifecycle|github.com/buildpacks/lifecycle|github.com/buildpacks/lifecycle/cmd/lifecycle|lifecycle|-X github.com/buildpacks/lifecycle/cmd.Version={v}"
  "launcher|lifecycle|github.com/buildpacks/lifecycle|github.com/buildpacks/lifecycle/cmd/launcher|lifecycle|-X github.com/buildpacks/lifecycle/cmd.Version={v}"
  "kaniko-executor|kaniko|github.com/chainguard-dev/kaniko|github.com/chainguard-dev/kaniko/cmd/executor|kaniko|-X github.com/chainguard-dev/kaniko/pkg/version.version={v}"
)

bin=$cache/bin/current
mkdir -p "$bin"
declare -A keep=()
for entry in "${binaries[@]}"; do
  IFS='|' read -r name dir module pkg prefix ldflags <<<"$entry"
  version=$(module_version "$here/$dir" "$module")
  key=$(key_for "$here/$dir" "$prefix-$version")
  build "$here/$dir" "$pkg" "$name" "$key" "${ldflags//\{v\}/$version}"
  # One stable directory of links, so callers need not know the keys.
  ln -sfn "$cache/bin/$key/$name" "$bin/$name"
  keep[$prefix]=$cache/bin/$key
done
# The real node's local images run two tiny programs of our own (tools/node-images: standard
# library only, so no go.sum): keyed by their sources.
images_key=node-images-$(cat "$here"/node-images/go.mod "$here"/node-images/*/*.go | sha256sum | cut -c1-12)-$go_version
for name in pause hello; do
  build "$here/node-images" "./$name" "node-image-$name" "$images_key"
  ln -sfn "$cache/bin/$images_key/node-image-$name" "$bin/node-image-$name"
done
# kwok reads its Stages from the API (--enable-crds=Stage) but does not install the CRD: take
# it from the pinned module, beside the binary.
kwok_dir=$(cd "$here/kwok" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)
stage_crd=$(dirname "$(readlink "$bin/kwok")")/kwok.x-k8s.io_stages.yaml
[[ -f $stage_crd ]] || install -m 0644 "$kwok_dir/kustomize/crd/bases/kwok.x-k8s.io_stages.yaml" "$stage_crd"
ln -sfn "$stage_crd" "$bin/kwok.x-k8s.io_stages.yaml"
# Binaries of older pins are dead weight (the Kubernetes set is ~400 MB): keep only the
# current keys.
for prefix in "${!keep[@]}"; do
  for old in "$cache/bin/$prefix"-v*; do
    [[ -d $old && $old != "${keep[$prefix]}" ]] && rm -rf "$old"
  done
done
for old in "$cache/bin/node-images"-*; do
  [[ -d $old && $old != "$cache/bin/$images_key" ]] && rm -rf "$old"
done
echo "$bin"
