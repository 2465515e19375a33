//! The reference hub binary; everything is in `shapeblock_hub::cli`.

fn main() -> std::process::ExitCode {
    use clap::Parser;
    shapeblock_hub::cli::Cli::parse().run()
}
