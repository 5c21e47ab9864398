//! Builds the eBPF programs (`flannel-ebpf`) with nightly + bpf-linker through aya-build and
//! leaves the object in `OUT_DIR`, where `backend::ebpf` embeds it. `cargo xtask setup`
//! installs the toolchain pieces; `AYA_BUILD_SKIP=1` skips this for userspace-only work.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    git_commit();
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "flannel-ebpf")
        .ok_or_else(|| anyhow!("flannel-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("flannel-ebpf manifest has no parent directory"))?;
    let package = aya_build::Package {
        name: ebpf.name.as_str(),
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}

/// `FLANNEL_GIT_COMMIT` for `flanneld --version`: `git rev-parse --short HEAD` (with
/// `-dirty` when the tree has changes), or `unknown` outside a git checkout (a source
/// tarball, an image build without `.git`).
#[allow(
    clippy::disallowed_methods,
    reason = "a build script asking git for the commit; the rule is about the agent"
)]
fn git_commit() {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).map_or_else(
        || "unknown".to_owned(),
        |c| match git(&["status", "--porcelain", "--untracked-files=no"]) {
            Some(s) if !s.is_empty() => format!("{c}-dirty"),
            _ => c,
        },
    );
    println!("cargo:rustc-env=FLANNEL_GIT_COMMIT={commit}");
    // Re-run when HEAD moves (a worktree's HEAD lives in its own git dir).
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        println!("cargo:rerun-if-changed={dir}/HEAD");
        println!("cargo:rerun-if-changed={dir}/index");
    }
    // …and when the branch it points at moves (the ref lives in the common git dir).
    if let (Some(common), Some(branch)) = (
        git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]),
        git(&["symbolic-ref", "-q", "HEAD"]),
    ) {
        println!("cargo:rerun-if-changed={common}/{branch}");
    }
}
