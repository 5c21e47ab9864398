//! The small things upstream users rely on, through the real binaries: `flanneld
//! --version`, `--log-format=json`, `flanneld mk-docker-opts`, and the image's
//! `iptables-wrapper` choosing the backend that holds the node's rules.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
};

use flannel_e2e::{cluster::flanneld_bin, netns::NetNs, require_root};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

#[test]
fn version_prints_version_commit_and_ebpf_features() {
    let out = Command::new(flanneld_bin())
        .arg("--version")
        .output()
        .expect("flanneld --version");
    assert!(out.status.success());
    // Upstream prints to stderr, the version alone on the first line.
    let text = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], env!("CARGO_PKG_VERSION"), "{text}");
    // A commit of this repository (the binary may predate the latest commit).
    let commit = lines[1]
        .strip_prefix("git commit: ")
        .unwrap_or_else(|| panic!("{text}"))
        .trim_end_matches("-dirty");
    assert!(commit.len() >= 7, "{text}");
    let known = Command::new("git")
        .args(["cat-file", "-e", &format!("{commit}^{{commit}}")])
        .current_dir(repo())
        .status()
        .expect("git");
    assert!(
        known.success(),
        "{commit} is not a commit of this repository"
    );
    assert!(text.contains("kernel BTF: "), "{text}");
    assert!(
        text.contains("eBPF datapath (pins under /sys/fs/bpf/flannel): "),
        "{text}"
    );
}

#[test]
fn log_format_json_writes_one_json_object_per_line() {
    // Nothing listens on port 9 of a fresh namespace's loopback: the agent logs its start
    // and its first etcd retry, then is stopped.
    if !require_root() {
        return;
    }
    let ns = NetNs::new("logjson");
    ns.sh("ip link set lo up");
    let mut child = ns
        .command(&flanneld_bin().to_string_lossy())
        .args([
            "--log-format=json",
            "--etcd-endpoints=http://127.0.0.1:9",
            "--log-level=info",
        ])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn flanneld");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = lines.next().expect("a log line").expect("read");
    let _ = child.kill();
    let _ = child.wait();
    let v: serde_json::Value =
        serde_json::from_str(&first).unwrap_or_else(|e| panic!("{first:?} is not JSON: {e}"));
    assert_eq!(v["level"], "INFO", "{v}");
    assert_eq!(v["fields"]["message"], "starting flanneld", "{v}");
    assert!(v["timestamp"].is_string(), "{v}");
}

#[test]
fn mk_docker_opts_writes_docker_options_from_subnet_env() {
    let dir = tempfile::tempdir().unwrap();
    let env = dir.path().join("subnet.env");
    std::fs::write(
        &env,
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out_file = dir.path().join("docker_opts.env");
        let st = Command::new(flanneld_bin())
            .arg("mk-docker-opts")
            .arg("-f")
            .arg(&env)
            .arg("-d")
            .arg(&out_file)
            .args(args)
            .env_remove("DOCKER_OPTS")
            .env_remove("DOCKER_NETWORK_OPTIONS")
            .status()
            .expect("flanneld mk-docker-opts");
        assert!(st.success());
        std::fs::read_to_string(&out_file).unwrap()
    };
    assert_eq!(
        run(&[]),
        "DOCKER_OPT_BIP=\"--bip=10.244.7.1/24\"\nDOCKER_OPT_IPMASQ=\"--ip-masq=false\"\n\
         DOCKER_OPT_MTU=\"--mtu=1450\"\nDOCKER_OPTS=\" --bip=10.244.7.1/24 --ip-masq=false --mtu=1450 \"\n"
    );
    // Upstream README's systemd drop-in form.
    assert_eq!(
        run(&["-k", "DOCKER_NETWORK_OPTIONS", "-c", "-m"]),
        "DOCKER_NETWORK_OPTIONS=\" --bip=10.244.7.1/24 --mtu=1450 \"\n"
    );
}

/// The wrapper with its links in a scratch sbin directory, inside `ns`.
fn wrapper(ns: &NetNs, sbin: &Path, args: &str) -> String {
    ns.sh(&format!(
        "IPTABLES_WRAPPER_SBIN={} {}/deploy/iptables-wrapper {args}",
        sbin.display(),
        repo().display()
    ))
    .trim()
    .to_owned()
}

#[test]
fn iptables_wrapper_follows_the_backend_holding_the_rules() {
    if !require_root() {
        return;
    }
    let ns = NetNs::new("ipwrap");
    let sbin = tempfile::tempdir().unwrap();
    let script = repo().join("deploy/iptables-wrapper");
    for name in [
        "iptables",
        "iptables-save",
        "iptables-restore",
        "ip6tables",
        "ip6tables-save",
        "ip6tables-restore",
    ] {
        std::os::unix::fs::symlink(&script, sbin.path().join(name)).unwrap();
    }
    // An empty node: nft.
    assert_eq!(wrapper(&ns, sbin.path(), "detect"), "nft");
    // kube-proxy in legacy mode left its rules: legacy.
    ns.sh("iptables-legacy -t nat -N KUBE-SERVICES && iptables-legacy -t nat -A PREROUTING -j KUBE-SERVICES && iptables-legacy -t nat -A OUTPUT -j KUBE-SERVICES");
    assert_eq!(wrapper(&ns, sbin.path(), "detect"), "legacy");
    // The first real call through a link installs the mode and runs the real binary.
    let listed = ns.sh(&format!(
        "IPTABLES_WRAPPER_SBIN={dir} {dir}/iptables -t nat -S",
        dir = sbin.path().display()
    ));
    assert!(
        listed.contains("-A PREROUTING -j KUBE-SERVICES"),
        "{listed}"
    );
    let target = std::fs::read_link(sbin.path().join("iptables-restore")).unwrap();
    assert!(
        target.ends_with("iptables-legacy-restore"),
        "{}",
        target.display()
    );
    // The kubelet's hint chain wins over rule counts.
    ns.sh("iptables-nft -t mangle -N KUBE-IPTABLES-HINT");
    assert_eq!(wrapper(&ns, sbin.path(), "detect"), "nft");
}
