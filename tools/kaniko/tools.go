//go:build tools

// Package tools records the command this module builds: the kaniko executor the real test
// node's Dockerfile builds run. Upstream GoogleContainerTools/kaniko is archived (June 2025);
// Chainguard's fork is the maintained one, and the one the agent's default --kaniko-image names.
package tools

import (
	_ "github.com/chainguard-dev/kaniko/cmd/executor"
)
