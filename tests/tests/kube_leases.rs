//! The Kubernetes subnet manager against a real HTTP API server (in-process, see
//! `flannel_e2e::kube_api`): the real `kube` client lists, watches and patches Node objects.
//! Unprivileged: only a TCP socket on 127.0.0.1.

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use flannel_agent::{
    lease::{BackendAttrs, Lease, LeaseAttrs, LeaseEvent, VxlanBackendData},
    subnet::{
        SubnetManager,
        kube::{KubeSubnetManager, Retry},
    },
};
use flannel_e2e::kube_api::KubeApi;
use futures::{StreamExt as _, stream::BoxStream};
use tokio_util::sync::CancellationToken;

const P: &str = "flannel.alpha.coreos.com/";
const NET_CONF: &str = r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}"#;

/// Everything the agent logged in this test process (tests assert on warnings).
static LOG: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

struct Capture;

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOG.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logged() -> String {
    String::from_utf8_lossy(&LOG.lock().unwrap()).into_owned()
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "flannel_agent=debug".into()),
        )
        .with_ansi(false)
        .with_writer(|| Capture)
        .try_init();
}

struct Fixture {
    api: KubeApi,
    _dir: tempfile::TempDir,
    net_conf: PathBuf,
}

async fn fixture() -> Fixture {
    init_tracing();
    let api = KubeApi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let net_conf = dir.path().join("net-conf.json");
    std::fs::write(&net_conf, NET_CONF).unwrap();
    Fixture {
        api,
        _dir: dir,
        net_conf,
    }
}

const FAST: Retry = Retry {
    interval: Duration::from_millis(100),
    timeout: Duration::from_secs(3),
};

async fn manager(f: &Fixture, node: &str) -> KubeSubnetManager {
    KubeSubnetManager::with_retry(
        f.api.client(),
        node.into(),
        &f.net_conf,
        "flannel.alpha.coreos.com",
        FAST,
    )
    .await
    .unwrap()
}

fn vtep(mac: &str) -> VxlanBackendData {
    VxlanBackendData {
        vni: 1,
        vtep_mac: mac.parse().unwrap(),
    }
}

fn attrs(ip: [u8; 4], mac: &str) -> LeaseAttrs {
    LeaseAttrs::vxlan(Ipv4Addr::from(ip), vtep(mac))
}

async fn next(
    stream: &mut BoxStream<'static, flannel_agent::subnet::Result<LeaseEvent>>,
) -> LeaseEvent {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a lease event within 10 s")
        .expect("the lease stream does not end")
        .expect("lease events are not errors")
}

/// Waits for an event matching `pred`, skipping others (e.g. our own re-announcements).
async fn wait_for(
    stream: &mut BoxStream<'static, flannel_agent::subnet::Result<LeaseEvent>>,
    what: &str,
    pred: impl Fn(&LeaseEvent) -> bool,
) -> LeaseEvent {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let ev = tokio::time::timeout_at(deadline, stream.next())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .expect("stream ends")
            .expect("no errors");
        if pred(&ev) {
            return ev;
        }
    }
}

/// `node-a` takes its lease and watches; the first snapshot holds only its own lease
/// (every other node in the fixture is broken or not a flannel node).
async fn node_a_watching_alone(
    f: &Fixture,
) -> (
    KubeSubnetManager,
    BoxStream<'static, flannel_agent::subnet::Result<LeaseEvent>>,
) {
    let a = manager(f, "node-a").await;
    a.acquire_lease(&attrs([198, 18, 0, 1], "0a:00:00:00:00:01"))
        .await
        .unwrap();
    let mut watch = a.watch_leases();
    let LeaseEvent::Snapshot(snap) = next(&mut watch).await else {
        panic!("snapshot first");
    };
    assert_eq!(subnets(&snap), ["10.244.1.0/24"]);
    (a, watch)
}

