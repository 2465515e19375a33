//! `shapeblock-agent`: the agent binary's commands.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::api;

/// The ShapeBlock agent: runs in a cluster managed by ShapeBlock, dials out to the ShapeBlock
/// server and reconciles Projects, Apps, AppBuilds, BackingServices and Teams.
#[derive(Parser, Debug)]
#[command(name = "shapeblock-agent", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the CustomResourceDefinitions of every ShapeBlock kind as YAML, or write one
    /// file per CRD into a directory (this is how `crds/` is generated).
    Crd {
        /// Write `<group>_<plural>.yaml` files into this directory instead of printing.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

impl Cli {
    /// Runs the chosen command and maps its outcome to the process exit code.
    pub fn run(self) -> ExitCode {
        let outcome = match self.command {
            Command::Crd { out: None } => print_crds(),
            Command::Crd { out: Some(dir) } => write_crds(&dir),
        };
        match outcome {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::FAILURE
            }
        }
    }
}

fn print_crds() -> Result<(), Box<dyn std::error::Error>> {
    for crd in api::crds() {
        print!("---\n{}", api::crd_yaml(&crd)?);
    }
    Ok(())
}

fn write_crds(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    for crd in api::crds() {
        let path = dir.join(api::crd_file_name(&crd));
        std::fs::write(&path, api::crd_yaml(&crd)?)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
