//go:build tools

// Package tools records the kwok command so that go.mod and go.sum pin every
// dependency it needs.
package tools

import _ "sigs.k8s.io/kwok/cmd/kwok"
