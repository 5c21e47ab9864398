//! The `flannel` CNI plugin driven the way a container runtime drives it: `CNI_*`
//! environment, netconf on stdin, result on stdout, delegating to Debian's real `bridge`
//! and `host-local` plugins. The "host" is a network namespace made here, the pod another;
//! host-local keeps its store in a temp dir so /var/lib/cni is never touched.
//!
//! Needs the plugin built first: `cargo build -p flannel-agent --bin flannel`.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use flannel_e2e::{netns::NetNs, require_root};
use serde_json::{Value, json};

const CNI_PATH: &str = "/usr/lib/cni";

/// `target/<profile>/flannel`, next to this test's `deps/` directory.
fn plugin_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let bin = dir.join("flannel");
    assert!(
        bin.is_file(),
        "{} missing: run `cargo build -p flannel-agent --bin flannel` first",
        bin.display()
    );
    bin
}

struct Invocation {
    ok: bool,
    stdout: Value,
    stderr: String,
}

/// Runs the plugin inside `host` with the runtime's environment.
fn cni(
    host: &NetNs,
    command: &str,
    container: &str,
    pod: Option<&NetNs>,
    conf: &Value,
) -> Invocation {
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", host.path()))
        .arg("--")
        .arg(plugin_binary())
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", pod.map(NetNs::path).unwrap_or_default())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", CNI_PATH)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the flannel plugin");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = if out.stdout.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{command}: stdout is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    };
    Invocation {
        ok: out.status.success(),
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

struct Setup {
    host: NetNs,
    pod: NetNs,
    tmp: tempfile::TempDir,
    third_octet: u8,
}

impl Setup {
    fn new() -> Self {
        let host = NetNs::new("cnihost");
        let pod = NetNs::new("cnipod");
        let tmp = tempfile::tempdir().unwrap();
        // A per-process subnet so concurrent runs would not look alike in logs.
        let third_octet = (std::process::id() % 200) as u8 + 10;
        std::fs::write(
            tmp.path().join("subnet.env"),
            format!(
                "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.{third_octet}.1/24\n\
                 FLANNEL_MTU=1400\nFLANNEL_IPMASQ=true\n"
            ),
        )
        .unwrap();
        Self {
            host,
            pod,
            tmp,
            third_octet,
        }
    }

    fn ipam_dir(&self) -> PathBuf {
        self.tmp.path().join("ipam")
    }

    fn data_dir(&self) -> PathBuf {
        self.tmp.path().join("flannel")
    }

    /// The flannel entry of the stock conflist, with temp paths.
    fn conf(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "name": "cbr0",
            "type": "flannel",
            "subnetFile": self.tmp.path().join("subnet.env"),
            "dataDir": self.data_dir(),
            "ipam": { "dataDir": self.ipam_dir() },
            "delegate": { "hairpinMode": true, "isDefaultGateway": true },
        })
    }
}

fn ip_json(ns: &NetNs, args: &str) -> Value {
    serde_json::from_str(&ns.sh(&format!("ip -j {args}"))).unwrap()
}

