//! Network namespaces for privileged tests: hosts on a shared underlay, pods behind a
//! `cni0` bridge, and helpers to run commands or Rust code inside them.
//!
//! Topology (nothing lives in the root namespace):
//!
//! ```text
//!   underlay ns: br0 ── v1 ─── eth0 (host 1, 198.18.0.1/15) ── cni0 (10.244.X.1/24) ── pods
//!                    ├─ v2 ─── eth0 (host 2, 198.18.0.2/15) ── …
//!                    └─ o1 ─── eth0 (outside, 198.18.1.1/15)
//! ```
//!
//! Every namespace is a [`NetNs`] guard (created with `ip netns add`, deleted in `Drop`;
//! deleting a namespace destroys the links in it, so no link guard is needed), every spawned
//! process a [`ChildGuard`]. Names carry the pid and a counter so parallel tests and
//! concurrent test binaries never collide. Commands enter namespaces with `nsenter --net=…`
//! (not `ip netns exec`, which remounts `/sys`), Rust code with `setns` on a fresh thread.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use ipnetwork::{Ipv4Network, Ipv6Network};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A unique short tag for names of one test's objects.
pub fn unique_tag() -> String {
    format!(
        "f{}x{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Create `<unique tag>-<role>` with loopback up.
    pub fn new(role: &str) -> Self {
        let name = format!("{}-{role}", unique_tag());
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("spawn ip netns add");
        assert!(st.success(), "ip netns add {name} failed");
        let ns = Self { name };
        ns.sh("ip link set lo up");
        ns
    }

    /// The namespace's name (under `/var/run/netns`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its bind-mount path, for `nsenter --net=` and `setns`.
    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// A `Command` that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path()))
            .arg("--")
            .arg(program);
        c
    }

    /// Run a shell command inside the namespace; returns its output whatever the status.
    pub fn run(&self, cmd: &str) -> Output {
        run_in(self, cmd)
    }

    /// Run a shell command inside the namespace, panicking with its stderr if it fails;
    /// returns stdout.
    #[track_caller]
    pub fn sh(&self, cmd: &str) -> String {
        let out = self.run(cmd);
        assert!(
            out.status.success(),
            "[{}] `{cmd}` failed ({}): {}{}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Handles everything `dev` receives on `cpu` (RPS), as a real node's NIC interrupts
    /// land on that node's own CPUs. A veth otherwise runs the receiver's whole stack on
    /// the sender's CPU, so two "hosts" on one machine would share one CPU.
    pub fn steer_receive_to(&self, dev: &str, cpu: usize) {
        // /sys shows the namespace that mounted it: mount a fresh one in a private mount
        // namespace (what `ip netns exec` does, without touching the caller's /sys).
        self.sh(&format!(
            "unshare --mount sh -c 'mount -t sysfs sysfs /sys && \
             echo {:x} > /sys/class/net/{dev}/queues/rx-0/rps_cpus'",
            1u64 << cpu
        ));
    }

    /// Spawn a long-running command inside the namespace (stdout discarded, stderr
    /// inherited so its logs show in the test output), killed when the guard drops.
    pub fn spawn(&self, program: &str, args: &[&str]) -> ChildGuard {
        let child = self
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program} in {}: {e}", self.name));
        ChildGuard::new(child)
    }

    /// Spawn a TCP server inside the namespace and return once it listens on `port`, so
    /// a client started next never races its start-up (no fixed sleep).
    pub fn spawn_server(&self, program: &str, args: &[&str], port: u16) -> ChildGuard {
        let mut child = self.spawn(program, args);
        let listening = wait_until(Duration::from_secs(10), || {
            assert!(
                child.running(),
                "{program} exited before listening on {port}"
            );
            self.listens_on(port)
        });
        assert!(
            listening,
            "{program} is not listening on port {port} after 10 s"
        );
        child
    }

    /// Whether a TCP socket (IPv4 or IPv6) listens on `port` in this namespace.
    pub fn listens_on(&self, port: u16) -> bool {
        // /proc/thread-self/net is the calling thread's namespace (/proc/self/net is the
        // main thread's). Column 2 is local address:port in hex, column 4 the state
        // (0A = LISTEN).
        let tables = self.enter(|| {
            ["tcp", "tcp6"].map(|t| {
                std::fs::read_to_string(format!("/proc/thread-self/net/{t}")).unwrap_or_default()
            })
        });
        let want = format!(":{port:04X}");
        tables.iter().flat_map(|t| t.lines().skip(1)).any(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            cols.len() > 3 && cols[1].ends_with(&want) && cols[3] == "0A"
        })
    }

    /// Run `f` on a new thread that has entered this namespace; sockets and netlink
    /// connections it opens stay bound to the namespace after it returns.
    pub fn enter<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        self.spawn_thread(f)
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// Run `f` on a new thread that has entered this namespace, without waiting for it.
    pub fn spawn_thread<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> std::thread::JoinHandle<R> {
        let path = self.path();
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns on a valid namespace fd; it only affects this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
    }

    /// Run an async block on a single-threaded runtime inside this namespace.
    pub fn block_on<F, Fut, R>(&self, f: F) -> R
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = R>,
        R: Send + 'static,
    {
        self.enter(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime")
                .block_on(f())
        })
    }

    /// Index of link `name` in this namespace.
    pub fn ifindex(&self, name: &str) -> u32 {
        // Not /sys/class/net: nsenter does not remount /sys, which shows the root namespace.
        let out = self.sh(&format!("ip -o link show dev {name}"));
        out.split(':')
            .next()
            .and_then(|i| i.trim().parse().ok())
            .unwrap_or_else(|| panic!("ifindex of {name} in {out:?}"))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let st = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        if !matches!(st, Ok(s) if s.success()) {
            eprintln!("warning: could not delete netns {}", self.name);
        }
    }
}

