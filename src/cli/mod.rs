//! Command-line front ends. Binaries stay thin: they parse arguments and call into here.

pub mod agent;
pub mod demo;
pub mod dev;
pub mod hub;