fn subnets(leases: &[Lease]) -> Vec<String> {
    leases.iter().map(|l| l.subnets().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_see_each_other_and_removal() {
    let f = fixture().await;
    f.api.add_node("node-a", &["10.244.1.0/24"]);
    f.api.add_node("node-b", &["10.244.2.0/24"]);
    let a = manager(&f, "node-a").await;
    let b = manager(&f, "node-b").await;

    let lease_a = a
        .acquire_lease(&attrs([198, 18, 0, 1], "0a:00:00:00:00:01"))
        .await
        .unwrap();
    assert_eq!(lease_a.subnets().to_string(), "10.244.1.0/24");
    assert_eq!(lease_a.attrs.public_ip, Ipv4Addr::new(198, 18, 0, 1));

    // b starts watching before it has published: the snapshot holds only a.
    let mut watch_b = b.watch_leases();
    let LeaseEvent::Snapshot(snap) = next(&mut watch_b).await else {
        panic!("first event must be a snapshot");
    };
    assert_eq!(subnets(&snap), ["10.244.1.0/24"]);
    assert_eq!(
        snap[0].attrs.backend.data_json().unwrap(),
        r#"{"VNI":1,"VtepMAC":"0a:00:00:00:00:01"}"#
    );
    assert_eq!(snap[0].attrs.public_ip, Ipv4Addr::new(198, 18, 0, 1));

    let mut watch_a = a.watch_leases();
    let LeaseEvent::Snapshot(snap) = next(&mut watch_a).await else {
        panic!("first event must be a snapshot");
    };
    assert_eq!(subnets(&snap), ["10.244.1.0/24"]);

    let lease_b = b
        .acquire_lease(&attrs([198, 18, 0, 2], "0a:00:00:00:00:02"))
        .await
        .unwrap();
    assert_eq!(lease_b.subnets().to_string(), "10.244.2.0/24");
    // a learns about b through the watch.
    let ev = wait_for(
        &mut watch_a,
        "b added",
        |e| matches!(e, LeaseEvent::Added(l) if l.subnets().to_string() == "10.244.2.0/24"),
    )
    .await;
    let LeaseEvent::Added(seen) = ev else {
        unreachable!()
    };
    assert_eq!(seen.attrs, lease_b.attrs);
    // b sees its own lease too (the agent's lease watcher filters it by subnet).
    wait_for(
        &mut watch_b,
        "own lease",
        |e| matches!(e, LeaseEvent::Added(l) if l.subnets().to_string() == "10.244.2.0/24"),
    )
    .await;

    // A heartbeat-like change that does not touch flannel's annotations is silent; the
    // deletion of b is reported as Removed with b's lease.
    f.api
        .annotate("node-b", &[("unrelated.example.com/x", Some("1"))]);
    f.api.delete_node("node-b");
    let ev = next(&mut watch_a).await;
    assert_eq!(ev, LeaseEvent::Removed(seen));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotations_have_upstream_names_and_values_via_status_patch() {
    let f = fixture().await;
    f.api.add_node("node-a", &["10.244.1.0/24"]);
    f.api.annotate(
        "node-a",
        &[
            (&format!("{P}public-ip-overwrite"), Some("198.19.0.77")),
            (&format!("{P}node-public-ip"), Some("198.18.0.99")),
        ],
    );
    let a = manager(&f, "node-a").await;
    assert_eq!(a.node_public_ip(), Some(Ipv4Addr::new(198, 18, 0, 99)));
    let lease = a
        .acquire_lease(&attrs([198, 18, 0, 1], "0a:00:00:00:00:01"))
        .await
        .unwrap();
    // Peers are told the overwrite, and the lease says what they are told: the agent's
    // own-lease watch compares it with the node (the detected address would read as a
    // hijack).
    assert_eq!(lease.attrs.public_ip, Ipv4Addr::new(198, 19, 0, 77));
    let ann = f.api.annotations("node-a");
    assert_eq!(ann[&format!("{P}kube-subnet-manager")], "true");
    assert_eq!(ann[&format!("{P}backend-type")], "vxlan");
    assert_eq!(
        ann[&format!("{P}backend-data")],
        r#"{"VNI":1,"VtepMAC":"0a:00:00:00:00:01"}"#
    );
    assert_eq!(ann[&format!("{P}public-ip")], "198.19.0.77");
    assert!(!ann.contains_key(&format!("{P}backend-v6-data")));

    let patches = f.api.patches();
    assert_eq!(patches.len(), 1, "{patches:?}");
    assert_eq!(patches[0].path, "nodes/node-a/status");
    assert_eq!(
        patches[0].content_type,
        "application/strategic-merge-patch+json"
    );
    assert!(patches[0].body.get("spec").is_none());

    // Re-acquiring with the same attrs patches nothing.
    a.acquire_lease(&attrs([198, 18, 0, 1], "0a:00:00:00:00:01"))
        .await
        .unwrap();
    assert_eq!(f.api.patches().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_unavailable_cleared_on_complete() {
    let f = fixture().await;
    f.api.add_node("node-a", &["10.244.1.0/24"]);
    let a = manager(&f, "node-a").await;
    let lease = a
        .acquire_lease(&attrs([198, 18, 0, 1], "0a:00:00:00:00:01"))
        .await
        .unwrap();
    let cancel = CancellationToken::new();
    let task = {
        let cancel = cancel.clone();
        async move { a.complete_lease(&lease, cancel).await }
    };
    let handle = tokio::spawn(task);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let cond = loop {
        let node = f.api.node("node-a").unwrap();
        let conds = node.status.unwrap().conditions.unwrap();
        let c = conds
            .into_iter()
            .find(|c| c.type_ == "NetworkUnavailable")
            .unwrap();
        if c.status == "False" {
            break c;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition never cleared"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(cond.reason.as_deref(), Some("FlannelIsUp"));
    assert_eq!(
        cond.message.as_deref(),
        Some("Flannel is running on this node")
    );
    assert!(cond.last_transition_time.is_some());
    // The Ready condition was merged by type, not replaced.
    let node = f.api.node("node-a").unwrap();
    assert!(
        node.status
            .unwrap()
            .conditions
            .unwrap()
            .iter()
            .any(|c| c.type_ == "Ready")
    );
    // complete_lease keeps running until cancelled.
    assert!(!handle.is_finished());
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(5), handle)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_unmanaged_nodes_are_skipped() {
    let f = fixture().await;
    f.api.add_node("node-a", &["10.244.1.0/24"]);
    f.api.add_node("bad-ip", &["10.244.3.0/24"]);
    f.api.annotate(
        "bad-ip",
        &[
            (&format!("{P}kube-subnet-manager"), Some("true")),
            (&format!("{P}backend-type"), Some("vxlan")),
            (
                &format!("{P}backend-data"),
                Some(r#"{"VNI":1,"VtepMAC":"0a:00:00:00:00:03"}"#),
            ),
            (&format!("{P}public-ip"), Some("300.1.2.3")),
        ],
    );
    f.api.add_node("bad-json", &["10.244.4.0/24"]);
    f.api.annotate(
        "bad-json",
        &[
            (&format!("{P}kube-subnet-manager"), Some("true")),
            (&format!("{P}backend-type"), Some("vxlan")),
            (&format!("{P}backend-data"), Some("{VNI")),
            (&format!("{P}public-ip"), Some("198.18.0.4")),
        ],
    );
    f.api.add_node("no-cidr", &[]);
    f.api.annotate(
        "no-cidr",
        &[
            (&format!("{P}kube-subnet-manager"), Some("true")),
            (&format!("{P}backend-type"), Some("vxlan")),
            (
                &format!("{P}backend-data"),
                Some(r#"{"VNI":1,"VtepMAC":"0a:00:00:00:00:05"}"#),
            ),
            (&format!("{P}public-ip"), Some("198.18.0.5")),
        ],
    );
    f.api.add_node("unmanaged", &["10.244.6.0/24"]);
    f.api.annotate(
        "unmanaged",
        &[(&format!("{P}public-ip"), Some("198.18.0.6"))],
    );

    let (_a, mut watch) = node_a_watching_alone(&f).await;

    // A broken update to a new node is skipped; fixing it makes it appear.
    f.api
        .annotate("bad-ip", &[(&format!("{P}public-ip"), Some("198.18.0.3"))]);
    let ev = next(&mut watch).await;
    assert!(
        matches!(&ev, LeaseEvent::Added(l) if l.subnets().to_string() == "10.244.3.0/24"),
        "{ev:?}"
    );
    // Breaking a known node's data keeps its last good lease (no event), and the stream
    // keeps going: the next valid change still arrives.
    f.api
        .annotate("bad-ip", &[(&format!("{P}backend-data"), Some("[1,2"))]);
    f.api.annotate(
        "bad-json",
        &[(
            &format!("{P}backend-data"),
            Some(r#"{"VNI":1,"VtepMAC":"0a:00:00:00:00:04"}"#),
        )],
    );
    let ev = next(&mut watch).await;
    assert!(
        matches!(&ev, LeaseEvent::Added(l) if l.subnets().to_string() == "10.244.4.0/24"),
        "{ev:?}"
    );
    // Taking flannel off a known node removes it.
    f.api
        .annotate("bad-ip", &[(&format!("{P}kube-subnet-manager"), None)]);
    let ev = next(&mut watch).await;
    assert!(
        matches!(&ev, LeaseEvent::Removed(l) if l.subnets().to_string() == "10.244.3.0/24"),
        "{ev:?}"
    );
}

/// #12 items 5 and 7 in kube mode: nodes whose leases must not be routed (pod CIDR
/// outside `Network`, public IP 0.0.0.0 / 127.0.0.1 / 224.0.0.1) and one with 1 MiB of
/// garbage backend data are skipped and warned about once each — not again on a relist —
/// with the value truncated, while a valid node next to them still arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_leases_are_skipped_logged_once_truncated() {
    let f = fixture().await;
    f.api.add_node("node-a", &["10.244.1.0/24"]);
    let peer =
        |name: &str, cidr: &str, ip: &str, data: &str| f.api.add_flannel_node(name, cidr, ip, data);
    let data = r#"{"VNI":1,"VtepMAC":"0a:00:00:00:00:09"}"#;
    let garbage = "{".repeat(1 << 20);
    let bad = [
        ("inv-outside", "10.245.7.0/24", "198.18.0.7", data),
        ("inv-zero", "10.244.8.0/24", "0.0.0.0", data),
        ("inv-loopback", "10.244.9.0/24", "127.0.0.1", data),
        ("inv-multicast", "10.244.10.0/24", "224.0.0.1", data),
        (
            "inv-garbage",
            "10.244.11.0/24",
            "198.18.0.11",
            garbage.as_str(),
        ),
    ];
    for (name, cidr, ip, data) in bad {
        peer(name, cidr, ip, data);
    }
    let (_a, mut watch) = node_a_watching_alone(&f).await;

    // A relist converts every node again; a valid node joining meanwhile still arrives.
    // (Let the watch get established first, or there is nothing to expire.)
    let quiet = tokio::time::timeout(Duration::from_millis(1200), watch.next()).await;
    assert!(quiet.is_err(), "no lease events while idle: {quiet:?}");
    let lists_before = f.api.list_count();
    f.api.expire_watches(|_| {});
    wait_for(&mut watch, "snapshot after relist", |e| {
        matches!(e, LeaseEvent::Snapshot(_))
    })
    .await;
    assert!(f.api.list_count() > lists_before, "the watcher relisted");
    peer("inv-good", "10.244.12.0/24", "198.18.0.12", data);
    let ev = wait_for(
        &mut watch,
        "the valid node",
        |e| matches!(e, LeaseEvent::Added(l) if l.subnets().to_string() == "10.244.12.0/24"),
    )
    .await;
    assert!(matches!(ev, LeaseEvent::Added(_)));

    let log = logged();
    for (name, _, _, _) in bad {
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("skipping node") && l.contains(&format!("node {name}:")))
            .collect();
        assert_eq!(lines.len(), 1, "{name} warned once:\n{}", lines.join("\n"));
        assert!(
            lines[0].len() < 2000,
            "{name}: a {}-byte line",
            lines[0].len()
        );
    }
    assert!(
        log.lines()
            .any(|l| l.contains("node inv-garbage:") && l.contains("(1048576 bytes)")),
        "garbage not quoted truncated"
    );
    for (name, why) in [
        ("inv-outside", "outside the cluster network"),
        ("inv-zero", "PublicIP 0.0.0.0"),
        ("inv-loopback", "PublicIP 127.0.0.1"),
        ("inv-multicast", "PublicIP 224.0.0.1"),
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains(&format!("node {name}:")) && l.contains(why)),
            "{name}: no warning naming {why:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_mid_watch_relists_without_losing_a_change() {
    let f = fixture().await;
    f.api.add_node("node-a", &["10.244.1.0/24"]);
    f.api.add_node("node-b", &["10.244.2.0/24"]);
    let a = manager(&f, "node-a").await;
    let b = manager(&f, "node-b").await;
    a.acquire_lease(&attrs([198, 18, 0, 1], "0a:00:00:00:00:01"))
        .await
        .unwrap();
    b.acquire_lease(&attrs([198, 18, 0, 2], "0a:00:00:00:00:02"))
        .await
        .unwrap();

    let mut watch = a.watch_leases();
    let LeaseEvent::Snapshot(snap) = next(&mut watch).await else {
        panic!("snapshot first");
    };
    assert_eq!(subnets(&snap), ["10.244.1.0/24", "10.244.2.0/24"]);
    // Keep polling for a while so the watch is established and idle: only bookmarks flow,
    // and they produce no lease events.
    let quiet = tokio::time::timeout(Duration::from_millis(1200), watch.next()).await;
    assert!(quiet.is_err(), "no lease events while idle: {quiet:?}");
    let watches_before = f.api.watch_count();
    assert!(watches_before > 0);
    assert!(
        f.api.bookmarks_sent() > 0,
        "the client asked for bookmarks and got them"
    );
    let lists_before = f.api.list_count();

    // While the watch is being expired, b moves to a new VTEP MAC and a third node joins;
    // neither change is in the (compacted) history, so only a relist can reveal them.
    f.api.add_node("node-c", &["10.244.3.0/24"]);
    f.api.expire_watches(|api| {
        api.annotate(
            "node-b",
            &[(
                &format!("{P}backend-data"),
                Some(r#"{"VNI":1,"VtepMAC":"0a:00:00:00:00:22"}"#),
            )],
        );
        api.annotate(
            "node-c",
            &[
                (&format!("{P}kube-subnet-manager"), Some("true")),
                (&format!("{P}backend-type"), Some("vxlan")),
                (
                    &format!("{P}backend-data"),
                    Some(r#"{"VNI":1,"VtepMAC":"0a:00:00:00:00:03"}"#),
                ),
                (&format!("{P}public-ip"), Some("198.18.0.3")),
            ],
        );
    });
    let ev = wait_for(&mut watch, "snapshot after relist", |e| {
        matches!(e, LeaseEvent::Snapshot(_))
    })
    .await;
    let LeaseEvent::Snapshot(snap) = ev else {
        unreachable!()
    };
    assert!(f.api.list_count() > lists_before, "the watcher relisted");
    assert_eq!(
        subnets(&snap),
        ["10.244.1.0/24", "10.244.2.0/24", "10.244.3.0/24"]
    );
    let b_lease = snap
        .iter()
        .find(|l| l.subnet == Some("10.244.2.0/24".parse().unwrap()))
        .unwrap();
    assert_eq!(
        b_lease.attrs.backend.data_json().unwrap(),
        r#"{"VNI":1,"VtepMAC":"0a:00:00:00:00:22"}"#
    );

    // And the watch keeps working after the relist.
    f.api.delete_node("node-c");
    let ev = wait_for(&mut watch, "c removed", |e| {
        matches!(e, LeaseEvent::Removed(_))
    })
    .await;
    assert!(matches!(&ev, LeaseEvent::Removed(l) if l.subnets().to_string() == "10.244.3.0/24"));
    assert!(
        f.api.watch_count() > watches_before,
        "a new watch followed the relist"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_cidr_outside_network_fails_naming_both() {
    let f = fixture().await;
    f.api.add_node("node-x", &["10.99.1.0/24"]);
    let x = manager(&f, "node-x").await;
    let err = x
        .acquire_lease(&attrs([198, 18, 0, 9], "0a:00:00:00:00:09"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("10.244.0.0/16") && err.contains("10.99.1.0/24"),
        "{err}"
    );
    assert!(f.api.patches().is_empty());

    // A node without a pod CIDR is waited for, then reported by name.
    f.api.add_node("node-y", &[]);
    let y = manager(&f, "node-y").await;
    let err = y
        .acquire_lease(&attrs([198, 18, 0, 10], "0a:00:00:00:00:0a"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("node-y") && err.contains("pod cidr not assigned"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_from_kubeconfig_and_url_flags() {
    use flannel_agent::subnet::kube::{ClientOptions, client_from_options};
    let f = fixture().await;
    f.api.add_node("node-k", &["10.244.7.0/24"]);
    let kubeconfig = f._dir.path().join("kubeconfig");
    f.api.write_kubeconfig(&kubeconfig).unwrap();
    for opts in [
        ClientOptions {
            api_url: None,
            kubeconfig: Some(kubeconfig.clone()),
        },
        ClientOptions {
            api_url: Some(f.api.url()),
            kubeconfig: None,
        },
    ] {
        let client = client_from_options(&opts).await.unwrap();
        let m = KubeSubnetManager::with_retry(
            client,
            "node-k".into(),
            &f.net_conf,
            "flannel.alpha.coreos.com",
            FAST,
        )
        .await
        .unwrap();
        let cfg = m.network_config().await.unwrap();
        assert_eq!(cfg.network.unwrap().to_string(), "10.244.0.0/16");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_watch_resumes_without_relist() {
    let f = fixture().await;
    f.api.add_node("node-a", &["10.244.1.0/24"]);
    f.api.add_node("node-b", &["10.244.2.0/24"]);
    let a = manager(&f, "node-a").await;
    let b = manager(&f, "node-b").await;
    a.acquire_lease(&attrs([198, 18, 0, 1], "0a:00:00:00:00:01"))
        .await
        .unwrap();
    let mut watch = a.watch_leases();
    assert!(matches!(next(&mut watch).await, LeaseEvent::Snapshot(l) if l.len() == 1));
    // Poll until the watch is established (the stream is lazy), then end it.
    let quiet = tokio::time::timeout(Duration::from_millis(700), watch.next()).await;
    assert!(quiet.is_err(), "no lease events while idle: {quiet:?}");
    let (lists, watches) = (f.api.list_count(), f.api.watch_count());
    assert_eq!(watches, 1);

    // The server ends the watch cleanly; a change made meanwhile arrives through the
    // resumed watch (replayed from history), with no relist and so no new snapshot.
    f.api.close_watches();
    b.acquire_lease(&attrs([198, 18, 0, 2], "0a:00:00:00:00:02"))
        .await
        .unwrap();
    let ev = next(&mut watch).await;
    assert!(
        matches!(&ev, LeaseEvent::Added(l) if l.subnets().to_string() == "10.244.2.0/24"),
        "{ev:?}"
    );
    assert!(f.api.watch_count() > watches, "the watcher re-watched");
    assert_eq!(f.api.list_count(), lists, "no relist after a clean close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_publishes_and_sees_ipv6() {
    let f = fixture().await;
    std::fs::write(
        &f.net_conf,
        r#"{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:10:244::/56",
            "Backend": {"Type": "vxlan"}}"#,
    )
    .unwrap();
    f.api
        .add_node("node-a", &["10.244.1.0/24", "fd00:10:244:1::/64"]);
    f.api
        .add_node("node-b", &["10.244.2.0/24", "fd00:10:244:2::/64"]);
    let a = manager(&f, "node-a").await;
    let b = manager(&f, "node-b").await;
    let dual = |ip4: [u8; 4], ip6: &str, mac4: &str, mac6: &str| {
        let mut at = attrs(ip4, mac4);
        at.public_ipv6 = Some(ip6.parse().unwrap());
        at.backend = BackendAttrs::Vxlan {
            v4: Some(vtep(mac4)),
            v6: Some(vtep(mac6)),
        };
        at
    };
    let lease = a
        .acquire_lease(&dual(
            [198, 18, 0, 1],
            "fd18::1",
            "0a:00:00:00:00:01",
            "0a:00:00:00:06:01",
        ))
        .await
        .unwrap();
    assert_eq!(lease.ipv6_subnet.unwrap().to_string(), "fd00:10:244:1::/64");
    let ann = f.api.annotations("node-a");
    assert_eq!(ann[&format!("{P}public-ipv6")], "fd18::1");
    assert_eq!(
        ann[&format!("{P}backend-v6-data")],
        r#"{"VNI":1,"VtepMAC":"0a:00:00:00:06:01"}"#
    );

    b.acquire_lease(&dual(
        [198, 18, 0, 2],
        "fd18::2",
        "0a:00:00:00:00:02",
        "0a:00:00:00:06:02",
    ))
    .await
    .unwrap();
    let mut watch = a.watch_leases();
    let LeaseEvent::Snapshot(snap) = next(&mut watch).await else {
        panic!("snapshot first");
    };
    let peer = snap
        .iter()
        .find(|l| l.subnet == Some("10.244.2.0/24".parse().unwrap()))
        .unwrap();
    assert_eq!(peer.ipv6_subnet.unwrap().to_string(), "fd00:10:244:2::/64");
    assert_eq!(peer.attrs.public_ipv6, Some("fd18::2".parse().unwrap()));
}
