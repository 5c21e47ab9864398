//! flanneld entry point: parse the command line, set up logging, run the agent.
//!
//! Exit codes: 0 on a signal or a revoked lease (upstream), 1 on a fatal error, 2 on a bad
//! command line.

use std::process::ExitCode;

use flannel_agent::{agent, cli::Cli, config::Config, subnet::env_file::read_previous, telemetry};

fn main() -> ExitCode {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match args.get(1).and_then(|a| a.to_str()) {
        Some("inspect") => {
            args.remove(1);
            return inspect(args);
        }
        Some("cleanup") => {
            args.remove(1);
            return cleanup(args);
        }
        Some("mk-docker-opts") => {
            args.remove(1);
            return match flannel_agent::docker_opts::run(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(1)
                }
            };
        }
        _ => {}
    }
    let cli = Cli::from_env();
    if cli.version {
        // Upstream prints the version to stderr, alone on the first line.
        eprintln!("{}", flannel_agent::version::report(&cli.bpf_pin_path));
        return ExitCode::SUCCESS;
    }
    if let Err(e) = telemetry::init(&cli.log_filter(), cli.log_format) {
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

/// A runtime for the one-shot subcommands.
fn one_shot_runtime(what: &str) -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("flanneld {what}: starting the async runtime: {e}");
            None
        }
    }
}

/// `flanneld cleanup [agent flags]`: the flags say which pins and `subnet.env` are ours.
fn cleanup(args: Vec<std::ffi::OsString>) -> ExitCode {
    let Some(config) = config_from(args, "cleanup") else {
        return ExitCode::from(2);
    };
    let Some(runtime) = one_shot_runtime("cleanup") else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(flannel_agent::cleanup::run(&config)) {
        Ok(removed) if removed.is_empty() => {
            println!("nothing of flanneld's left on this host");
            ExitCode::SUCCESS
        }
        Ok(removed) => {
            for r in removed {
                println!("removed {r}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("flanneld cleanup: {e}");
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
    let Some(runtime) = one_shot_runtime("inspect") else {
        return ExitCode::FAILURE;
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
