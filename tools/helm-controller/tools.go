//go:build tools

// Package tools records the k3s helm-controller command so that go.mod and
// go.sum pin every dependency it needs.
package tools

import _ "github.com/k3s-io/helm-controller"
