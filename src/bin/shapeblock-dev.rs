use clap::Parser;

fn main() -> std::process::ExitCode {
    shapeblock_testenv::cli::dev::Cli::parse().run()
}
