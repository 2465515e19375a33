//! The ShapeBlock agent: the operator that runs in a tenant cluster and talks to the hub only
//! outbound.
//!
//! - [`controllers`]: one module per kind, and what several kinds share (the HelmChart that
//!   deploys an App, the run-once Job, Job state) in layers that import no controller.
//! - [`bridge`]: hub commands to custom resources, status to phase changes, the identity Secret.
//! - [`tunnel`]: the agent side of the tunnel (enrollment, the mTLS stream, renewal).
//! - [`leader`], [`startup`], [`runtime`]: leader election, what the leader does first, wiring.
//! - [`rbac`], [`chart`]: the agent's RBAC rules and the chart files generated from them;
//!   [`names`]: the names both the rules and the controllers use.
//! - [`cli`]: the `shapeblock-agent` command line.
//!
//! The custom resource types are the `shapeblock-api` crate and the protocol the
//! `shapeblock-proto` crate, re-exported here as [`api`] and [`proto`]. The agent links neither
//! the hub nor the test harness (tests/arrows.rs checks it).

pub use shapeblock_api as api;
pub use shapeblock_proto as proto;

pub mod bridge;
pub mod chart;
pub mod cli;
pub mod controllers;
pub mod kube_client;
pub mod leader;
pub mod names;
pub mod rbac;
pub mod runtime;
pub mod startup;
pub mod tunnel;
