//! The ShapeBlock agent.
//!
//! Layout follows the architecture (see `DESIGN.md` in the shared brief):
//! - [`api`]: the custom resource types; no client, no tunnel.
//! - [`cli`]: command-line entry points that `main.rs` dispatches to.
//! - [`testenv`]: a real Kubernetes control plane (etcd, kube-apiserver,
//!   kube-controller-manager built from Go modules) for integration tests and the local demo.
//!
//! Controllers (one module per kind), the bridge, the tunnel and the hub land beside these.

pub mod api;
pub mod bridge;
pub mod chart;
pub mod cli;
pub mod controllers;
pub mod hub;
pub mod leader;
pub mod proto;
pub mod rbac;
pub mod runtime;
pub mod startup;
pub mod testenv;
pub mod tunnel;
