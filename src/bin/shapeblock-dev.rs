use clap::Parser;

fn main() -> std::process::ExitCode {
    shapeblock_agent::cli::dev::Cli::parse().run()
}
