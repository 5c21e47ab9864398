//! The etcd subnet manager against a real etcd: allocation, races, exhaustion, reuse after
//! restart, TTL expiry and renewal, own-lease loss, watch events, resync across an etcd
//! restart, malformed records, and wire compatibility with upstream's lease JSON.
//!
//! Needs only the `etcd` binary (no root, no namespaces): everything is on 127.0.0.1.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use etcd_client::{Client, GetOptions, PutOptions};
use flannel_agent::{
    lease::{Lease, LeaseAttrs, LeaseEvent, MacAddr, PeerSet, VxlanBackendData},
    subnet::{
        self, SubnetManager,
        env_file::PreviousSubnets,
        etcd::{self as etcd_mgr, EtcdOptions, EtcdSubnetManager},
    },
};
use flannel_e2e::etcd::{EtcdServer, TlsFiles};
use futures::{StreamExt, stream::BoxStream};
use ipnetwork::Ipv4Network;
use tokio_util::sync::CancellationToken;

const PREFIX: &str = "/flannel-test/network";
const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;

async fn raw(etcd: &EtcdServer) -> Result<Client> {
    Ok(Client::connect([etcd.endpoint()], None).await?)
}

async fn put_config(etcd: &EtcdServer, json: &str) -> Result<()> {
    raw(etcd)
        .await?
        .put(format!("{PREFIX}/config"), json, None)
        .await?;
    Ok(())
}

fn options(etcd: &EtcdServer, ttl: Duration) -> EtcdOptions {
    EtcdOptions {
        endpoints: vec![etcd.endpoint()],
        prefix: format!("{PREFIX}/"),
        ttl,
        ..Default::default()
    }
}

async fn manager(etcd: &EtcdServer) -> Result<EtcdSubnetManager> {
    Ok(EtcdSubnetManager::connect(options(etcd, etcd_mgr::DEFAULT_TTL)).await?)
}

fn attrs(ip: Ipv4Addr) -> LeaseAttrs {
    let o = ip.octets();
    LeaseAttrs::vxlan(
        ip,
        VxlanBackendData {
            vni: 1,
            vtep_mac: MacAddr([0x0e, 0x2a, o[0], o[1], o[2], o[3]]),
        },
    )
}

fn host(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, i)
}

/// Every lease key under the prefix with its raw value.
async fn stored(etcd: &EtcdServer) -> Result<BTreeMap<String, Vec<u8>>> {
    let resp = raw(etcd)
        .await?
        .get(
            format!("{PREFIX}/subnets/"),
            Some(GetOptions::new().with_prefix()),
        )
        .await?;
    Ok(resp
        .kvs()
        .iter()
        .map(|kv| (kv.key_str().unwrap().to_owned(), kv.value().to_vec()))
        .collect())
}

/// An etcd lease's IPv4 half, which every etcd lease has (its key names it).
trait EtcdLease {
    fn v4(&self) -> Ipv4Network;
    fn v4_key(&self) -> String;
}

impl EtcdLease for Lease {
    fn v4(&self) -> Ipv4Network {
        self.subnet.expect("an etcd lease has an IPv4 subnet")
    }
    fn v4_key(&self) -> String {
        self.key().expect("an etcd lease has a key")
    }
}

fn key_of(subnet: &str) -> String {
    let n: Ipv4Network = subnet.parse().unwrap();
    format!("{PREFIX}/subnets/{}-{}", n.ip(), n.prefix())
}

async fn next_event(
    events: &mut BoxStream<'static, subnet::Result<LeaseEvent>>,
    within: Duration,
) -> Result<LeaseEvent> {
    match tokio::time::timeout(within, events.next()).await {
        Ok(Some(Ok(ev))) => Ok(ev),
        Ok(Some(Err(e))) => bail!("watch error: {e}"),
        Ok(None) => bail!("watch ended"),
        Err(_) => bail!("no lease event within {within:?}"),
    }
}

