//! `shapeblock-dev`'s command line and the demo it runs. The binary stays thin: it parses
//! arguments and calls into here.

pub mod demo;
pub mod dev;
