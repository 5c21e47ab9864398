//! Datastore faults in kube mode (#12 item 2, kube part), with real agents against the
//! in-test API server: the node watch dropped by the server, `410 Gone` on the watch
//! (compacted history: a relist), and the API server going down and coming back on the
//! same address. Throughout, the datapath stays as it was (pods keep talking), the agents
//! stay ready (they serve the last known peer set; an agent that starts during the outage
//! is not ready until it has its lease), and Node changes made meanwhile are applied once
//! the agents see the server again; the figures are printed.

use std::time::{Duration, Instant};

use flannel_e2e::{
    kube_cluster::{
        HEALTHZ, KubeAgent, KubeBench, is_ready, kube_hosts, ping, readyz, start_agent,
        start_kube_agents,
    },
    netns::{Host, NetNs, wait_until},
    require_root,
};

const DATA: &str = r#"{"VNI":1,"VtepMAC":"0e:2a:00:00:00:63"}"#;

fn routed(ns: &NetNs, subnet: &str) -> bool {
    ns.sh(&format!("ip route show {subnet}"))
        .contains("flannel.1")
}

fn pods_talk(a: &Host, b: &Host) -> bool {
    ping(&a.pods[0].ns, b.pods[0].ip) && ping(&b.pods[0].ns, a.pods[0].ip)
}

/// Two agents (h1 on eBPF, h2 on the kernel device) with a pod each, talking, both ready.
struct Two {
    h1: Host,
    h2: Host,
    a1: KubeAgent,
    a2: KubeAgent,
}

fn two(bench: &mut KubeBench) -> Two {
    let [mut h1, mut h2] = kube_hosts(bench);
    let [a1, a2] = start_kube_agents(
        &bench.api,
        [(&mut h1, "ebpf", &HEALTHZ), (&mut h2, "kernel", &HEALTHZ)],
    );
    assert!(
        wait_until(Duration::from_secs(15), || pods_talk(&h1, &h2)),
        "pods cannot talk\n{}",
        a1.log()
    );
    for h in [&h1, &h2] {
        assert!(
            wait_until(Duration::from_secs(10), || is_ready(&h.ns)),
            "{}",
            readyz(&h.ns)
        );
    }
    Two { h1, h2, a1, a2 }
}

/// Both agents program `subnet` (a peer node added meanwhile) within `within`; how long
/// it took.
fn both_route(t: &Two, subnet: &str, within: Duration) -> Duration {
    let start = Instant::now();
    assert!(
        wait_until(within, || routed(&t.h1.ns, subnet)
            && routed(&t.h2.ns, subnet)),
        "{subnet} not programmed\n--- h1:\n{}\n--- h2:\n{}",
        t.a1.log(),
        t.a2.log()
    );
    start.elapsed()
}

fn still_fine(t: &mut Two, what: &str) {
    assert!(pods_talk(&t.h1, &t.h2), "{what}: pods stopped talking");
    for (h, a) in [(&t.h1, &mut t.a1), (&t.h2, &mut t.a2)] {
        assert!(a.child.running(), "{what}: agent died\n{}", a.log());
        assert!(is_ready(&h.ns), "{what}: not ready: {}", readyz(&h.ns));
    }
}

#[test]
fn a_dropped_node_watch_is_resumed_and_misses_nothing() {
    if !require_root() {
        return;
    }
    let mut bench = KubeBench::new();
    let mut t = two(&mut bench);
    let api = &bench.api;
    let watches = api.watch_count();
    let lists = api.list_count();
    // The server ends every watch; a node joins right then.
    api.close_watches();
    api.add_flannel_node("p3", "10.244.3.0/24", "198.18.0.93", DATA);
    let took = both_route(&t, "10.244.3.0/24", Duration::from_secs(15));
    eprintln!("watch dropped: a node added meanwhile programmed on both hosts after {took:?}");
    assert!(
        api.watch_count() >= watches + 2,
        "the agents did not watch again"
    );
    assert_eq!(api.list_count(), lists, "a dropped watch needs no relist");
    still_fine(&mut t, "watch dropped");
}