/// Polls `f` until it returns true or `within` elapses.
async fn eventually<F, Fut>(within: Duration, what: &str, mut f: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + within;
    loop {
        if f().await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_managers_get_distinct_subnets_in_range() -> Result<()> {
    let etcd = EtcdServer::start()?;
    // A narrow range so the random choices collide and the create-race retry is exercised.
    put_config(
        &etcd,
        r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.10.0","SubnetMax":"10.244.69.0","Backend":{"Type":"vxlan"}}"#,
    )
    .await?;
    let mut managers = Vec::new();
    for _ in 0..50 {
        managers.push(manager(&etcd).await?);
    }
    let leases = futures::future::join_all(
        managers
            .iter()
            .enumerate()
            .map(|(i, m)| async move { m.acquire_lease(&attrs(host(i as u8 + 1))).await }),
    )
    .await;
    let mut subnets = BTreeSet::new();
    let (min, max) = (Ipv4Addr::new(10, 244, 10, 0), Ipv4Addr::new(10, 244, 69, 0));
    for (i, lease) in leases.into_iter().enumerate() {
        let lease = lease.with_context(|| format!("manager {i}"))?;
        assert_eq!(lease.v4().prefix(), 24);
        assert!(
            lease.v4().ip() >= min && lease.v4().ip() <= max,
            "{lease:?}"
        );
        assert_eq!(lease.attrs.public_ip, host(i as u8 + 1));
        assert!(
            subnets.insert(lease.v4()),
            "subnet {} handed out twice",
            lease.v4()
        );
    }
    assert_eq!(subnets.len(), 50);
    // Exactly those 50 keys landed in etcd, each with its owner's value.
    let keys = stored(&etcd).await?;
    assert_eq!(keys.len(), 50);
    for sn in &subnets {
        let value = &keys[&key_of(&sn.to_string())];
        let attrs = LeaseAttrs::from_json(value)?;
        assert!(attrs.public_ip.octets()[..3] == [198, 18, 0]);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhaustion_is_a_clear_error() -> Result<()> {
    let etcd = EtcdServer::start()?;
    // /24 split into /26: SubnetMin .64 .. SubnetMax .192 = three subnets.
    put_config(
        &etcd,
        r#"{"Network":"10.9.0.0/24","SubnetLen":26,"Backend":{"Type":"vxlan"}}"#,
    )
    .await?;
    let m = manager(&etcd).await?;
    let mut got = BTreeSet::new();
    for i in 1..=3 {
        got.insert(m.acquire_lease(&attrs(host(i))).await?.v4().to_string());
    }
    assert_eq!(
        got,
        BTreeSet::from([
            "10.9.0.64/26".into(),
            "10.9.0.128/26".into(),
            "10.9.0.192/26".into()
        ])
    );
    let err = m.acquire_lease(&attrs(host(4))).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("out of subnets") && msg.contains("10.9.0.64"),
        "{msg}"
    );
    assert!(!err.is_transient());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_missing_then_invalid() -> Result<()> {
    let etcd = EtcdServer::start()?;
    let m = manager(&etcd).await?;
    let err = m.network_config().await.unwrap_err();
    assert!(
        err.to_string().contains("not found") && err.is_transient(),
        "{err}"
    );
    put_config(
        &etcd,
        r#"{"Network":"10.1.0.0/16","SubnetLen":31,"Backend":{"Type":"vxlan"}}"#,
    )
    .await?;
    let err = m.network_config().await.unwrap_err();
    assert!(
        err.to_string().contains("SubnetLen") && err.to_string().contains("31"),
        "{err}"
    );
    assert!(!err.is_transient());
    put_config(
        &etcd,
        r#"{"network":"10.1.0.0/16","backend":{"type":"host-gw"}}"#,
    )
    .await?;
    let cfg = m.network_config().await?;
    assert_eq!(cfg.subnet_min, Ipv4Addr::new(10, 1, 1, 0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_reuses_the_subnet() -> Result<()> {
    let mut etcd = EtcdServer::start()?;
    put_config(&etcd, CONFIG).await?;
    let first = manager(&etcd).await?.acquire_lease(&attrs(host(7))).await?;

    // Same public IP, new VTEP MAC: same subnet, new attrs published.
    let changed = LeaseAttrs::vxlan(
        host(7),
        VxlanBackendData {
            vni: 1,
            vtep_mac: MacAddr([2, 0, 0, 0, 0, 9]),
        },
    );
    let second = manager(&etcd).await?.acquire_lease(&changed).await?;
    assert_eq!(second.subnet, first.subnet);
    let keys = stored(&etcd).await?;
    assert_eq!(keys.len(), 1);
    assert_eq!(
        LeaseAttrs::from_json(&keys[&key_of(&first.v4().to_string())])?,
        changed
    );

    // Across an etcd restart (data persisted).
    tokio::task::block_in_place(|| etcd.restart())?;
    let third = manager(&etcd).await?.acquire_lease(&changed).await?;
    assert_eq!(third.subnet, first.subnet);

    // New public IP, but subnet.env remembers the subnet and it is free again.
    raw(&etcd)
        .await?
        .delete(key_of(&first.v4().to_string()), None)
        .await?;
    let dir = tempfile::tempdir()?;
    let env = dir.path().join("subnet.env");
    std::fs::write(
        &env,
        format!(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET={}/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
            Ipv4Addr::from(u32::from(first.v4().ip()) + 1)
        ),
    )?;
    let previous = subnet::env_file::read_previous(&env);
    assert_eq!(previous.subnet, Some(first.v4()));
    let m = EtcdSubnetManager::connect(EtcdOptions {
        previous,
        ..options(&etcd, etcd_mgr::DEFAULT_TTL)
    })
    .await?;
    let fourth = m.acquire_lease(&attrs(host(8))).await?;
    assert_eq!(fourth.subnet, first.subnet);

    // A remembered subnet someone else holds now is not stolen.
    let other = EtcdSubnetManager::connect(EtcdOptions {
        previous: PreviousSubnets {
            subnet: first.subnet,
            ..Default::default()
        },
        ..options(&etcd, etcd_mgr::DEFAULT_TTL)
    })
    .await?;
    let fifth = other.acquire_lease(&attrs(host(9))).await?;
    assert_ne!(fifth.subnet, first.subnet);
    Ok(())
}

/// Enabling IPv6 makes an IPv4-only lease incompatible; it is replaced by a dual-stack one
/// that keeps its IPv4 subnet (the host's pods hold addresses in it), even with no
/// subnet.env to remember it by.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enabling_ipv6_keeps_the_ipv4_subnet_of_the_lease() -> Result<()> {
    let etcd = EtcdServer::start()?;
    put_config(&etcd, CONFIG).await?;
    let mut a = attrs(host(7));
    let first = manager(&etcd).await?.acquire_lease(&a).await?;
    assert_eq!(first.ipv6_subnet, None);
    put_config(
        &etcd,
        r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","IPv6SubnetLen":64,"Backend":{"Type":"vxlan"}}"#,
    )
    .await?;
    a.public_ipv6 = Some("fd00:198::7".parse()?);
    let second = manager(&etcd).await?.acquire_lease(&a).await?;
    assert_eq!(second.subnet, first.subnet);
    let v6 = second.ipv6_subnet.context("an IPv6 subnet")?;
    let keys: Vec<String> = stored(&etcd).await?.into_keys().collect();
    assert_eq!(
        keys,
        [format!(
            "{PREFIX}/subnets/{}-24&{}-64",
            first.v4().ip(),
            v6.ip()
        )]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expires_unless_renewed_and_loss_is_detected() -> Result<()> {
    let etcd = EtcdServer::start()?;
    put_config(&etcd, CONFIG).await?;
    let ttl = Duration::from_secs(3);
    let short = EtcdSubnetManager::connect(options(&etcd, ttl)).await?;

    // Not renewed: gone after the TTL.
    let lapsed = short.acquire_lease(&attrs(host(1))).await?;
    let lapsed_key = key_of(&lapsed.v4().to_string());
    assert!(stored(&etcd).await?.contains_key(&lapsed_key));
    let started = Instant::now();
    eventually(
        Duration::from_secs(15),
        "the unrenewed lease to expire",
        || async { Ok(!stored(&etcd).await?.contains_key(&lapsed_key)) },
    )
    .await?;
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "expired too early"
    );

    // Renewed (margin 60 min >= TTL, so every TTL/2): survives several TTLs.
    let kept = short.acquire_lease(&attrs(host(2))).await?;
    let kept_key = key_of(&kept.v4().to_string());
    let cancel = CancellationToken::new();
    let renewer = {
        let (m, l, c) = (short.clone(), kept.clone(), cancel.clone());
        tokio::spawn(async move { m.complete_lease(&l, c).await })
    };
    tokio::time::sleep(ttl * 3).await;
    assert!(
        stored(&etcd).await?.contains_key(&kept_key),
        "renewed lease expired"
    );
    let mut client = raw(&etcd).await?;
    let kv = client.get(kept_key.as_str(), None).await?.kvs()[0].clone();
    let ttl_left = client.lease_time_to_live(kv.lease(), None).await?;
    assert_eq!(
        ttl_left.granted_ttl(),
        3,
        "lease granted with the configured TTL"
    );

    // Cancelled: complete_lease returns Ok; the key is left to expire (never deleted).
    cancel.cancel();
    renewer.await??;
    assert!(
        stored(&etcd).await?.contains_key(&kept_key),
        "lease deleted on shutdown"
    );

    // Own-lease loss: deleting the key does not end complete_lease, and restore_lease
    // puts the lease back exactly as acquired (with a TTL), deleted or overwritten.
    let long = EtcdSubnetManager::connect(options(&etcd, Duration::from_secs(60))).await?;
    let mine = long.acquire_lease(&attrs(host(3))).await?;
    let mine_key = key_of(&mine.v4().to_string());
    let cancel = CancellationToken::new();
    let watcher = {
        let (m, l, c) = (long.clone(), mine.clone(), cancel.clone());
        tokio::spawn(async move { m.complete_lease(&l, c).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    client.delete(mine_key.as_str(), None).await?;
    long.restore_lease(&mine).await?;
    let value = |kv: &etcd_client::KeyValue| String::from_utf8_lossy(kv.value()).into_owned();
    let kv = client.get(mine_key.as_str(), None).await?.kvs()[0].clone();
    assert_eq!(value(&kv), mine.attrs.to_json());
    assert_ne!(kv.lease(), 0, "a restored lease expires like any other");
    let hijack = attrs(host(9)).to_json();
    client.put(mine_key.as_str(), hijack, None).await?;
    long.restore_lease(&mine).await?;
    let kv = client.get(mine_key.as_str(), None).await?.kvs()[0].clone();
    assert_eq!(value(&kv), mine.attrs.to_json());
    assert!(
        !watcher.is_finished(),
        "complete_lease ended on a deleted key"
    );
    cancel.cancel();
    watcher.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_see_snapshot_add_and_remove() -> Result<()> {
    let etcd = EtcdServer::start()?;
    put_config(&etcd, CONFIG).await?;
    let m = manager(&etcd).await?;
    let a = m.acquire_lease(&attrs(host(1))).await?;
    let mut events = m.watch_leases();
    let LeaseEvent::Snapshot(snap) = next_event(&mut events, Duration::from_secs(5)).await? else {
        bail!("first event must be a snapshot");
    };
    assert_eq!(snap, vec![a.clone()]);

    let b = manager(&etcd).await?.acquire_lease(&attrs(host(2))).await?;
    assert_eq!(
        next_event(&mut events, Duration::from_secs(5)).await?,
        LeaseEvent::Added(b.clone())
    );

    raw(&etcd)
        .await?
        .delete(key_of(&b.v4().to_string()), None)
        .await?;
    let LeaseEvent::Removed(gone) = next_event(&mut events, Duration::from_secs(5)).await? else {
        bail!("expected a removal");
    };
    assert_eq!(gone.subnet, b.subnet);

    // The reducer turns that into backend changes with the cached attributes.
    let mut peers = PeerSet::new(a.id());
    peers.apply(LeaseEvent::Snapshot(snap));
    peers.apply(LeaseEvent::Added(b.clone()));
    let changes = peers.apply(LeaseEvent::Removed(gone));
    assert_eq!(changes, vec![flannel_agent::lease::PeerChange::Remove(b)]);
    Ok(())
}

/// A manager that prefers `subnet`, so the test knows which subnet it gets.
async fn manager_for(etcd: &EtcdServer, subnet: &str) -> Result<EtcdSubnetManager> {
    Ok(EtcdSubnetManager::connect(EtcdOptions {
        previous: PreviousSubnets {
            subnet: Some(subnet.parse()?),
            ..Default::default()
        },
        ..options(etcd, etcd_mgr::DEFAULT_TTL)
    })
    .await?)
}

/// #10: a start reads the leases once. The agent's start-up read (`previous_lease`) is
/// what the acquisition decides on, and that read with our own write applied is the first
/// watch's snapshot; the watch goes on from the read's revision. So leases written after
/// the read are not in the snapshot (no second read happened) but arrive right after it,
/// in order (none lost), and our own write is not repeated as an event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_reads_the_leases_once_and_loses_no_event_after_the_read() -> Result<()> {
    let etcd = EtcdServer::start()?;
    put_config(&etcd, CONFIG).await?;
    let early = manager_for(&etcd, "10.244.1.0/24")
        .await?
        .acquire_lease(&attrs(host(1)))
        .await?;
    // The agent's start: the network config, the previous lease, the acquisition.
    let m = manager_for(&etcd, "10.244.2.0/24").await?;
    m.network_config().await?;
    assert_eq!(m.previous_lease(host(2)).await?, None);
    let between = manager_for(&etcd, "10.244.3.0/24")
        .await?
        .acquire_lease(&attrs(host(3)))
        .await?;
    let own = m.acquire_lease(&attrs(host(2))).await?;
    assert_eq!(own.v4().to_string(), "10.244.2.0/24");
    let after = manager_for(&etcd, "10.244.4.0/24")
        .await?
        .acquire_lease(&attrs(host(4)))
        .await?;

    let mut events = m.watch_leases();
    assert_eq!(
        next_event(&mut events, Duration::from_secs(5)).await?,
        LeaseEvent::Snapshot(vec![early, own]),
        "the snapshot is the start-up read plus our own lease"
    );
    assert_eq!(
        next_event(&mut events, Duration::from_secs(5)).await?,
        LeaseEvent::Added(between)
    );
    assert_eq!(
        next_event(&mut events, Duration::from_secs(5)).await?,
        LeaseEvent::Added(after)
    );
    // Live from here on; our own write never came as an event.
    let live = manager_for(&etcd, "10.244.5.0/24")
        .await?
        .acquire_lease(&attrs(host(5)))
        .await?;
    assert_eq!(
        next_event(&mut events, Duration::from_secs(5)).await?,
        LeaseEvent::Added(live)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restart_mid_watch_loses_no_event() -> Result<()> {
    let mut etcd = EtcdServer::start()?;
    put_config(&etcd, CONFIG).await?;
    let m = manager(&etcd).await?;
    let a = m.acquire_lease(&attrs(host(1))).await?;
    let b = m.acquire_lease(&attrs(host(2))).await?;
    // The watcher's own subnet is outside the range, so every lease is a peer.
    let mut peers = PeerSet::new((Some("10.244.0.0/24".parse()?), None));
    let mut events = m.watch_leases();
    peers.apply(next_event(&mut events, Duration::from_secs(5)).await?);
    assert_eq!(peers.len(), 2);

    // Kill etcd; bring it back and change the lease set before the watcher (backing off)
    // reconnects: these changes happen while it is disconnected.
    etcd.stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::task::block_in_place(|| etcd.restart())?;
    let writer = manager(&etcd).await?;
    raw(&etcd)
        .await?
        .delete(key_of(&b.v4().to_string()), None)
        .await?;
    let c = writer.acquire_lease(&attrs(host(3))).await?;

    let mut resynced = false;
    let want = |p: &PeerSet| {
        let got: BTreeSet<_> = p.peers().into_iter().map(|l| l.subnet).collect();
        got == BTreeSet::from([a.subnet, c.subnet])
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(want(&peers) && resynced) {
        let ev = next_event(
            &mut events,
            deadline.saturating_duration_since(Instant::now()),
        )
        .await
        .with_context(|| format!("peer set {:?}\netcd log:\n{}", peers.peers(), etcd.log()))?;
        resynced |= matches!(ev, LeaseEvent::Snapshot(_));
        peers.apply(ev);
    }
    // And the watch is live again afterwards.
    let d = writer.acquire_lease(&attrs(host(4))).await?;
    loop {
        let ev = next_event(&mut events, Duration::from_secs(10)).await?;
        if ev == LeaseEvent::Added(d.clone()) {
            break;
        }
        peers.apply(ev);
    }
    Ok(())
}

/// Twenty kinds of records upstream would not accept (or we cannot program), each of which
/// must be skipped with a warning while good records keep flowing.
fn malformed() -> Vec<(String, Vec<u8>)> {
    let good = br#"{"PublicIP":"198.18.9.9","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:2a:00:00:00:01"}}"#.to_vec();
    let s = |k: &str| format!("{PREFIX}/subnets/{k}");
    let mut out: Vec<(String, Vec<u8>)> = vec![
        (s("not-a-subnet"), good.clone()),
        (s("10.244.200.0-32"), good.clone()),
        (s("10.244.201.0"), good.clone()),
        (s("300.244.202.0-24"), good.clone()),
        (s("10.244.203.0-24&FD00::-64"), good.clone()),
        (s("10.244.204.0-24&fd00::-128"), good.clone()),
    ];
    let values: Vec<&[u8]> = vec![
        b"not json",
        b"",
        br#"{"PublicIP":null,"PublicIPv6":null}"#,
        br#"{"PublicIP":"fd00::1","PublicIPv6":null}"#,
        br#"{"PublicIP":"1.2.3","PublicIPv6":null}"#,
        br#"{"PublicIPv6":null,"BackendType":"vxlan"}"#,
        br#"{"PublicIP":"1.2.3.4","PublicIPv6":"1.2.3.4"}"#,
        b"[]",
        br#"{"PublicIP":"1.2.3.4","BackendType":"vxlan","BackendData":{"VNI":1}}"#,
        br#"{"PublicIP":"1.2.3.4","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"zz:zz:zz:zz:zz:zz"}}"#,
        br#"{"PublicIP":"1.2.3.4","BackendType":"vxlan","BackendData":null}"#,
        br#"{"PublicIP":42}"#,
        br#"{"PublicIP":"1.2.3.4","BackendType":7}"#,
        b"\xff\xfe\x00",
        br#"{"PublicIP":"1.2.3.4","BackendType":"vxlan","BackendData":{"VNI":"1","VtepMAC":"0e:2a:00:00:00:01"}}"#,
        // Well-formed but not routable (#12 item 5): not a unicast tunnel endpoint.
        br#"{"PublicIP":"0.0.0.0","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:2a:00:00:00:01"}}"#,
        br#"{"PublicIP":"127.0.0.1","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:2a:00:00:00:01"}}"#,
        br#"{"PublicIP":"224.0.0.1","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:2a:00:00:00:01"}}"#,
        br#"{"PublicIP":"255.255.255.255","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:2a:00:00:00:01"}}"#,
    ];
    for (i, v) in values.iter().enumerate() {
        out.push((s(&format!("10.244.{}.0-24", 210 + i)), v.to_vec()));
    }
    // Good values under keys that must not be routed: outside Network, host bits set, a
    // subnet length other than the configured one.
    out.push((s("10.245.1.0-24"), good.clone()));
    out.push((s("10.244.117.7-24"), good.clone()));
    out.push((s("10.244.118.0-25"), good.clone()));
    // 1 MiB of garbage.
    out.push((s("10.244.119.0-24"), vec![b'{'; 1 << 20]));
    assert!(out.len() >= 29);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_records_are_skipped_good_ones_arrive() -> Result<()> {
    let etcd = EtcdServer::start()?;
    put_config(&etcd, CONFIG).await?;
    let mut client = raw(&etcd).await?;
    let bad = malformed();
    for (k, v) in &bad {
        client.put(k.as_str(), v.clone(), None).await?;
    }
    let m = manager(&etcd).await?;
    let good = m.acquire_lease(&attrs(host(1))).await?;

    // Snapshot: only the good lease.
    let mut events = m.watch_leases();
    assert_eq!(
        next_event(&mut events, Duration::from_secs(5)).await?,
        LeaseEvent::Snapshot(vec![good.clone()])
    );

    // Live: every bad put is skipped, the good one after them arrives.
    for (k, v) in &bad {
        client.put(k.as_str(), v.clone(), None).await?;
    }
    let late = manager(&etcd).await?.acquire_lease(&attrs(host(2))).await?;
    assert_eq!(
        next_event(&mut events, Duration::from_secs(5)).await?,
        LeaseEvent::Added(late.clone())
    );

    // Keys with bad values still occupy their subnets: acquisition never picks them.
    for (k, _) in &bad {
        assert_ne!(k, &key_of(&good.v4().to_string()));
        assert_ne!(k, &key_of(&late.v4().to_string()));
    }
    Ok(())
}

/// Upstream's documented value, byte for byte.
const UPSTREAM: &str = r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_upstream_lease_round_trip() -> Result<()> {
    let etcd = EtcdServer::start()?;
    put_config(&etcd, CONFIG).await?;
    let mut client = raw(&etcd).await?;
    // An upstream node's lease, written the way upstream does (value under a 24 h lease).
    let grant = client.lease_grant(86400, None).await?;
    let key = format!("{PREFIX}/subnets/10.244.7.0-24");
    client
        .put(
            key.as_str(),
            UPSTREAM,
            Some(PutOptions::new().with_lease(grant.id())),
        )
        .await?;

    let m = manager(&etcd).await?;
    let mut events = m.watch_leases();
    let LeaseEvent::Snapshot(leases) = next_event(&mut events, Duration::from_secs(5)).await?
    else {
        bail!("expected snapshot");
    };
    let [upstream]: [Lease; 1] = leases.try_into().map_err(|l| anyhow::anyhow!("{l:?}"))?;
    assert_eq!(
        upstream.subnet,
        Some("10.244.7.0/24".parse::<Ipv4Network>()?)
    );
    assert_eq!(upstream.attrs.public_ip, Ipv4Addr::new(192, 168, 64, 3));
    let data = upstream
        .attrs
        .backend
        .vxlan_v4()
        .context("upstream lease has no vxlan data")?;
    assert_eq!(
        (data.vni, data.vtep_mac.to_string().as_str()),
        (1, "c6:d2:32:6f:8f:44")
    );

    // That node restarts as us: same public IP → same subnet, value byte-identical.
    let ours = LeaseAttrs::vxlan(
        Ipv4Addr::new(192, 168, 64, 3),
        VxlanBackendData {
            vni: 1,
            vtep_mac: "c6:d2:32:6f:8f:44".parse()?,
        },
    );
    let lease = m.acquire_lease(&ours).await?;
    assert_eq!(lease.subnet, upstream.subnet);
    let value = stored(&etcd).await?.remove(&key).context("key vanished")?;
    assert_eq!(String::from_utf8(value.clone())?, UPSTREAM);

    // And a freshly allocated lease of ours has upstream's schema: exact field names and
    // order, PublicIPv6 literally null, BackendData an object with VNI number + MAC string.
    let fresh = m.acquire_lease(&attrs(host(5))).await?;
    let value = stored(&etcd)
        .await?
        .remove(&key_of(&fresh.v4().to_string()))
        .unwrap();
    let text = String::from_utf8(value)?;
    assert!(text.starts_with(r#"{"PublicIP":"198.18.0.5","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0e:2a:c6:12:00:05"}}"#), "{text}");
    let json: serde_json::Value = serde_json::from_str(&text)?;
    let obj = json.as_object().unwrap();
    let fields: BTreeSet<&str> = obj.keys().map(String::as_str).collect();
    assert_eq!(
        fields,
        BTreeSet::from(["BackendData", "BackendType", "PublicIP", "PublicIPv6"])
    );
    assert!(obj["PublicIPv6"].is_null());
    assert!(obj["BackendData"]["VNI"].is_u64());
    assert!(obj["BackendData"]["VtepMAC"].is_string());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_leases_use_upstream_keys() -> Result<()> {
    let etcd = EtcdServer::start()?;
    put_config(
        &etcd,
        r#"{"Network":"10.12.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:12::/48","IPv6SubnetLen":56,"Backend":{"Type":"vxlan"}}"#,
    )
    .await?;
    let m = manager(&etcd).await?;
    let mut a = attrs(host(1));
    a.public_ipv6 = Some("fd00:18::1".parse()?);
    let lease = m.acquire_lease(&a).await?;
    let v6 = lease
        .ipv6_subnet
        .context("dual-stack lease has an IPv6 subnet")?;
    assert_eq!(v6.prefix(), 56);
    assert!(v6.ip().segments()[..2] == [0xfd00, 0x12]);
    let key = format!("{PREFIX}/subnets/{}-24&{}-56", lease.v4().ip(), v6.ip());
    let keys = stored(&etcd).await?;
    let value = String::from_utf8(
        keys.get(&key)
            .with_context(|| format!("{key} in {keys:?}"))?
            .clone(),
    )?;
    assert!(
        value.starts_with(r#"{"PublicIP":"198.18.0.1","PublicIPv6":"fd00:18::1","#),
        "{value}"
    );
    // The watch reports both subnets.
    let mut events = m.watch_leases();
    assert_eq!(
        next_event(&mut events, Duration::from_secs(5)).await?,
        LeaseEvent::Snapshot(vec![lease])
    );
    Ok(())
}

/// A dual-stack key names both subnets, so two hosts that drew the same IPv4 subnet with
/// different IPv6 ones (or the reverse) used to both win their create and then overwrite each
/// other's lease forever. Narrow ranges in both families make such draws frequent here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_dual_stack_managers_get_distinct_subnets_in_both_families() -> Result<()> {
    let etcd = EtcdServer::start()?;
    put_config(
        &etcd,
        r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.10.0","SubnetMax":"10.244.49.0","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","IPv6SubnetLen":64,"IPv6SubnetMin":"fd00:10:244:10::","IPv6SubnetMax":"fd00:10:244:37::","Backend":{"Type":"vxlan"}}"#,
    )
    .await?;
    const HOSTS: u8 = 30;
    let mut managers = Vec::new();
    for _ in 0..HOSTS {
        managers.push(manager(&etcd).await?);
    }
    let leases = futures::future::join_all(managers.iter().enumerate().map(|(i, m)| async move {
        let mut a = attrs(host(i as u8 + 1));
        a.public_ipv6 = Some(format!("fd00:198::{}", i + 1).parse()?);
        anyhow::Ok(m.acquire_lease(&a).await?)
    }))
    .await;
    let (mut v4s, mut v6s, mut keys) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for (i, lease) in leases.into_iter().enumerate() {
        let lease = lease.with_context(|| format!("manager {i}"))?;
        let v6 = lease.ipv6_subnet.context("dual-stack lease without IPv6")?;
        assert!(
            v4s.insert(lease.v4()),
            "IPv4 subnet {} handed out twice",
            lease.v4()
        );
        assert!(v6s.insert(v6), "IPv6 subnet {v6} handed out twice");
        keys.insert(format!("{PREFIX}/subnets/{}", lease.v4_key()));
    }
    // Exactly the winners' keys are in etcd: every withdrawn create was deleted.
    let stored: BTreeSet<String> = stored(&etcd).await?.into_keys().collect();
    assert_eq!(stored, keys);
    assert_eq!(stored.len(), usize::from(HOSTS));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservation_is_reused_and_stays_without_ttl() -> Result<()> {
    let etcd = EtcdServer::start()?;
    put_config(&etcd, CONFIG).await?;
    let mut client = raw(&etcd).await?;
    // Documentation/reservations.md: a key written without a TTL reserves the subnet for
    // the host with that PublicIP.
    let key = format!("{PREFIX}/subnets/10.244.42.0-24");
    client
        .put(
            key.as_str(),
            r#"{"PublicIP":"198.18.0.42","PublicIPv6":null}"#,
            None,
        )
        .await?;
    let ttl = Duration::from_secs(3);
    let m = EtcdSubnetManager::connect(options(&etcd, ttl)).await?;
    let lease = m.acquire_lease(&attrs(host(42))).await?;
    assert_eq!(lease.subnet, Some("10.244.42.0/24".parse::<Ipv4Network>()?));
    let cancel = CancellationToken::new();
    let keeper = {
        let (m, l, c) = (m.clone(), lease.clone(), cancel.clone());
        tokio::spawn(async move { m.complete_lease(&l, c).await })
    };
    tokio::time::sleep(ttl * 2).await;
    let kv = client.get(key.as_str(), None).await?.kvs()[0].clone();
    assert_eq!(kv.lease(), 0, "reservation turned into a TTL lease");
    assert_eq!(
        LeaseAttrs::from_json(kv.value())?,
        attrs(host(42)),
        "new attrs published"
    );
    cancel.cancel();
    keeper.await??;
    // Other hosts never get a reserved subnet.
    let other = m.acquire_lease(&attrs(host(43))).await?;
    assert_ne!(other.subnet, lease.subnet);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_auth_credentials_are_used() -> Result<()> {
    let etcd = EtcdServer::start()?;
    put_config(&etcd, CONFIG).await?;
    let mut admin = raw(&etcd).await?;
    admin.user_add("root", "s3cret", None).await?;
    admin.user_grant_role("root", "root").await?;
    admin.auth_enable().await?;

    let with = |user: &str, password: &str| EtcdOptions {
        username: Some(user.into()),
        password: Some(password.into()),
        ..options(&etcd, etcd_mgr::DEFAULT_TTL)
    };
    let m = EtcdSubnetManager::connect(with("root", "s3cret")).await?;
    let lease = m.acquire_lease(&attrs(host(1))).await?;
    assert_eq!(lease.v4().prefix(), 24);

    // Wrong password: a permanent error, not something to retry forever.
    let err = match EtcdSubnetManager::connect(with("root", "wrong")).await {
        Err(e) => e,
        Ok(m) => match m.network_config().await {
            Err(subnet::Error::Etcd(e)) => *e,
            other => bail!("wrong password accepted: {other:?}"),
        },
    };
    assert!(!err.is_transient(), "{err}");
    // Without credentials the data is not readable either.
    let anonymous = manager(&etcd).await?;
    assert!(anonymous.network_config().await.is_err());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_tls_needs_key_and_cert() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tls = TlsFiles::generate(dir.path())?;
    let etcd = EtcdServer::start_tls(tls.clone())?;
    let secure = EtcdOptions {
        keyfile: Some(tls.client_key.clone()),
        certfile: Some(tls.client_cert.clone()),
        cafile: Some(tls.ca.clone()),
        ..options(&etcd, etcd_mgr::DEFAULT_TTL)
    };
    let m = EtcdSubnetManager::connect(secure.clone()).await?;
    // The config is absent: reaching "not found" proves the TLS session works.
    let err = m.network_config().await.unwrap_err();
    assert!(err.to_string().contains("not found"), "{err}");

    // A CA alone does not enable TLS (upstream): the client speaks plain HTTP/2 to a TLS
    // port and fails.
    let ca_only = EtcdOptions {
        keyfile: None,
        certfile: None,
        ..secure.clone()
    };
    let fails = match EtcdSubnetManager::connect(ca_only).await {
        Err(_) => true,
        Ok(m) => tokio::time::timeout(Duration::from_secs(5), m.network_config())
            .await
            .map_or(true, |r| r.is_err()),
    };
    assert!(fails, "plain connection to a TLS-only etcd succeeded");

    // A missing key file is named.
    let missing = EtcdOptions {
        keyfile: Some(dir.path().join("nope.key")),
        ..secure
    };
    let err = EtcdSubnetManager::connect(missing)
        .await
        .err()
        .context("missing key accepted")?;
    assert!(
        err.to_string().contains("--etcd-keyfile") && err.to_string().contains("nope.key"),
        "{err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incompatible_old_lease_is_replaced() -> Result<()> {
    let etcd = EtcdServer::start()?;
    put_config(&etcd, CONFIG).await?;
    let m = manager(&etcd).await?;
    let old = m.acquire_lease(&attrs(host(1))).await?;
    // The operator shrinks the range so the old subnet falls outside it.
    put_config(
        &etcd,
        r#"{"Network":"10.244.0.0/16","SubnetLen":25,"Backend":{"Type":"vxlan"}}"#,
    )
    .await?;
    let new = m.acquire_lease(&attrs(host(1))).await?;
    assert_eq!(new.v4().prefix(), 25);
    let keys = stored(&etcd).await?;
    assert!(
        !keys.contains_key(&key_of(&old.v4().to_string())),
        "{keys:?}"
    );
    assert_eq!(keys.len(), 1);
    Ok(())
}
