//! The reference hub binary; everything is in `shapeblock_agent::cli::hub`.

fn main() -> std::process::ExitCode {
    use clap::Parser;
    shapeblock_agent::cli::hub::Cli::parse().run()
}
