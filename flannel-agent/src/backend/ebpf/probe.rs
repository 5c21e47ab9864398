//! Can eBPF run here? Probed by looking at what the kernel offers, never by comparing
//! kernel versions; the answer is a typed reason the agent logs once.

use std::path::Path;

/// Why this host runs the kernel VXLAN fallback instead of the eBPF datapath.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FallbackReason {
    /// No bpffs where the maps and links must be pinned.
    #[error("no bpffs mounted at {path} (mount -t bpf bpf /sys/fs/bpf)")]
    NoBpffs {
        /// The directory that should be on bpffs.
        path: String,
    },
    /// The kernel exposes no BTF, which the BTF-defined maps need.
    #[error("the kernel has no BTF (/sys/kernel/btf/vmlinux missing)")]
    NoBtf,
    /// Loading a program failed: the verifier's log says why.
    #[error("loading the eBPF programs failed: {0}")]
    Load(String),
    /// Attaching a program to an interface failed (tcx needs kernel support).
    #[error("attaching {program} to {interface} failed: {error}")]
    Attach {
        /// The program.
        program: &'static str,
        /// The interface.
        interface: String,
        /// What the kernel said.
        error: String,
    },
    /// Pinned objects from an earlier run could not be reused or created.
    #[error("pinning under {path} failed: {error}")]
    Pin {
        /// The pin path.
        path: String,
        /// What went wrong.
        error: String,
    },
    /// A kernel VXLAN device the programs ride on could not be set up.
    #[error("kernel VXLAN device: {0}")]
    Device(String),
}

impl FallbackReason {
    /// A stable, low-cardinality name of the reason (for logs, readiness and metrics
    /// labels): `no_bpffs`, `no_btf`, `load`, `attach`, `pin`, `device`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NoBpffs { .. } => "no_bpffs",
            Self::NoBtf => "no_btf",
            Self::Load(_) => "load",
            Self::Attach { .. } => "attach",
            Self::Pin { .. } => "pin",
            Self::Device(_) => "device",
        }
    }
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Checks that need no program load: bpffs under `pin_root` and kernel BTF.
pub fn probe(pin_root: &Path) -> Result<(), FallbackReason> {
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(FallbackReason::NoBtf);
    }
    // The pin root may not exist yet: its closest existing ancestor must be on bpffs.
    let mut dir = pin_root;
    while !dir.exists() {
        dir = dir.parent().unwrap_or(Path::new("/"));
    }
    if !is_bpffs(dir) {
        return Err(FallbackReason::NoBpffs {
            path: pin_root.display().to_string(),
        });
    }
    Ok(())
}

fn is_bpffs(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `statfs` writes into the zeroed struct we own; `c` is a valid C string.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type == BPF_FS_MAGIC
    }
}
