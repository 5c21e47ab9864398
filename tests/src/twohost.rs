//! Two hosts on one underlay veth with a pod behind each, programmed by hand exactly as
//! upstream flannel programs the kernel (so a test or benchmark depends only on the
//! datapath under test, not on the agent), plus the eBPF loader on top when asked.

use std::{
    net::Ipv4Addr,
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use flannel_agent::backend::ebpf::{Counters, Datapath, PeerEntry, PinLayout};
use flannel_common::{
    DatapathConfig, Endpoint,
    maps::{CONFIG_F_ENABLED, CONFIG_F_FAST_INGRESS},
};
use ipnetwork::Ipv4Network;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Namespaces and pins of one test; everything goes in `Drop`.
pub struct Topology {
    pub tag: String,
    pub namespaces: Vec<String>,
    pub pins: Vec<PathBuf>,
    pub children: Vec<Child>,
}

impl Topology {
    pub fn new() -> Self {
        let tag = format!(
            "fe{}x{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        Self {
            tag,
            namespaces: Vec::new(),
            pins: Vec::new(),
            children: Vec::new(),
        }
    }

    pub fn ns(&mut self, role: &str) -> String {
        let name = format!("{}{role}", self.tag);
        sh(&format!("ip netns add {name}"));
        sh(&format!("ip -n {name} link set lo up"));
        self.namespaces.push(name.clone());
        name
    }

    pub fn pin_root(&mut self, role: &str) -> PathBuf {
        let p = PathBuf::from(format!("/sys/fs/bpf/flannel-test-{}{role}", self.tag));
        self.pins.push(p.clone());
        p
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for p in &self.pins {
            let _ = std::fs::remove_dir_all(p);
        }
        for n in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

pub fn sh(cmd: &str) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("spawn sh");
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn sh_out(cmd: &str) -> (bool, String) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("spawn sh");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

pub fn inside(ns: &str, cmd: &str) -> String {
    format!("nsenter --net=/var/run/netns/{ns} {cmd}")
}

/// One host: underlay address, pod subnet, and its pod namespace.
pub struct Host {
    pub ns: String,
    pub pod: String,
    pub underlay: Ipv4Addr,
    pub subnet: Ipv4Network,
    pub mac: [u8; 6],
}

impl Host {
    pub fn pod_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.network()) + 2)
    }
}

/// How the two hosts reach each other's pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Carrier {
    /// `flannel.1` on both, programmed as upstream's vxlan backend does (neighbour, FDB,
    /// onlink route per peer); pods get MTU 1450.
    Vxlan,
    /// A route per peer via its underlay address, as upstream's host-gw backend does; pods
    /// get the uplink MTU.
    HostGw,
}

/// Two hosts on one underlay veth, a pod behind each, `flannel.1` on both programmed as
/// upstream does (neighbour, FDB, onlink route per peer).
pub fn two_hosts(t: &mut Topology) -> (Host, Host) {
    two_hosts_with(t, Carrier::Vxlan)
}

