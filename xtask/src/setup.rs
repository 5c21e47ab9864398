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
    // The etcd TLS tests make their CA and certificates with it.
    ("openssl", "/usr/bin/openssl"),
    // The test namespaces turn on forwarding with it.
    ("procps", "/usr/sbin/sysctl"),
    // `bpffs()` mounts with it.
    ("mount", "/usr/bin/mount"),
    // The version test checks the commit flanneld reports against the repository (a
    // minimal root, like the clean room's, has none).
    ("git", "/usr/bin/git"),
    // The metrics test scrapes the agent with a real Prometheus and lints with promtool.
    ("prometheus", "/usr/bin/prometheus"),
    ("prometheus", "/usr/bin/promtool"),
    // The CNI test builds a small libcni client (tests/cni-client) offline in GOPATH mode.
    ("golang-go", "/usr/bin/go"),
    (
        "golang-github-appc-cni-dev",
        "/usr/share/gocode/src/github.com/containernetworking/cni/libcni/api.go",
    ),
];

pub fn run() -> Result<()> {
    install_packages(PACKAGES)?;
    rust_src()?;
    bpf_linker()?;
    bpffs()?;
    Ok(())
}

/// Installs the packages whose file is missing (`apt-get`, no recommends).
pub(crate) fn install_packages(packages: &[(&str, &str)]) -> Result<()> {
    let mut missing: Vec<&str> = packages
        .iter()
        .filter(|(_, file)| !Path::new(file).exists())
        .map(|(pkg, _)| *pkg)
        .collect();
    // A package can be checked by several of its files.
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages {missing:?}");
    util::run("apt-get", &["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(missing);
    // apt must not ask questions in CI.
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

/// bpf-linker, built against nightly's libLLVM and proven to load exactly that library.
///
/// bpf-linker finds libLLVM through a RUNPATH into the `LLVM_PREFIX` it was built with, so
/// that prefix lives in cargo's home, outside any workspace (`cargo clean` or deleting a
/// clone must not break it), and is named after the libLLVM file: a nightly with another
/// LLVM gets another prefix, and the check below sees the old binary no longer matches.
fn bpf_linker() -> Result<()> {
    let lib = nightly_sysroot()?.join("lib");
    let libllvm = nightly_libllvm(&lib)?;
    let prefix = cargo_home()?.join("bpf-linker-llvm").join(&libllvm);
    // The prefix holds only the library, as symlinks: cheap to (re)create every time.
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    for name in [libllvm.as_str(), "libLLVM.so"] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&libllvm), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    let bin = cargo_home()?.join("bin/bpf-linker");
    let problem = match bpf_linker_problem(&bin, &prefix_lib.join(&libllvm)) {
        None => return Ok(()),
        Some(problem) => problem,
    };
    let feature = format!("llvm-{}", llvm_major()?);
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against nightly's {libllvm} \
         ({feature}): {problem}"
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = std::process::Command::new(cargo)
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            // An installed but broken or mismatched binary counts as installed to cargo.
            "--force",
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
    if let Some(problem) = bpf_linker_problem(&bin, &prefix_lib.join(&libllvm)) {
        bail!("bpf-linker was rebuilt but still does not work: {problem}");
    }
    Ok(())
}

/// The `libLLVM.so.*` nightly rustc ships (no distribution ships that LLVM; nightly
/// itself does, with the C API bpf-linker uses).
fn nightly_libllvm(lib: &Path) -> Result<String> {
    std::fs::read_dir(lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))
}

/// Why `bin` is not a bpf-linker we can use, or `None` when it runs, is our version and
/// the dynamic loader resolves its libLLVM to `want` (the prefix's link to nightly's).
fn bpf_linker_problem(bin: &Path, want: &Path) -> Option<String> {
    let bin_s = bin.to_string_lossy();
    let version = match util::output(&bin_s, &["--version"]) {
        Ok(v) => v,
        Err(e) => return Some(format!("{} does not run: {e:#}", bin.display())),
    };
    if version.split_whitespace().nth(1) != Some(BPF_LINKER_VERSION) {
        return Some(format!("{} is {}", bin.display(), version.trim()));
    }
    let ldd = match util::output("ldd", &[&bin_s]) {
        Ok(out) => out,
        Err(e) => return Some(format!("ldd: {e:#}")),
    };
    let loaded = resolved_libllvm(&ldd);
    if loaded.as_deref() == Some(want) {
        return None;
    }
    Some(format!(
        "it loads {} instead of {}",
        loaded.map_or_else(|| "no libLLVM".to_owned(), |p| p.display().to_string()),
        want.display()
    ))
}

/// The path `ldd` resolved libLLVM to (`libLLVM.so.X => /path (0x…)`).
fn resolved_libllvm(ldd: &str) -> Option<PathBuf> {
    ldd.lines().find_map(|line| {
        let (name, rest) = line.trim().split_once(" => ")?;
        if !name.starts_with("libLLVM") {
            return None;
        }
        let path = rest.split_whitespace().next()?;
        path.starts_with('/').then(|| PathBuf::from(path))
    })
}

/// Where `cargo install` puts binaries: `$CARGO_HOME`, else `~/.cargo`.
pub(crate) fn cargo_home() -> Result<PathBuf> {
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        return Ok(PathBuf::from(home));
    }
    let home = std::env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cargo"))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_resolution_of_libllvm() {
        let ldd = "\tlinux-vdso.so.1 (0x00007fcb027ae000)
\tlibLLVM.so.22.1-rust-1.97.0-nightly => /root/.cargo/bpf-linker-llvm/x/lib/libLLVM.so.22.1-rust-1.97.0-nightly (0x00007fcaf7c00000)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007fcaf7a1e000)
";
        assert_eq!(
            resolved_libllvm(ldd),
            Some(PathBuf::from(
                "/root/.cargo/bpf-linker-llvm/x/lib/libLLVM.so.22.1-rust-1.97.0-nightly"
            ))
        );
        let missing = "\tlibLLVM.so.22.1-rust-1.97.0-nightly => not found\n";
        assert_eq!(resolved_libllvm(missing), None);
    }
}
