//! `cargo xtask`: what a developer or CI runs. Setup is code, not prose: every command that
//! needs the eBPF toolchain or the test packages installs what is missing first.
//! Building is cargo's job (flannel-agent's build.rs builds the eBPF object); this only
//! orchestrates.

mod clean_room;
mod setup;
mod util;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "flannel developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what is missing: rust-src for nightly, bpf-linker, Debian packages; mount
    /// bpffs. Idempotent.
    Setup,
    /// Build the agent, the CNI plugin and the eBPF programs.
    Build,
    /// Build, then run flanneld (as root) with the given arguments.
    Run {
        /// Arguments for flanneld, after `--`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Every check and test: rustfmt, clippy -D warnings, unit tests, privileged tests.
    Test {
        /// Extra arguments for the test binaries (e.g. a name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The main job: a three-host cluster in network namespaces with a local etcd, two
    /// hosts on eBPF and one on the kernel fallback, pods on each; prints the connectivity
    /// matrix and the peers with their counters; tears everything down on exit or Ctrl-C.
    Demo {
        /// Arguments for the demo (`--no-wait` exits right after printing).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Side-by-side datapath benchmark: eBPF VXLAN, kernel VXLAN, host-gw and the bare
    /// underlay, interleaved rounds, medians and ratios. With `--control-plane` first: the
    /// control-plane benchmark instead (N peer leases in etcd, one release agent per
    /// datapath; `--sizes 100,1000,5000,10000`).
    Bench {
        /// Arguments for the benchmark (--rounds N, --seconds S, --transactions N, --cc NAME,
        /// --placement per-host|shared, --modes ebpf,kernel,host-gw,underlay[,all-flows]).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The README's two commands (`demo --no-wait`, then `test`) in a fresh minimal Debian
    /// root of this release, from a clone of HEAD with an empty cargo home: proves setup
    /// installs everything. Needs root and Debian's archive; removes all it made on exit.
    CleanRoom {
        /// Stop after the build and the unit tests (`cargo xtask build`, `cargo test
        /// --lib --bins`).
        #[arg(long)]
        quick: bool,
    },
    /// Dump the pinned maps with bpftool.
    Maps {
        /// The agent's --bpf-pin-path.
        #[arg(long, default_value = flannel_common::names::DEFAULT_PIN_ROOT)]
        pin_path: PathBuf,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = util::workspace_root();
    std::env::set_current_dir(&root)?;
    match cli.command {
        Command::Setup => setup::run(),
        Command::Build => {
            setup::run()?;
            util::cargo(&["build", "--bins"])
        }
        Command::Run { args } => {
            setup::run()?;
            util::cargo(&["build", "--bins"])?;
            let bin = root.join("target/debug/flanneld");
            util::exec(&bin, &args)
        }
        Command::Test { args } => {
            setup::run()?;
            test(&args)
        }
        Command::Demo { args } => {
            setup::run()?;
            util::cargo(&["build", "--bins"])?;
            util::exec(&root.join("target/debug/demo"), &args)
        }
        Command::Bench { args } => {
            setup::run()?;
            util::cargo(&["build", "--bins"])?;
            match args.split_first() {
                Some((first, rest)) if first == "--control-plane" => {
                    // The agent as the DaemonSet ships it.
                    util::cargo(&["build", "--release", "--bin", "flanneld"])?;
                    let mut cmd = std::process::Command::new(root.join("target/debug/cpbench"));
                    cmd.args(rest)
                        .env("FLANNELD_BIN", root.join("target/release/flanneld"));
                    util::status(cmd)
                }
                _ => util::exec(&root.join("target/debug/bench"), &args),
            }
        }
        Command::CleanRoom { quick } => clean_room::run(quick),
        Command::Maps { pin_path } => maps(&pin_path),
    }
}

/// The whole suite, in the order that fails fastest.
fn test(extra: &[String]) -> Result<()> {
    util::cargo(&["fmt", "--all", "--check"])?;
    util::cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
    // The eBPF crate only builds for the BPF target, with nightly (via the rustup proxy).
    util::run(
        "cargo",
        &[
            "+nightly",
            "clippy",
            "-p",
            "flannel-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--release",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    // Binaries first: the end-to-end tests run the real flanneld and flannel CNI plugin.
    // Every cargo call here selects the same packages and targets (default members, all
    // targets, dev-dependencies included), so features unify the same way and nothing is
    // rebuilt between steps.
    util::cargo(&["build", "--all-targets"])?;
    // One test at a time: the privileged tests share two cores and the kernel, and timing
    // stays honest. `--no-fail-fast`: one failing test binary must not hide the others'
    // results (cargo still exits non-zero).
    let mut args = vec!["test", "--no-fail-fast", "--", "--test-threads=1"];
    args.extend(extra.iter().map(String::as_str));
    util::cargo_env(&args, &[("FLANNEL_TEST_PRIVILEGED", "1")])
}

fn maps(pin_path: &std::path::Path) -> Result<()> {
    let dir = pin_path
        .join(flannel_common::names::LAYOUT_VERSION)
        .join("maps");
    for entry in std::fs::read_dir(&dir)
        .map_err(|e| anyhow::anyhow!("no pinned maps under {}: {e}", dir.display()))?
    {
        let path = entry?.path();
        println!("== {}", path.display());
        util::run(
            "bpftool",
            &["map", "dump", "pinned", &path.to_string_lossy()],
        )?;
    }
    Ok(())
}