#[test]
fn add_check_del_with_real_bridge_and_host_local() {
    if !require_root() {
        return;
    }
    let s = Setup::new();
    let subnet = format!("10.244.{}.0/24", s.third_octet);
    let gateway = format!("10.244.{}.1", s.third_octet);
    let cid = "ctr-one";

    let add = cni(&s.host, "ADD", cid, Some(&s.pod), &s.conf("1.0.0"));
    assert!(add.ok, "ADD failed: {} {}", add.stdout, add.stderr);
    assert_eq!(add.stdout["cniVersion"], "1.0.0");
    let addr = add.stdout["ips"][0]["address"].as_str().unwrap().to_owned();
    let ip = addr.split('/').next().unwrap().to_owned();
    let net: ipnetwork::Ipv4Network = subnet.parse().unwrap();
    assert!(net.contains(ip.parse().unwrap()), "{addr} not in {subnet}");
    assert_eq!(add.stdout["ips"][0]["gateway"], gateway.as_str());

    // Inside the pod: the address, the MTU from subnet.env, the cluster route via the
    // bridge, and a default route (isDefaultGateway).
    let links = ip_json(&s.pod, "addr show dev eth0");
    assert_eq!(links[0]["mtu"], 1400, "{links}");
    assert!(
        links[0]["addr_info"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["local"] == ip.as_str() && a["prefixlen"] == 24),
        "{links}"
    );
    let routes = ip_json(&s.pod, "route show");
    assert!(
        routes
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["dst"] == "10.244.0.0/16" && r["gateway"] == gateway.as_str()),
        "{routes}"
    );
    assert!(
        routes
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["dst"] == "default" && r["gateway"] == gateway.as_str()),
        "{routes}"
    );
    // The host side: cni0 carries FLANNEL_SUBNET's address, and the pod reaches it.
    let bridge = ip_json(&s.host, "addr show dev cni0");
    assert!(
        bridge[0]["addr_info"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["local"] == gateway.as_str()),
        "{bridge}"
    );
    s.pod.sh(&format!("ping -c 1 -W 2 {gateway}"));

    // The rendered delegate config was stored for DEL, with flannel's choices.
    let stored: Value =
        serde_json::from_slice(&std::fs::read(s.data_dir().join(cid)).unwrap()).unwrap();
    assert_eq!(stored["type"], "bridge");
    assert_eq!(stored["ipMasq"], false);
    assert_eq!(stored["mtu"], 1400);
    assert_eq!(stored["isGateway"], true);
    assert_eq!(stored["hairpinMode"], true);
    assert_eq!(stored["ipam"]["ranges"], json!([[{ "subnet": subnet }]]));
    assert_eq!(
        stored["ipam"]["routes"],
        json!([{ "dst": "10.244.0.0/16" }])
    );
    // host-local recorded the allocation in our temp store.
    let lease_file = s.ipam_dir().join("cbr0").join(&ip);
    assert!(lease_file.is_file(), "{} missing", lease_file.display());

    // CHECK (with the runtime's prevResult) and VERSION answer; CHECK of a container
    // flannel never set up is an error.
    let mut check_conf = s.conf("1.0.0");
    check_conf["prevResult"] = add.stdout.clone();
    let check = cni(&s.host, "CHECK", cid, Some(&s.pod), &check_conf);
    assert!(check.ok, "CHECK failed: {} {}", check.stdout, check.stderr);
    let check = cni(&s.host, "CHECK", "ctr-unknown", Some(&s.pod), &check_conf);
    assert!(!check.ok);
    assert!(
        check.stdout["msg"]
            .as_str()
            .unwrap()
            .contains("ctr-unknown"),
        "{}",
        check.stdout
    );
    let version = cni(
        &s.host,
        "VERSION",
        "",
        None,
        &json!({ "cniVersion": "1.0.0" }),
    );
    assert!(version.ok);
    assert_eq!(
        version.stdout["supportedVersions"],
        json!(["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0"])
    );

    // DEL releases the IP and the interface, and forgets the container; again is fine.
    let del = cni(&s.host, "DEL", cid, Some(&s.pod), &s.conf("1.0.0"));
    assert!(del.ok, "DEL failed: {} {}", del.stdout, del.stderr);
    assert!(!lease_file.exists(), "host-local still holds {ip}");
    assert!(!s.data_dir().join(cid).exists());
    assert!(!s.pod.run("ip link show dev eth0").status.success());
    let again = cni(&s.host, "DEL", cid, Some(&s.pod), &s.conf("1.0.0"));
    assert!(again.ok, "second DEL failed: {}", again.stdout);
}

#[test]
fn old_cni_version_and_errors() {
    if !require_root() {
        return;
    }
    let s = Setup::new();
    // 0.3.1, as in the stock kube-flannel conflist: the result comes back in 0.3.1 form.
    let add = cni(&s.host, "ADD", "ctr-old", Some(&s.pod), &s.conf("0.3.1"));
    assert!(add.ok, "ADD 0.3.1 failed: {} {}", add.stdout, add.stderr);
    assert_eq!(add.stdout["cniVersion"], "0.3.1");
    assert!(
        add.stdout["ips"][0]["address"]
            .as_str()
            .unwrap()
            .starts_with("10.244.")
    );
    let del = cni(&s.host, "DEL", "ctr-old", Some(&s.pod), &s.conf("0.3.1"));
    assert!(del.ok, "DEL failed: {}", del.stdout);

    // No subnet.env (flanneld not up yet): a CNI error saying where to look, exit non-zero.
    std::fs::remove_file(s.tmp.path().join("subnet.env")).unwrap();
    let add = cni(&s.host, "ADD", "ctr-early", Some(&s.pod), &s.conf("1.0.0"));
    assert!(!add.ok);
    assert_eq!(add.stdout["code"], 11, "{}", add.stdout);
    assert_eq!(add.stdout["cniVersion"], "1.0.0");
    let msg = add.stdout["msg"].as_str().unwrap();
    assert!(
        msg.contains("subnet.env") && msg.contains("flannel pod"),
        "{msg}"
    );

    // Unsupported version and a delegate naming flannel's reserved keys.
    let bad = cni(&s.host, "ADD", "ctr-bad", Some(&s.pod), &s.conf("9.0.0"));
    assert!(!bad.ok);
    assert_eq!(bad.stdout["code"], 1, "{}", bad.stdout);
    let mut conf = s.conf("1.0.0");
    conf["delegate"]["ipam"] = json!({});
    let bad = cni(&s.host, "ADD", "ctr-bad", Some(&s.pod), &conf);
    assert!(!bad.ok);
    assert_eq!(bad.stdout["code"], 7, "{}", bad.stdout);
}

