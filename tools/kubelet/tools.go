//go:build tools

// Package tools records the command this module builds, so that go.mod and
// go.sum pin every dependency it needs. The kubelet has its own module (not
// tools/kube) so that adding it did not change the control plane's go.sum and
// with it the cache key of every control-plane binary; build-control-plane.sh
// checks that both pin the same k8s.io/kubernetes.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kubelet"
)