/// Two hosts on one underlay veth, a pod behind each, connected by `carrier`.
pub fn two_hosts_with(t: &mut Topology, carrier: Carrier) -> (Host, Host) {
    let pod_mtu = if carrier == Carrier::Vxlan {
        1450
    } else {
        1500
    };
    let a = t.ns("a");
    let b = t.ns("b");
    sh(&format!("ip link add {0}u type veth peer name {0}v", t.tag));
    sh(&format!("ip link set {}u netns {a} name eth0", t.tag));
    sh(&format!("ip link set {}v netns {b} name eth0", t.tag));
    let mk = |ns: &str, idx: u8| Host {
        ns: ns.to_owned(),
        pod: String::new(),
        underlay: Ipv4Addr::new(198, 18, 0, idx),
        subnet: Ipv4Network::new(Ipv4Addr::new(10, 244, idx, 0), 24).unwrap(),
        mac: [0x02, 0x42, 0, 0, 0, idx],
    };
    let mut ha = mk(&a, 1);
    let mut hb = mk(&b, 2);
    for h in [&mut ha, &mut hb] {
        let ns = h.ns.clone();
        sh(&format!("ip -n {ns} addr add {}/24 dev eth0", h.underlay));
        sh(&format!("ip -n {ns} link set eth0 up"));
        sh(&inside(&ns, "sysctl -qw net.ipv4.ip_forward=1"));
        if carrier == Carrier::Vxlan {
            // flannel.1 exactly as upstream's vxlan backend creates it.
            sh(&format!(
                "ip -n {ns} link add flannel.1 address {} type vxlan id 1 local {} dev eth0 dstport 8472 nolearning",
                mac_str(h.mac),
                h.underlay
            ));
            sh(&format!("ip -n {ns} link set flannel.1 mtu 1450 up"));
            sh(&format!(
                "ip -n {ns} addr add {}/32 dev flannel.1",
                h.subnet.network()
            ));
        }
        // A pod: veth into its own namespace, with the MTU flannel's CNI gives it.
        let pod = t.ns(&format!("p{}", h.underlay.octets()[3]));
        sh(&format!(
            "ip -n {ns} link add veth0 mtu {pod_mtu} type veth peer name eth0 netns {pod} mtu {pod_mtu}"
        ));
        let gw = Ipv4Addr::from(u32::from(h.subnet.network()) + 1);
        sh(&format!("ip -n {ns} addr add {gw}/24 dev veth0"));
        sh(&format!("ip -n {ns} link set veth0 up"));
        sh(&format!("ip -n {pod} addr add {}/24 dev eth0", h.pod_ip()));
        sh(&format!("ip -n {pod} link set eth0 up"));
        sh(&format!("ip -n {pod} route add default via {gw}"));
        h.pod = pod;
    }
    for (me, peer) in [(&ha, &hb), (&hb, &ha)] {
        let ns = &me.ns;
        if carrier == Carrier::HostGw {
            sh(&format!(
                "ip -n {ns} route replace {} via {} dev eth0",
                peer.subnet, peer.underlay
            ));
            continue;
        }
        let net = peer.subnet.network();
        sh(&format!(
            "ip -n {ns} neigh replace {net} lladdr {} dev flannel.1 nud permanent",
            mac_str(peer.mac)
        ));
        sh(&inside(
            ns,
            &format!(
                "bridge fdb replace {} dev flannel.1 dst {} self permanent",
                mac_str(peer.mac),
                peer.underlay
            ),
        ));
        sh(&format!(
            "ip -n {ns} route replace {} via {net} dev flannel.1 onlink",
            peer.subnet
        ));
    }
    (ha, hb)
}

pub fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Run `f` inside `ns` on a dedicated thread (setns affects only that thread).
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        // SAFETY: setns on this thread only, with a valid namespace fd.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("netns thread panicked")
}

/// Load our programs on `host` (pins under `pin_root`) and point them at `peer`.
pub fn attach_ebpf(host: &Host, peer: &Host, pin_root: PathBuf) {
    attach_ebpf_with(host, peer, pin_root, false);
}

