//go:build tools

// Package tools records the etcd server command so that go.mod and go.sum pin
// every dependency it needs.
package tools

import _ "go.etcd.io/etcd/server/v3"
