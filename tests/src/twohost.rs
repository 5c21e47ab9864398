//! Two hosts on one underlay veth with a pod behind each, programmed by hand exactly as
//! upstream flannel programs the kernel (so a test or benchmark depends only on the
//! datapath under test, not on the agent), plus the eBPF loader on top when asked.
//! Namespaces are [`NetNs`] guards owned by the [`Host`]s; eBPF pins belong to the caller
//! ([`crate::cluster::BpfPins`]).

use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use flannel_agent::backend::ebpf::{Counters, Datapath, PeerEntry, PinLayout, PodPrograms};
use flannel_common::{
    DatapathConfig, Endpoint,
    maps::{CONFIG_F_ENABLED, CONFIG_F_FAST_INGRESS, CONFIG_F_FLOW_CACHE},
};
use ipnetwork::Ipv4Network;

use crate::{kube_node, netns::NetNs};

/// Run a shell command in `ns`; whether it succeeded, and its stdout and stderr.
pub fn try_sh(ns: &NetNs, cmd: &str) -> (bool, String) {
    let out = ns.run(cmd);
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// One host: its namespace, underlay address, pod subnet, VTEP MAC and its pod.
pub struct Host {
    /// The pod (declared first: removed before the host).
    pub pod: NetNs,
    /// The host namespace.
    pub ns: NetNs,
    /// Underlay address on `eth0`.
    pub underlay: Ipv4Addr,
    /// Pod subnet.
    pub subnet: Ipv4Network,
    /// `flannel.1`'s MAC.
    pub mac: [u8; 6],
}

impl Host {
    /// The pod's address (`.2` of the subnet; `.1` is the host side).
    pub fn pod_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.network()) + 2)
    }

    /// Handles everything arriving on the underlay on `cpu`: [`NetNs::steer_receive_to`].
    pub fn steer_underlay_receive_to(&self, cpu: usize) {
        self.ns.steer_receive_to("eth0", cpu);
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
pub fn two_hosts() -> (Host, Host) {
    two_hosts_with(Carrier::Vxlan)
}

/// What a host is besides its carrier: how its pod hangs off it and what netfilter runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Node {
    /// The pod's veth routed directly (no bridge), no netfilter rules (no conntrack): the
    /// least a test needs.
    Bare,
    /// A node as upstream flannel's users run it: the pod behind a `cni0` bridge as the CNI
    /// bridge plugin sets it up (gateway address on the bridge, hairpin port; the kernel's
    /// `bridge-nf-call-iptables` is on in every namespace here, as kubeadm requires), and
    /// the netfilter rules of kube-proxy (iptables mode, [`kube_node::SERVICES`] Services),
    /// the kubelet and flanneld ([`kube_node::iptables_rules`]), so conntrack runs.
    Kubernetes,
}

/// Two hosts on one underlay veth, a pod behind each, connected by `carrier`.
pub fn two_hosts_with(carrier: Carrier) -> (Host, Host) {
    two_hosts_on(carrier, Node::Bare)
}

