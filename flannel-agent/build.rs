//! Builds the eBPF programs (`flannel-ebpf`) with nightly + bpf-linker through aya-build and
//! leaves the object in `OUT_DIR`, where `backend::ebpf` embeds it. `cargo xtask setup`
//! installs the toolchain pieces; `AYA_BUILD_SKIP=1` skips this for userspace-only work.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
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
