//! Idempotent machine setup. Each step checks before it acts, so running it on a ready
//! machine costs a few process spawns.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

use crate::util;

/// bpf-linker release that links for the LLVM nightly rustc ships (see `llvm_major`).
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the build, the tests and the demo use, each with the file that is
/// actually used from it: present means installed. A neighbouring binary is not enough
/// (`protoc` without `libprotobuf-dev` cannot compile etcd-client's protos).
const PACKAGES: &[(&str, &str)] = &[
    ("etcd-server", "/usr/bin/etcd"),
    ("protobuf-compiler", "/usr/bin/protoc"),
    // etcd-client's build script imports google/protobuf/descriptor.proto.
    (
        "libprotobuf-dev",
        "/usr/include/google/protobuf/descriptor.proto",
    ),
    ("bpftool", "/usr/sbin/bpftool"),
    ("iperf3", "/usr/bin/iperf3"),
    ("iproute2", "/usr/bin/ip"),
    ("nftables", "/usr/sbin/nft"),
    ("iptables", "/usr/sbin/iptables"),
    ("containernetworking-plugins", "/usr/lib/cni/bridge"),
    ("iputils-ping", "/usr/bin/ping"),
    ("util-linux", "/usr/bin/nsenter"),
    ("ethtool", "/usr/sbin/ethtool"),
];

pub fn run() -> Result<()> {
    packages()?;
    rust_src()?;
    bpf_linker()?;
    bpffs()?;
    Ok(())
}

fn packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, file)| !Path::new(file).exists())
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages {missing:?}");
    util::run("apt-get", &["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(missing);
    // SAFETY of the env: apt must not ask questions in CI.
    let mut cmd = std::process::Command::new("apt-get");
    cmd.args(&args).env("DEBIAN_FRONTEND", "noninteractive");
    let st = cmd.status().context("running apt-get")?;
    if !st.success() {
        bail!("apt-get install failed ({st})");
    }
    Ok(())
}

fn nightly_sysroot() -> Result<PathBuf> {
    let out = util::output("rustc", &["+nightly", "--print", "sysroot"])
        .context("the nightly toolchain is needed to build the eBPF programs")?;
    Ok(PathBuf::from(out.trim()))
}

fn rust_src() -> Result<()> {
    let src = nightly_sysroot()?.join("lib/rustlib/src/rust/library/core");
    if src.exists() {
        return Ok(());
    }
    eprintln!("setup: adding rust-src to nightly (eBPF builds core with -Z build-std)");
    util::run(
        "rustup",
        &["component", "add", "rust-src", "--toolchain", "nightly"],
    )
}

/// The LLVM major version of nightly rustc, which bpf-linker must match.
fn llvm_major() -> Result<String> {
    let vv = util::output("rustc", &["+nightly", "-vV"])?;
    let version = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("rustc +nightly -vV printed no LLVM version")?;
    Ok(version.split('.').next().unwrap_or(version).to_owned())
}

fn bpf_linker() -> Result<()> {
    if util::output("bpf-linker", &["--version"]).is_ok() {
        return Ok(());
    }
    // No distribution ships the LLVM nightly uses; nightly itself does, with the C API.
    // bpf-linker links against it through an LLVM_PREFIX that holds only that library.
    let sysroot = nightly_sysroot()?;
    let lib = sysroot.join("lib");
    let libllvm = std::fs::read_dir(&lib)?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let prefix = crate::util::workspace_root().join("target/xtask/llvm-prefix");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    for name in [libllvm.as_str(), "libLLVM.so"] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&libllvm), &link)?;
    }
    let feature = format!("llvm-{}", llvm_major()?);
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against nightly's {libllvm} ({feature})"
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = std::process::Command::new(cargo)
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            &feature,
        ])
        .env("LLVM_PREFIX", &prefix)
        .status()
        .context("running cargo install bpf-linker")?;
    if !st.success() {
        bail!("cargo install bpf-linker failed ({st})");
    }
    Ok(())
}

fn bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        return Ok(());
    }
    eprintln!("setup: mounting bpffs at /sys/fs/bpf");
    util::run("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"])
}
