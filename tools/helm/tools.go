//go:build tools

// Package tools records the Helm 4 CLI so that go.mod and go.sum pin every
// dependency it needs.
package tools

import _ "helm.sh/helm/v4/cmd/helm"
