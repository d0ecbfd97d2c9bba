//! The `automm` binary: parse arguments, set up logging, call the library.

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    automm::onnx::kernels::keep_freed_memory();
    let cli = cli::Cli::parse();
    let level = match cli.verbose {
        _ if cli.quiet => "warn",
        0 => "warn,automm=info",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| level.into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
    match cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
