//! Running commands, loudly: every command is echoed before it runs and any failure stops
//! the task with the command in the error.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

/// `cargo <args>` with the cargo that runs us.
pub fn cargo(args: &[&str]) -> Result<()> {
    cargo_env(args, &[])
}

/// `cargo <args>` with extra environment variables.
pub fn cargo_env(args: &[&str], env: &[(&str, &str)]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    status(cmd)
}

/// Run a program and fail unless it succeeds.
pub fn run(program: &str, args: &[&str]) -> Result<()> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    status(cmd)
}

/// Run a program and return its stdout, failing unless it succeeds.
pub fn output(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Replace nothing, just run `bin` with `args` and propagate its exit status.
pub fn exec(bin: &Path, args: &[String]) -> Result<()> {
    let mut cmd = Command::new(bin);
    cmd.args(args);
    status(cmd)
}

/// Run a prepared command and fail unless it succeeds.
pub fn status(mut cmd: Command) -> Result<()> {
    let shown = format!("{cmd:?}").replace('"', "");
    eprintln!("+ {shown}");
    let st = cmd.status().with_context(|| format!("spawning {shown}"))?;
    if !st.success() {
        bail!("`{shown}` failed ({st})");
    }
    Ok(())
}
