//! flanneld entry point: parse the command line, set up logging, run the agent.
//!
//! Exit codes: 0 on a signal or a revoked lease (upstream), 1 on a fatal error, 2 on a bad
//! command line.

use std::process::ExitCode;

use flannel_agent::{
    agent,
    cli::Cli,
    config::Config,
    subnet::env_file::read_previous,
    telemetry,
};

fn main() -> ExitCode {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "inspect") {
        args.remove(1);
        return inspect(args);
    }
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

/// `flanneld inspect [--json] [agent flags]`: the agent's flags and `FLANNELD_*` variables
/// say where the datastore, the pins and `subnet.env` are.
fn inspect(mut args: Vec<std::ffi::OsString>) -> ExitCode {
    let before = args.len();
    args.retain(|a| a != "--json" && a != "-json");
    let json = args.len() != before;
    let Some(config) = config_from(args, "inspect") else {
        return ExitCode::from(2);
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flanneld inspect: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(flannel_agent::inspect::run(&config, json)) {
        Ok(text) => {
            println!("{}", text.trim_end());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("flanneld inspect: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The agent's configuration from `args` (program name first), as the agent would check
/// it; `None` after printing why not.
fn config_from(args: Vec<std::ffi::OsString>, what: &str) -> Option<Config> {
    let cli = Cli::try_from_args(args).unwrap_or_else(|e| e.exit());
    match Config::from_cli(&cli, read_previous(&cli.subnet_file)) {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("flanneld {what}: {e}");
            None
        }
    }
}