/// Run a shell command inside `ns` with `nsenter --net`.
pub fn run_in(ns: &NetNs, cmd: &str) -> Output {
    ns.command("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .unwrap_or_else(|e| panic!("spawn nsenter for `{cmd}`: {e}"))
}

/// A spawned process, terminated (SIGTERM, then SIGKILL after 3 s) and reaped on drop.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
}

impl ChildGuard {
    /// Guard an already spawned child.
    pub fn new(child: Child) -> Self {
        Self { child: Some(child) }
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Its exit status, once it has exited.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Send `signal` and wait up to `grace` for exit, then SIGKILL. Idempotent.
    pub fn stop(&mut self, signal: i32, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: signalling our own child, which we have not reaped yet.
            unsafe { libc::kill(pid, signal) };
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGKILL and reap (a crash, as far as the process can tell).
    pub fn kill(&mut self) {
        self.stop(libc::SIGKILL, Duration::from_secs(3));
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop(libc::SIGTERM, Duration::from_secs(3));
    }
}

/// The underlay address of host `index` (1-based): `198.18.0.<index>`.
pub fn host_ip(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, index)
}

/// The shared L2 segment: a namespace holding bridge `br0`.
#[derive(Debug)]
pub struct Underlay {
    /// The namespace with the bridge.
    pub ns: NetNs,
    ports: u32,
}

impl Underlay {
    /// Create the underlay namespace and its bridge.
    pub fn new() -> Self {
        let ns = NetNs::new("u");
        ns.sh("ip link add br0 type bridge && ip link set br0 up");
        Self { ns, ports: 0 }
    }

    /// A new namespace attached to the bridge with `eth0` = `ip`/15, forwarding enabled.
    pub fn attach(&mut self, role: &str, ip: Ipv4Addr, mtu: u32) -> NetNs {
        self.ports += 1;
        let ns = NetNs::new(role);
        let port = format!("p{}", self.ports);
        self.ns.sh(&format!(
            "ip link add {port} mtu {mtu} type veth peer name eth0 netns {peer} && \
             ip link set {port} master br0 && ip link set {port} up",
            peer = ns.name()
        ));
        ns.sh(&format!(
            "ip link set eth0 mtu {mtu} && ip addr add {ip}/15 dev eth0 && ip link set eth0 up && \
             sysctl -qw net.ipv4.ip_forward=1"
        ));
        ns
    }

    /// A host namespace: `eth0` at [`host_ip`]`(index)` with MTU 1500.
    pub fn add_host(&mut self, index: u8) -> Host {
        let ns = self.attach(&format!("h{index}"), host_ip(index), 1500);
        Host {
            ns,
            ip: host_ip(index),
            pods: Vec::new(),
        }
    }
}

impl Default for Underlay {
    fn default() -> Self {
        Self::new()
    }
}

/// The IPv6 underlay address of host `index` (1-based): `fd00:198::<index>`.
pub fn host_ip6(index: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x198, 0, 0, 0, 0, 0, u16::from(index))
}

