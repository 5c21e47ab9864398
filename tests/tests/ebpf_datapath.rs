//! The eBPF datapath carrying real traffic between two host namespaces, one running our
//! programs on top of a kernel `flannel.1`, the other a plain kernel `flannel.1` (the Linux
//! VXLAN driver as the interop peer): pings and TSO-sized TCP in both directions, MTU
//! behaviour, and counters proving which path the packets took.
//!
//! The kernel side is programmed here by hand with `ip`, exactly as upstream flannel's
//! vxlan backend programs it, so this test depends only on the datapath and the loader.

use std::{
    net::Ipv4Addr,
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use flannel_agent::backend::ebpf::{Datapath, PeerEntry, PinLayout};
use flannel_common::{DatapathConfig, maps::CONFIG_F_ENABLED};
use ipnetwork::Ipv4Network;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Namespaces and pins of one test; everything goes in `Drop`.
struct Topology {
    tag: String,
    namespaces: Vec<String>,
    pins: Vec<PathBuf>,
    children: Vec<Child>,
}

impl Topology {
    fn new() -> Self {
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

    fn ns(&mut self, role: &str) -> String {
        let name = format!("{}{role}", self.tag);
        sh(&format!("ip netns add {name}"));
        sh(&format!("ip -n {name} link set lo up"));
        self.namespaces.push(name.clone());
        name
    }

    fn pin_root(&mut self, role: &str) -> PathBuf {
        let p = PathBuf::from(format!("/sys/fs/bpf/flannel-test-{}{role}", self.tag));
        self.pins.push(p.clone());
        p
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

fn sh(cmd: &str) {
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

fn sh_out(cmd: &str) -> (bool, String) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("spawn sh");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn inside(ns: &str, cmd: &str) -> String {
    format!("nsenter --net=/var/run/netns/{ns} {cmd}")
}

/// One host: underlay address, pod subnet, and its pod namespace.
struct Host {
    ns: String,
    pod: String,
    underlay: Ipv4Addr,
    subnet: Ipv4Network,
    mac: [u8; 6],
}

impl Host {
    fn pod_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.network()) + 2)
    }
}

/// Two hosts on one underlay veth, a pod behind each, `flannel.1` on both programmed as
/// upstream does (neighbour, FDB, onlink route per peer).
fn two_hosts(t: &mut Topology) -> (Host, Host) {
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
        // A pod: veth into its own namespace, MTU 1450 like flannel's CNI gives it.
        let pod = t.ns(&format!("p{}", h.underlay.octets()[3]));
        sh(&format!(
            "ip -n {ns} link add veth0 mtu 1450 type veth peer name eth0 netns {pod} mtu 1450"
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

fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Run `f` inside `ns` on a dedicated thread (setns affects only that thread).
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
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
fn attach_ebpf(host: &Host, peer: &Host, pin_root: PathBuf) {
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
        dp.set_config(&DatapathConfig {
            flags: CONFIG_F_ENABLED,
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
        // `dp` drops here: the pinned links and maps keep the datapath running.
    });
}

fn counters(host: &Host, pin_root: PathBuf) -> flannel_agent::backend::ebpf::Counters {
    in_netns(&host.ns.clone(), move || {
        flannel_agent::backend::ebpf::load(&PinLayout::new(pin_root), "flannel.1", "eth0")
            .expect("reopen datapath")
            .counters()
            .expect("read counters")
    })
}

fn ping(from: &Host, to: Ipv4Addr, size: usize) -> (bool, String) {
    sh_out(&inside(
        &from.pod,
        &format!("ping -c 2 -i 0.2 -W 2 -M do -s {size} {to}"),
    ))
}

/// Bytes an iperf3 client in `from`'s pod sends to a server in `to`'s pod in 2 s.
fn iperf_bytes(t: &mut Topology, from: &Host, to: &Host) -> u64 {
    let server = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", to.pod))
        .args(["iperf3", "-s", "-1", "-p", "5201"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 server");
    t.children.push(server);
    std::thread::sleep(Duration::from_millis(300));
    let (ok, out) = sh_out(&inside(
        &from.pod,
        &format!("iperf3 -c {} -p 5201 -t 2 -J", to.pod_ip()),
    ));
    assert!(ok, "iperf3 client failed: {out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("iperf3 JSON");
    v["end"]["sum_received"]["bytes"]
        .as_u64()
        .expect("received bytes")
}

#[test]
fn ebpf_host_and_kernel_vxlan_host_exchange_pod_traffic_both_ways() {
    if !flannel_e2e::require_root() {
        return;
    }
    let mut t = Topology::new();
    let (a, b) = two_hosts(&mut t);
    let pins = t.pin_root("a");
    attach_ebpf(&a, &b, pins.clone());

    let (ok, out) = ping(&a, b.pod_ip(), 56);
    assert!(ok, "ping eBPF pod → kernel pod: {out}");
    let (ok, out) = ping(&b, a.pod_ip(), 56);
    assert!(ok, "ping kernel pod → eBPF pod: {out}");

    // TSO-sized bursts: a GSO metadata bug shows here (0.3 Mbit/s), never with ping.
    let sent = iperf_bytes(&mut t, &a, &b);
    assert!(
        sent > 20_000_000,
        "eBPF → kernel TCP moved only {sent} bytes in 2 s"
    );
    let back = iperf_bytes(&mut t, &b, &a);
    assert!(
        back > 20_000_000,
        "kernel → eBPF TCP moved only {back} bytes in 2 s"
    );

    let c = counters(&a, pins);
    eprintln!("eBPF host counters after {sent} bytes out, {back} bytes in: {c:#?}");
    let peer = c.peers.get(&b.underlay).copied().unwrap_or_default();
    assert!(peer.tx_packets > 100, "encap must carry A's traffic: {c:?}");
    assert!(peer.tx_bytes > 20_000_000, "encapsulated bytes: {c:?}");
    // B → A: small packets are decapsulated by the program, aggregates by the kernel.
    assert!(
        peer.rx_packets > 0,
        "decap must carry some of B's traffic: {c:?}"
    );
    assert_eq!(
        c.drops.values().map(|d| d.packets).sum::<u64>(),
        0,
        "no drops: {c:?}"
    );
}

#[test]
fn pod_mtu_is_respected_and_oversized_df_packets_get_frag_needed() {
    if !flannel_e2e::require_root() {
        return;
    }
    let mut t = Topology::new();
    let (a, b) = two_hosts(&mut t);
    let pins = t.pin_root("a");
    attach_ebpf(&a, &b, pins);
    // 1422 bytes of ICMP payload + 28 = 1450, the pod MTU.
    let (ok, out) = ping(&a, b.pod_ip(), 1422);
    assert!(ok, "a 1450-byte DF packet must cross: {out}");
    // Pod MTU is 1450, so a larger DF packet can't even leave the pod; send it from the
    // host instead, whose route via flannel.1 carries MTU 1450: the kernel answers with
    // frag-needed.
    let (ok, out) = sh_out(&inside(
        &a.ns,
        &format!(
            "ping -c 1 -W 2 -M do -s 1423 -I {} {}",
            a.subnet.network(),
            b.pod_ip()
        ),
    ));
    assert!(!ok, "an oversized DF packet must not cross: {out}");
    assert!(
        out.contains("message too long") || out.contains("mtu=1450") || out.contains("Frag needed"),
        "expected a frag-needed/EMSGSIZE report, got: {out}"
    );
}

#[test]
fn both_hosts_on_ebpf_and_traffic_survives_replacing_the_programs() {
    if !flannel_e2e::require_root() {
        return;
    }
    let mut t = Topology::new();
    let (a, b) = two_hosts(&mut t);
    let (pa, pb) = (t.pin_root("a"), t.pin_root("b"));
    attach_ebpf(&a, &b, pa.clone());
    attach_ebpf(&b, &a, pb.clone());
    let sent = iperf_bytes(&mut t, &a, &b);
    assert!(
        sent > 20_000_000,
        "eBPF ↔ eBPF TCP moved only {sent} bytes in 2 s"
    );

    // A restarted agent loads the programs again: the pinned links are updated in place
    // and the maps reused, so the peer is still there without being re-added.
    in_netns(&a.ns.clone(), {
        let pa = pa.clone();
        move || {
            let before = attached_ids();
            let dp = flannel_agent::backend::ebpf::load(&PinLayout::new(pa), "flannel.1", "eth0")
                .expect("reload");
            assert_eq!(
                dp.current_peers().expect("peers").len(),
                1,
                "maps survived the reload"
            );
            let after = attached_ids();
            // Replaced in place, not added: one program per hook, and a new one.
            assert_eq!(
                after.0.len(),
                1,
                "one program on flannel.1 egress: {after:?}"
            );
            assert_eq!(after.1.len(), 1, "one program on eth0 ingress: {after:?}");
            assert_ne!(before, after, "the reload must swap in the new programs");
        }
    });
    let (ok, out) = ping(&a, b.pod_ip(), 56);
    assert!(ok, "traffic after the reload: {out}");
    let c = counters(&a, pa);
    assert!(c.peers[&b.underlay].tx_packets > 0);
}

/// Program ids attached (tcx) to flannel.1 egress and eth0 ingress in this namespace.
fn attached_ids() -> (Vec<u32>, Vec<u32>) {
    use aya::programs::{SchedClassifier, TcAttachType};
    let ids = |dev, dir| {
        SchedClassifier::query_tcx(dev, dir)
            .expect("query tcx")
            .1
            .iter()
            .map(|p| p.id())
            .collect::<Vec<_>>()
    };
    (
        ids("flannel.1", TcAttachType::Egress),
        ids("eth0", TcAttachType::Ingress),
    )
}