#[test]
fn dual_stack_add_gives_both_families() {
    if !require_root() {
        return;
    }
    let s = Setup::new();
    let o = s.third_octet;
    std::fs::write(
        s.tmp.path().join("subnet.env"),
        format!(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.{o}.1/24\n\
             FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:{o:x}::1/64\n\
             FLANNEL_MTU=1400\nFLANNEL_IPMASQ=true\n"
        ),
    )
    .unwrap();
    let add = cni(&s.host, "ADD", "ctr-dual", Some(&s.pod), &s.conf("1.0.0"));
    assert!(add.ok, "ADD failed: {} {}", add.stdout, add.stderr);
    let ips: Vec<&str> = add.stdout["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["address"].as_str().unwrap())
        .collect();
    assert_eq!(ips.len(), 2, "{ips:?}");
    assert!(ips[0].starts_with(&format!("10.244.{o}.")), "{ips:?}");
    assert!(
        ips[1].starts_with(&format!("fd00:10:244:{o:x}::")),
        "{ips:?}"
    );
    let v6 = ips[1].split('/').next().unwrap();
    let addrs = ip_json(&s.pod, "-6 addr show dev eth0");
    assert!(
        addrs[0]["addr_info"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["local"] == v6),
        "{addrs}"
    );
    let routes = ip_json(&s.pod, "-6 route show");
    assert!(
        routes
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["dst"] == "fd00:10:244::/56"),
        "{routes}"
    );
    let del = cni(&s.host, "DEL", "ctr-dual", Some(&s.pod), &s.conf("1.0.0"));
    assert!(del.ok, "DEL failed: {}", del.stdout);
    let store = s.ipam_dir().join("cbr0");
    let left: Vec<_> = std::fs::read_dir(&store)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.iter().all(|n| {
            let n = n.to_string_lossy();
            !n.starts_with("10.") && !n.starts_with("fd00")
        }),
        "host-local still holds {left:?}"
    );
}

/// The whole node story: real agents on the eBPF datapath write `subnet.env`; the runtime
/// calls our plugin on host 1 for a new pod; that pod reaches a pod on host 2 (and back),
/// and DEL gives its address back to host-local.
#[test]
fn a_pod_added_by_the_plugin_reaches_a_pod_on_another_host() {
    if !require_root() {
        return;
    }
    let pins = flannel_e2e::cluster::BpfPins::new("test", 2);
    let mut c = flannel_e2e::cluster::Cluster::start_each(
        2,
        &flannel_e2e::cluster::net_conf(r#"{"Type":"vxlan"}"#),
        |i| vec!["--dataplane=ebpf".into(), pins.arg(i)],
    );
    let env1 = c.nodes[0].wait_subnet_env(std::time::Duration::from_secs(30));
    let env2 = c.nodes[1].wait_subnet_env(std::time::Duration::from_secs(30));
    c.nodes[1].host.add_pods(env2.subnet, env2.mtu, 1);
    let remote = c.nodes[1].host.pods[0].ip;

    let tmp = tempfile::tempdir().unwrap();
    let conf = json!({
        "cniVersion": "1.0.0",
        "name": "cbr0",
        "type": "flannel",
        "subnetFile": c.nodes[0].subnet_file,
        "dataDir": tmp.path().join("flannel"),
        "ipam": { "dataDir": tmp.path().join("ipam") },
        "delegate": { "hairpinMode": true, "isDefaultGateway": true },
    });
    let pod = NetNs::new("cnix");
    let host = &c.nodes[0].host.ns;
    let add = cni(host, "ADD", "cross-host-pod", Some(&pod), &conf);
    assert!(add.ok, "ADD failed: {} {}", add.stdout, add.stderr);
    let ip: ipnetwork::Ipv4Network = add.stdout["ips"][0]["address"]
        .as_str()
        .expect("an address")
        .parse()
        .expect("IPv4 CIDR");
    assert!(
        env1.subnet.contains(ip.ip()),
        "{ip} outside {}",
        env1.subnet
    );
    let mtu = ip_json(&pod, "link show eth0")[0]["mtu"].as_u64();
    assert_eq!(mtu, Some(u64::from(env1.mtu)), "pod MTU from subnet.env");

    let ok = flannel_e2e::netns::wait_until(std::time::Duration::from_secs(15), || {
        pod.run(&format!("ping -c 1 -W 1 {remote}"))
            .status
            .success()
    });
    assert!(ok, "the new pod cannot reach {remote}\n{}", c.logs());
    c.nodes[1].host.pods[0]
        .ns
        .sh(&format!("ping -c 1 -W 2 {}", ip.ip()));

    let del = cni(host, "DEL", "cross-host-pod", Some(&pod), &conf);
    assert!(del.ok, "DEL failed: {}", del.stderr);
    let lease_file = tmp.path().join("ipam/cbr0").join(ip.ip().to_string());
    assert!(!lease_file.exists(), "host-local still holds {}", ip.ip());
}