/// The `n`th address of an IPv6 network (`n` = 1 is the gateway `::1`).
pub fn nth6(net: Ipv6Network, n: u32) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(net.network()) + u128::from(n))
}

impl Host {
    /// Dual stack on the underlay: `eth0` also gets [`host_ip6`]`(index)`/64 (no DAD, so
    /// it is usable at once) and the host forwards IPv6.
    pub fn add_ipv6(&mut self, index: u8) {
        self.ns.sh(&format!(
            "ip -6 addr add {}/64 dev eth0 nodad && sysctl -qw net.ipv6.conf.all.forwarding=1",
            host_ip6(index)
        ));
    }

    /// Give `cni0` the gateway address `::1` of `subnet6` and every pod the IPv6 address
    /// matching its IPv4 one (`::2`, `::3`, …) with a default IPv6 route via `cni0`.
    pub fn add_pod_ipv6(&mut self, subnet6: Ipv6Network) {
        let gw = nth6(subnet6, 1);
        let len = subnet6.prefix();
        self.ns
            .sh(&format!("ip -6 addr add {gw}/{len} dev cni0 nodad"));
        for (i, pod) in self.pods.iter_mut().enumerate() {
            let ip = nth6(subnet6, u32::try_from(i + 2).expect("few pods"));
            pod.ns.sh(&format!(
                "ip -6 addr add {ip}/{len} dev eth0 nodad && ip -6 route add default via {gw}"
            ));
            pod.ip6 = Some(ip);
        }
    }
}

/// A host namespace and the pods behind its `cni0`.
#[derive(Debug)]
pub struct Host {
    /// Pods, in creation order (declared first so they are dropped before the host).
    pub pods: Vec<Pod>,
    /// The host's namespace.
    pub ns: NetNs,
    /// Its underlay address.
    pub ip: Ipv4Addr,
}

/// A pod namespace: `eth0` with one address and a default route via the `cni0` gateway.
#[derive(Debug)]
pub struct Pod {
    /// The pod's namespace.
    pub ns: NetNs,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Its IPv6 address, once [`Host::add_pod_ipv6`] gave it one.
    pub ip6: Option<Ipv6Addr>,
}

impl Host {
    /// Do the node side of CNI for `count` pods: `cni0` with the subnet's `.1`, and pods at
    /// `.2`, `.3`, … with MTU `mtu` (the value from `subnet.env`).
    pub fn add_pods(&mut self, subnet: Ipv4Network, mtu: u32, count: usize) {
        let gw = nth(subnet, 1);
        self.add_cni0(mtu, gw.into(), subnet.prefix());
        for _ in 0..count {
            let n = self.pods.len() + 2;
            let ip = nth(subnet, u32::try_from(n).expect("few pods"));
            let ns = self.new_pod(&n.to_string(), mtu, gw.into(), ip.into(), subnet.prefix());
            self.pods.push(Pod { ns, ip, ip6: None });
        }
    }

    /// [`Host::add_pods`] for an IPv6-only network: `cni0` with `subnet6`'s `::1`, pods at
    /// `::2`, `::3`, … with a default IPv6 route via it and no IPv4 address (their `ip`
    /// is 0.0.0.0).
    pub fn add_pods_v6_only(&mut self, subnet6: Ipv6Network, mtu: u32, count: usize) {
        let gw = nth6(subnet6, 1);
        self.add_cni0(mtu, gw.into(), subnet6.prefix());
        for _ in 0..count {
            let n = self.pods.len() + 2;
            let ip6 = nth6(subnet6, u32::try_from(n).expect("few pods"));
            let ns = self.new_pod(&n.to_string(), mtu, gw.into(), ip6.into(), subnet6.prefix());
            self.pods.push(Pod {
                ns,
                ip: Ipv4Addr::UNSPECIFIED,
                ip6: Some(ip6),
            });
        }
    }

    /// Delete pod `index` (its namespace and veth) and at once create another with the same
    /// IP, on a new veth: what a pod restart with a sticky IP looks like to the node.
    pub fn replace_pod(&mut self, index: usize, subnet: Ipv4Network, mtu: u32) {
        let ip = self.pods[index].ip;
        // The old pod goes first (and its veth with its namespace), as a deleted pod does.
        drop(self.pods.remove(index));
        let ns = self.new_pod(
            &format!("r{index}"),
            mtu,
            nth(subnet, 1).into(),
            ip.into(),
            subnet.prefix(),
        );
        self.pods.insert(index, Pod { ns, ip, ip6: None });
    }

