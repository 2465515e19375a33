"""Generated from crates/proto/proto/shapeblock/hub/v1/hub.proto: do not edit."""