/// Two hosts on one underlay veth, a pod behind each, connected by `carrier`, each set up
/// as `node` says.
pub fn two_hosts_on(carrier: Carrier, node: Node) -> (Host, Host) {
    let pod_mtu = if carrier == Carrier::Vxlan {
        1450
    } else {
        1500
    };
    let host = |idx: u8| {
        let pod = NetNs::new(&format!("p{idx}"));
        let ns = NetNs::new(&format!("h{idx}"));
        Host {
            pod,
            ns,
            underlay: Ipv4Addr::new(198, 18, 0, idx),
            subnet: Ipv4Network::new(Ipv4Addr::new(10, 244, idx, 0), 24).expect("subnet"),
            mac: [0x02, 0x42, 0, 0, 0, idx],
        }
    };
    let (ha, hb) = (host(1), host(2));
    // The underlay: one veth, made in host a with its peer put straight into host b, so
    // nothing ever exists in the root namespace.
    ha.ns.sh(&format!(
        "ip link add eth0 type veth peer name eth0 netns {}",
        hb.ns.name()
    ));
    for h in [&ha, &hb] {
        h.ns.sh(&format!(
            "ip addr add {}/24 dev eth0 && ip link set eth0 up && sysctl -qw net.ipv4.ip_forward=1",
            h.underlay
        ));
        if carrier == Carrier::Vxlan {
            // flannel.1 exactly as upstream's vxlan backend creates it.
            h.ns.sh(&format!(
                "ip link add flannel.1 address {} type vxlan id 1 local {} dev eth0 dstport 8472 nolearning && \
                 ip link set flannel.1 mtu 1450 up && ip addr add {}/32 dev flannel.1",
                mac_str(h.mac),
                h.underlay,
                h.subnet.network()
            ));
        }
        // A pod: veth into its own namespace, with the MTU flannel's CNI gives it.
        let gw = Ipv4Addr::from(u32::from(h.subnet.network()) + 1);
        h.ns.sh(&format!(
            "ip link add veth0 mtu {pod_mtu} type veth peer name eth0 netns {pod} mtu {pod_mtu}",
            pod = h.pod.name()
        ));
        match node {
            Node::Bare => h.ns.sh(&format!(
                "ip addr add {gw}/24 dev veth0 && ip link set veth0 up"
            )),
            // As the bridge plugin does with flannel's delegate config (isGateway,
            // hairpinMode, the bridge at the pod MTU).
            Node::Kubernetes => h.ns.sh(&format!(
                "ip link add cni0 mtu {pod_mtu} type bridge && ip link set cni0 up && \
                 ip addr add {gw}/24 dev cni0 && ip link set veth0 master cni0 && \
                 ip link set veth0 type bridge_slave hairpin on && ip link set veth0 up"
            )),
        };
        if node == Node::Kubernetes {
            let rules = kube_node::iptables_rules(
                Ipv4Network::new(Ipv4Addr::new(10, 244, 0, 0), 16).expect("network"),
                h.subnet,
                kube_node::SERVICES,
            );
            let mut child =
                h.ns.command("iptables-restore")
                    .stdin(std::process::Stdio::piped())
                    .spawn()
                    .expect("spawn iptables-restore");
            std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), rules.as_bytes())
                .expect("write rules");
            drop(child.stdin.take());
            let st = child.wait().expect("iptables-restore");
            assert!(
                st.success(),
                "iptables-restore of the kube-proxy-like rules failed"
            );
        }
        h.pod.sh(&format!(
            "ip addr add {}/24 dev eth0 && ip link set eth0 up && ip route add default via {gw}",
            h.pod_ip()
        ));
    }
    for (me, peer) in [(&ha, &hb), (&hb, &ha)] {
        if carrier == Carrier::HostGw {
            me.ns.sh(&format!(
                "ip route replace {} via {} dev eth0",
                peer.subnet, peer.underlay
            ));
            continue;
        }
        let (net, mac) = (peer.subnet.network(), mac_str(peer.mac));
        me.ns.sh(&format!(
            "ip neigh replace {net} lladdr {mac} dev flannel.1 nud permanent && \
             bridge fdb replace {mac} dev flannel.1 dst {} self permanent && \
             ip route replace {} via {net} dev flannel.1 onlink",
            peer.underlay, peer.subnet
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

/// Which fast path an eBPF host runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FastPath {
    /// None: every packet takes the kernel path through netfilter.
    Off,
    /// The per-flow fast path (the agent's default): the pod programs on the host's pod
    /// veth, and a thread answering the programs' conntrack requests as the agent does.
    PerFlow,
    /// The opt-in all-flows fast path (`--ebpf-fast-path`), per-flow fast path off.
    AllFlows,
}

/// The agent's part of an eBPF host that the programs need while they run: the thread that
/// makes verified TCP flows' conntrack entries liberal. Stops when dropped.
pub struct EbpfHost {
    stop: Arc<AtomicBool>,
    server: Option<std::thread::JoinHandle<()>>,
}

impl Drop for EbpfHost {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.server.take() {
            let _ = t.join();
        }
    }
}

/// Load our programs on `host` (pins under `pin_root`), point them at `peer`, with the
/// per-flow fast path on (the agent's default).
pub fn attach_ebpf(host: &Host, peer: &Host, pin_root: &Path) -> EbpfHost {
    attach_ebpf_with(host, peer, pin_root, FastPath::PerFlow)
}

/// Like [`attach_ebpf`], with the fast path chosen: `PerFlow` also attaches the pod
/// programs to the host's pod veth; `AllFlows` lists the host's pod in the endpoints map
/// (what the agent learns from `cni0` on a real node).
pub fn attach_ebpf_with(host: &Host, peer: &Host, pin_root: &Path, mode: FastPath) -> EbpfHost {
    let endpoint = (mode == FastPath::AllFlows).then(|| {
        let link = |ns: &NetNs, dev: &str| -> serde_json::Value {
            let out = ns.sh(&format!("ip -j link show {dev}"));
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
    let (local_ip, vtep_mac) = (host.underlay, host.mac);
    let peer = PeerEntry::new(peer.underlay, peer.subnet, peer.mac);
    let layout = PinLayout::new(pin_root);
    let (uplink, vxlan) = (host.ns.ifindex("eth0"), host.ns.ifindex("flannel.1"));
    let veth = host.ns.ifindex("veth0");
    let per_flow = mode == FastPath::PerFlow;
    host.ns.enter({
        let layout = layout.clone();
        move || {
            let mut dp: Datapath = flannel_agent::backend::ebpf::load(&layout, "flannel.1", "eth0")
                .unwrap_or_else(|e| panic!("load eBPF datapath: {e}"));
            let mut flags = CONFIG_F_ENABLED;
            if endpoint.is_some() {
                flags |= CONFIG_F_FAST_INGRESS;
            }
            if per_flow {
                flags |= CONFIG_F_FLOW_CACHE;
            }
            dp.set_config(&DatapathConfig {
                flags,
                vni: 1,
                port: 8472,
                sport_min: 32768,
                sport_max: 60999,
                local_ip: local_ip.octets(),
                vtep_mac,
                uplink_ifindex: uplink,
                vxlan_ifindex: vxlan,
                ttl: 64,
                mtu: 1450,
                flow_refresh_ms: FLOW_REFRESH_MS,
                ..Default::default()
            })
            .expect("set config");
            dp.upsert_peer(&peer).expect("upsert peer");
            if let Some((ip, ep)) = endpoint {
                dp.set_endpoints(&[(ip, ep)].into_iter().collect())
                    .expect("set endpoints");
            }
            if per_flow {
                PodPrograms::load(&layout, &Default::default())
                    .and_then(|mut p| p.attach("veth0", veth))
                    .unwrap_or_else(|e| panic!("attach the pod programs: {e}"));
            }
            // `dp` drops here: the pinned links and maps keep the datapath running.
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let server = per_flow.then(|| {
        let stop = stop.clone();
        host.ns.spawn_thread(move || {
            flannel_agent::backend::ebpf::serve_flow_events(&layout, &stop)
                .unwrap_or_else(|e| panic!("flow event server: {e}"));
        })
    });
    EbpfHost { stop, server }
}

/// Count and drop what conntrack calls INVALID on `ns`'s forward path (an `inet` table:
/// both families).
pub fn count_invalid_forward(ns: &NetNs) {
    ns.sh(
        "nft 'add table inet t; add chain inet t fw { type filter hook forward priority 0; }; \
         add rule inet t fw ct state invalid counter drop'",
    );
}

/// Panic, saying `what` was going on, if `ns` dropped any packet as INVALID since
/// [`count_invalid_forward`].
pub fn assert_no_invalid_forward(ns: &NetNs, what: &str) {
    let rules = ns.sh("nft list table inet t");
    assert!(
        rules.contains("counter packets 0 bytes 0"),
        "{what}: conntrack called packets INVALID on {}: {rules}",
        ns.name()
    );
}

/// The re-check interval the harness configures (the agent's default).
pub const FLOW_REFRESH_MS: u32 = 2000;

/// The flows the per-flow fast path tracks on the datapath pinned under `pin_root`.
pub fn flows(
    pin_root: &Path,
) -> std::collections::BTreeMap<flannel_common::FlowKey, flannel_common::Flow> {
    flannel_agent::backend::ebpf::open_pinned(&PinLayout::new(pin_root))
        .expect("open pinned maps")
        .flows()
        .expect("read flows")
}

/// The counters of the datapath pinned under `pin_root` (pins are global, no namespace).
pub fn counters(pin_root: &Path) -> Counters {
    flannel_agent::backend::ebpf::open_pinned(&PinLayout::new(pin_root))
        .expect("open pinned maps")
        .counters()
        .expect("read counters")
}

/// Ping `to` from `from`'s pod with DF set and `size` bytes of payload.
pub fn ping(from: &Host, to: Ipv4Addr, size: usize) -> (bool, String) {
    try_sh(
        &from.pod,
        &format!("ping -c 2 -i 0.2 -W 2 -M do -s {size} {to}"),
    )
}

/// Bytes an iperf3 client in `from`'s pod sends to a server in `to`'s pod in 2 s.
pub fn iperf_bytes(from: &Host, to: &Host) -> u64 {
    iperf(&from.pod, &to.pod, to.pod_ip(), &["-t", "2"])["end"]["sum_received"]["bytes"]
        .as_u64()
        .expect("received bytes")
}

/// An iperf3 server in `server` (one test) and a client in `client` towards `addr` (the
/// server's address, or a service address that reaches it), with extra client arguments;
/// returns iperf3's JSON report.
pub fn iperf(
    client: &NetNs,
    server: &NetNs,
    addr: impl Into<IpAddr>,
    args: &[&str],
) -> serde_json::Value {
    iperf_on(client, server, addr, 5201, args)
}

/// [`iperf`] with the server on `port`.
pub fn iperf_on(
    client: &NetNs,
    server: &NetNs,
    addr: impl Into<IpAddr>,
    port: u16,
    args: &[&str],
) -> serde_json::Value {
    let addr = addr.into();
    let port_s = port.to_string();
    let _server = server.spawn_server("iperf3", &["-s", "-1", "-p", &port_s], port);
    let (ok, out) = try_sh(
        client,
        &format!("iperf3 -c {addr} -p {port} -J {}", args.join(" ")),
    );
    assert!(ok, "iperf3 client failed: {out}");
    serde_json::from_str(&out).expect("iperf3 JSON")
}

/// A UDP echo server on `port` in `ns` for as long as the returned guard lives.
pub struct UdpEcho {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UdpEcho {
    /// Echo every datagram to `addr:port` in `ns` back to its sender.
    pub fn start(ns: &NetNs, addr: impl Into<IpAddr>, port: u16) -> Self {
        let addr = addr.into();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = ns.spawn_thread(move || {
            let sock = std::net::UdpSocket::bind((addr, port)).expect("bind udp echo");
            sock.set_read_timeout(Some(std::time::Duration::from_millis(100)))
                .expect("timeout");
            tx.send(()).expect("ready");
            let mut buf = [0u8; 2048];
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        rx.recv().expect("udp echo started");
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What [`df_udp_probe`] saw.
#[derive(Debug)]
pub struct DfProbe {
    /// `fast()` held while small datagrams went back and forth (within 5 s).
    pub fast: bool,
    /// The path MTU the socket learnt (`IP_MTU` / `IPV6_MTU`) after the big sends.
    pub mtu: u32,
    /// How many of the 5 big DF sends the kernel accepted (the first goes out; once the
    /// frag-needed / packet-too-big is in, later ones fail with EMSGSIZE).
    pub big_sends: usize,
}

/// From inside `ns`, on one UDP socket with path-MTU discovery on (DF): small datagrams
/// to `to:port` (an echo server) until `fast()` says the flow runs on the fast path, then
/// five DF datagrams of `big` payload bytes.
pub fn df_udp_probe(
    ns: &NetNs,
    to: impl Into<IpAddr>,
    port: u16,
    big: usize,
    fast: impl Fn() -> bool + Send + 'static,
) -> DfProbe {
    use std::{os::fd::AsRawFd, time::Duration};
    let to = to.into();
    let (level, discover, do_, mtu_opt, any) = match to {
        IpAddr::V4(_) => (
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DO,
            libc::IP_MTU,
            IpAddr::from(Ipv4Addr::UNSPECIFIED),
        ),
        IpAddr::V6(_) => (
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_DO,
            libc::IPV6_MTU,
            IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED),
        ),
    };
    ns.enter(move || {
        let sock = std::net::UdpSocket::bind((any, 40_000 + port)).expect("bind");
        sock.connect((to, port)).expect("connect");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let fd = sock.as_raw_fd();
        // SAFETY: setsockopt with a valid fd and an int option.
        let rc = unsafe {
            libc::setsockopt(fd, level, discover, (&do_ as *const libc::c_int).cast(), 4)
        };
        assert_eq!(rc, 0, "MTU_DISCOVER: {}", std::io::Error::last_os_error());
        let mut buf = [0u8; 2048];
        let fast = crate::netns::wait_until(Duration::from_secs(5), || {
            let _ = sock.send(b"small");
            let _ = sock.recv(&mut buf);
            fast()
        });
        let payload = vec![7u8; big];
        let mut big_sends = 0;
        for _ in 0..5 {
            if sock.send(&payload).is_ok() {
                big_sends += 1;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut mtu: libc::c_int = 0;
        let mut len: libc::socklen_t = 4;
        // SAFETY: getsockopt into an int we own.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                level,
                mtu_opt,
                (&mut mtu as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "path MTU: {}", std::io::Error::last_os_error());
        DfProbe {
            fast,
            mtu: u32::try_from(mtu).expect("MTU"),
            big_sends,
        }
    })
}