    /// `cni0` with MTU `mtu` and the gateway address `gw`/`len`, before the host's first
    /// pod.
    fn add_cni0(&self, mtu: u32, gw: IpAddr, len: u8) {
        if self.pods.is_empty() {
            self.ns.sh(&format!(
                "ip link add cni0 mtu {mtu} type bridge && {} && ip link set cni0 up",
                addr_add(gw, len, "cni0")
            ));
        }
    }

    /// One pod's namespace, plugged into `cni0` on `veth<id>`: `eth0` with MTU `mtu`,
    /// address `ip`/`len` and a default route via `gw`.
    fn new_pod(&self, id: &str, mtu: u32, gw: IpAddr, ip: IpAddr, len: u8) -> NetNs {
        let ns = NetNs::new(&format!(
            "{}p{id}",
            self.ns.name().rsplit('-').next().unwrap_or("h")
        ));
        self.ns.sh(&format!(
            "ip link add veth{id} mtu {mtu} type veth peer name eth0 netns {pod} && \
             ip link set veth{id} master cni0 && ip link set veth{id} up",
            pod = ns.name()
        ));
        ns.sh(&format!(
            "ip link set eth0 mtu {mtu} && {} && ip link set eth0 up && \
             ip route add default via {gw}",
            addr_add(ip, len, "eth0")
        ));
        ns
    }
}

/// The `ip addr add` of `addr`/`len` on `dev`; IPv6 skips DAD so the address is usable at
/// once.
fn addr_add(addr: IpAddr, len: u8, dev: &str) -> String {
    match addr {
        IpAddr::V4(_) => format!("ip addr add {addr}/{len} dev {dev}"),
        IpAddr::V6(_) => format!("ip -6 addr add {addr}/{len} dev {dev} nodad"),
    }
}

/// The `n`th address of `net`.
pub fn nth(net: Ipv4Network, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) + n)
}

/// Poll `f` every 100 ms until it returns `true` or `timeout` passes; returns whether it did.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The kernel state a VXLAN/host-gw backend owns in `ns`, as `ip`/`bridge` print it
/// (device details, neighbours, FDB, main-table routes), for before/after comparisons.
pub fn kernel_state(ns: &NetNs, device: &str) -> String {
    let mut s = String::new();
    let have_dev = ns.run(&format!("ip link show {device}")).status.success();
    if have_dev {
        s.push_str(&ns.sh(&format!(
            "ip -d -o link show {device} | sed 's/ state [A-Z]*//'"
        )));
        // IPv4 only: the kernel-made IPv6 link-local address flips "tentative" during DAD.
        s.push_str(&ns.sh(&format!("ip -o -4 addr show dev {device}")));
        s.push_str(&ns.sh(&format!("ip neigh show dev {device}")));
        s.push_str(&ns.sh(&format!("bridge fdb show dev {device}")));
    }
    s.push_str(&ns.sh("ip route show table main"));
    s.push_str(&ns.sh("ip nexthop show"));
    s
}

/// A TCP listener bound inside `ns` (accept from any thread; `accept()` reports the peer
/// address as the listener's namespace sees it, i.e. after any NAT).
pub fn listen_in(ns: &NetNs, ip: impl Into<IpAddr>, port: u16) -> std::net::TcpListener {
    let ip = ip.into();
    ns.enter(move || std::net::TcpListener::bind((ip, port)))
        .unwrap_or_else(|e| panic!("bind {ip}:{port}: {e}"))
}

/// A TCP connection opened from inside `ns` (3 s timeout).
pub fn connect_from(
    ns: &NetNs,
    ip: impl Into<IpAddr>,
    port: u16,
) -> std::io::Result<std::net::TcpStream> {
    let ip = ip.into();
    ns.enter(move || {
        std::net::TcpStream::connect_timeout(&(ip, port).into(), Duration::from_secs(3))
    })
}

/// The source address `to`'s listener sees for a connection from `from`.
pub fn seen_source(
    from: &NetNs,
    listener: &std::net::TcpListener,
    to: Ipv4Addr,
    port: u16,
) -> std::net::IpAddr {
    let _conn = connect_from(from, to, port).unwrap_or_else(|e| panic!("connect {to}:{port}: {e}"));
    let (_, peer) = listener.accept().expect("accept");
    peer.ip()
}
