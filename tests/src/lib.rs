//! Harness for flannel's privileged end-to-end tests: namespaces, etcd, agents, traffic.
//! Every resource a test creates is owned by a guard whose `Drop` removes it.

pub mod cluster;
pub mod craft;
pub mod etcd;
pub mod kube_api;
pub mod kube_cluster;
pub mod kube_node;
pub mod netns;
pub mod progs;
pub mod twohost;

/// Whether privileged tests can run. Not root: prints why and returns `false`, so the test
/// returns early — unless `FLANNEL_TEST_PRIVILEGED=1` (CI, `cargo xtask test`), where a
/// skip would hide a failure, so it panics instead.
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("FLANNEL_TEST_PRIVILEGED").as_deref() == Ok("1") {
        panic!(
            "FLANNEL_TEST_PRIVILEGED=1 but not running as root: privileged tests cannot be skipped here"
        );
    }
    eprintln!("skipped: needs root (network namespaces, eBPF); run `cargo xtask test` as root");
    false
}
