//go:build tools

// Package tools records the commands this module builds: the Cloud Native Buildpacks
// lifecycle (one multi-call binary: creator, detector, analyzer, restorer, builder, exporter)
// and its launcher, which the real test node's builder image carries.
package tools

import (
	_ "github.com/buildpacks/lifecycle/cmd/launcher"
	_ "github.com/buildpacks/lifecycle/cmd/lifecycle"
)