/// Like [`attach_ebpf`]; with `fast_path`, also turns on the opt-in fast path and lists the
/// host's pod in the endpoints map (what the agent learns from `cni0` on a real node).
pub fn attach_ebpf_with(host: &Host, peer: &Host, pin_root: PathBuf, fast_path: bool) {
    let endpoint = fast_path.then(|| {
        let link = |ns: &str, dev: &str| -> serde_json::Value {
            let (ok, out) = sh_out(&format!("ip -n {ns} -j link show {dev}"));
            assert!(ok, "{out}");
            serde_json::from_str::<serde_json::Value>(&out).expect("ip JSON")[0].clone()
        };
        let mac = |v: &serde_json::Value| -> [u8; 6] {
            let bytes: Vec<u8> = v["address"]
                .as_str()
                .expect("address")
                .split(':')
                .map(|b| u8::from_str_radix(b, 16).expect("hex"))
                .collect();
            bytes.try_into().expect("6 bytes")
        };
        let (veth, pod) = (link(&host.ns, "veth0"), link(&host.pod, "eth0"));
        let ifindex = u32::try_from(veth["ifindex"].as_u64().expect("ifindex")).expect("u32");
        (
            host.pod_ip(),
            Endpoint {
                ifindex,
                pod_mac: mac(&pod),
                host_mac: mac(&veth),
            },
        )
    });
    let (me, other) = (
        (host.ns.clone(), host.underlay, host.mac),
        (peer.underlay, peer.subnet, peer.mac),
    );
    in_netns(&me.0.clone(), move || {
        let mut dp: Datapath =
            flannel_agent::backend::ebpf::load(&PinLayout::new(pin_root), "flannel.1", "eth0")
                .unwrap_or_else(|e| panic!("load eBPF datapath: {e}"));
        let ifindex = |name: &str| {
            let c = std::ffi::CString::new(name).unwrap();
            // SAFETY: valid C string.
            unsafe { libc::if_nametoindex(c.as_ptr()) }
        };
        let fast = if endpoint.is_some() {
            CONFIG_F_FAST_INGRESS
        } else {
            0
        };
        dp.set_config(&DatapathConfig {
            flags: CONFIG_F_ENABLED | fast,
            vni: 1,
            port: 8472,
            sport_min: 32768,
            sport_max: 60999,
            local_ip: me.1.octets(),
            vtep_mac: me.2,
            uplink_ifindex: ifindex("eth0"),
            vxlan_ifindex: ifindex("flannel.1"),
            ttl: 64,
            ..Default::default()
        })
        .expect("set config");
        dp.upsert_peer(&PeerEntry {
            underlay: other.0,
            subnet: other.1,
            vtep_mac: other.2,
        })
        .expect("upsert peer");
        if let Some((ip, ep)) = endpoint {
            dp.set_endpoints(&[(ip, ep)].into_iter().collect())
                .expect("set endpoints");
        }
        // `dp` drops here: the pinned links and maps keep the datapath running.
    });
}

pub fn counters(host: &Host, pin_root: PathBuf) -> Counters {
    in_netns(&host.ns.clone(), move || {
        flannel_agent::backend::ebpf::open_pinned(&PinLayout::new(pin_root))
            .expect("open pinned maps")
            .counters()
            .expect("read counters")
    })
}

pub fn ping(from: &Host, to: Ipv4Addr, size: usize) -> (bool, String) {
    sh_out(&inside(
        &from.pod,
        &format!("ping -c 2 -i 0.2 -W 2 -M do -s {size} {to}"),
    ))
}

/// Bytes an iperf3 client in `from`'s pod sends to a server in `to`'s pod in 2 s.
pub fn iperf_bytes(t: &mut Topology, from: &Host, to: &Host) -> u64 {
    iperf(t, from, to, to.pod_ip(), &["-t", "2"])["end"]["sum_received"]["bytes"]
        .as_u64()
        .expect("received bytes")
}

/// Run an iperf3 server in `server`'s pod and a client in `client`'s pod towards `addr`
/// (the server pod's IP, or a service address that reaches it), with extra client
/// arguments; returns iperf3's JSON report.
pub fn iperf(
    t: &mut Topology,
    client: &Host,
    server: &Host,
    addr: Ipv4Addr,
    args: &[&str],
) -> serde_json::Value {
    iperf_ns(t, &client.pod, &server.pod, addr, args)
}

/// iperf3 between any two namespaces of the topology (pods or hosts).
pub fn iperf_ns(
    t: &mut Topology,
    client_ns: &str,
    server_ns: &str,
    addr: Ipv4Addr,
    args: &[&str],
) -> serde_json::Value {
    let srv = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{server_ns}"))
        .args(["iperf3", "-s", "-1", "-p", "5201"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 server");
    t.children.push(srv);
    std::thread::sleep(Duration::from_millis(300));
    let (ok, out) = sh_out(&inside(
        client_ns,
        &format!("iperf3 -c {addr} -p 5201 -J {}", args.join(" ")),
    ));
    assert!(ok, "iperf3 client failed: {out}");
    serde_json::from_str(&out).expect("iperf3 JSON")
}
