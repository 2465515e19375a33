// Module node-images holds the two programs the real test node's local images run: the pod
// sandbox's pause process and a tiny HTTP server for tests. Standard library only, so the
// images need no registry and this module no go.sum.
module shapeblock.io/tools/node-images

go 1.25.0
