//! flanneld entry point: parse the command line, set up logging, run the agent.
//!
//! Exit codes: 0 on a signal or a revoked lease (upstream), 1 on a fatal error, 2 on a bad
//! command line.

use std::process::ExitCode;

use flannel_agent::{agent, cli::Cli, telemetry};

fn main() -> ExitCode {
    let cli = Cli::from_env();
    if cli.version {
        // Upstream prints the version to stderr.
        eprintln!("{}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    if let Err(e) = telemetry::init(&cli.log_filter()) {
        eprintln!("flanneld: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flanneld: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(agent::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "flanneld failed");
            eprintln!("flanneld: {e}");
            ExitCode::FAILURE
        }
    }
}
