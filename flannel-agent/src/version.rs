//! `flanneld --version`: the version (alone on the first line, as upstream prints it), the
//! git commit it was built from, and what this host offers the eBPF datapath.

use std::path::Path;

/// The crate version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit (`build.rs`; `unknown` when built outside a checkout).
pub const GIT_COMMIT: &str = env!("FLANNEL_GIT_COMMIT");

/// The whole `--version` text, probing the host for `pin_root`.
pub fn report(pin_root: &Path) -> String {
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    let ebpf = match crate::backend::ebpf::probe(pin_root) {
        Ok(()) => "available (programs are loaded and attached with tcx at start)".to_owned(),
        Err(reason) => format!("unavailable: {reason}"),
    };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    format!(
        "{VERSION}\ngit commit: {GIT_COMMIT}\nkernel: {kernel}\nkernel BTF: {}\neBPF datapath (pins under {}): {ebpf}",
        if btf { "yes" } else { "no" },
        pin_root.display(),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn version_comes_first_then_commit_and_features() {
        let dir = tempfile::tempdir().unwrap();
        let text = super::report(dir.path());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], env!("CARGO_PKG_VERSION"));
        assert!(lines[1].starts_with("git commit: "), "{text}");
        assert!(lines[1].len() > "git commit: ".len(), "{text}");
        // A tempdir is not on bpffs: the probe says so.
        assert!(
            text.contains("eBPF datapath (pins under") && text.contains("unavailable: "),
            "{text}"
        );
    }
}
