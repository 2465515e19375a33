use clap::Parser;

fn main() -> std::process::ExitCode {
    shapeblock_agent::cli::Cli::parse().run()
}