#[test]
fn gone_410_on_the_node_watch_relists_and_applies_what_changed() {
    if !require_root() {
        return;
    }
    let mut bench = KubeBench::new();
    let mut t = two(&mut bench);
    let api = &bench.api;
    api.add_flannel_node("p3", "10.244.3.0/24", "198.18.0.93", DATA);
    both_route(&t, "10.244.3.0/24", Duration::from_secs(15));
    let lists = api.list_count();
    // History compacted past the agents' resourceVersion: one node goes and one comes
    // where only a relist can see it.
    api.expire_watches(|api| {
        api.delete_node("p3");
        api.add_flannel_node("p4", "10.244.4.0/24", "198.18.0.94", DATA);
    });
    let took = both_route(&t, "10.244.4.0/24", Duration::from_secs(15));
    assert!(
        wait_until(Duration::from_secs(10), || !routed(
            &t.h1.ns,
            "10.244.3.0/24"
        ) && !routed(
            &t.h2.ns,
            "10.244.3.0/24"
        )),
        "a node deleted during the compaction is still routed"
    );
    eprintln!("410 Gone: relisted; the changes made meanwhile applied after {took:?}");
    // The watches missed both changes and their history is gone: only a list shows them.
    assert!(
        api.list_count() >= lists + 2,
        "the agents did not relist ({} lists, {lists} before)",
        api.list_count()
    );
    still_fine(&mut t, "410 Gone");
}

#[test]
fn an_api_server_restart_keeps_the_datapath_and_applies_what_changed_meanwhile() {
    if !require_root() {
        return;
    }
    let mut bench = KubeBench::new();
    bench.api.add_node("h3", &["10.244.5.0/24"]);
    let mut t = two(&mut bench);

    bench.stop_api();
    let down = Instant::now();
    // Both agents notice (their watch fails), keep the datapath and stay ready: the last
    // known peer set is still right as far as anyone can tell.
    assert!(
        wait_until(Duration::from_secs(20), || {
            t.a1.log().contains("node watch failed") && t.a2.log().contains("node watch failed")
        }),
        "the agents did not notice the outage\n{}",
        t.a1.log()
    );
    still_fine(&mut t, "API server down");
    // Meanwhile: a node joins (written to the stored state; visible only once the server
    // is back), and a third host's agent starts — it cannot get its lease, so it is not
    // ready.
    bench
        .api
        .add_flannel_node("p6", "10.244.6.0/24", "198.18.0.96", DATA);
    let h3 = bench.underlay.add_host(3);
    let mut a3 = start_agent(&h3.ns, "h3", &bench.api, "kernel", &HEALTHZ);
    assert!(
        wait_until(Duration::from_secs(10), || readyz(&h3.ns)
            .starts_with("HTTP/1.1 503")),
        "h3 during the outage: {}",
        readyz(&h3.ns)
    );
    assert!(
        !a3.subnet_env().exists(),
        "h3 wrote subnet.env without a lease"
    );
    // The outage lasts a while: longer than the watchers' first backoff steps.
    assert!(
        wait_until(Duration::from_secs(20), || down.elapsed()
            > Duration::from_secs(5)
            && pods_talk(&t.h1, &t.h2)),
        "pods stopped talking while the API server was down"
    );
    let outage = down.elapsed();

    bench.resume_api();
    let up = Instant::now();
    let took = both_route(&t, "10.244.6.0/24", Duration::from_secs(60));
    assert!(
        wait_until(Duration::from_secs(60), || is_ready(&h3.ns)),
        "h3 not ready after the API server came back\n{}",
        a3.log()
    );
    let h3_ready = up.elapsed();
    assert!(
        wait_until(Duration::from_secs(20), || routed(
            &t.h1.ns,
            "10.244.5.0/24"
        )),
        "h1 never learnt h3\n{}",
        t.a1.log()
    );
    eprintln!(
        "API server down {outage:?}: pods kept talking, agents stayed ready; after it came back a node added meanwhile was programmed on both hosts in {took:?}, the agent started during the outage was ready in {h3_ready:?}"
    );
    still_fine(&mut t, "API server back");
    assert!(a3.child.running(), "h3 agent died\n{}", a3.log());
}
