//! The netfilter state of a real flannel node, for the benchmark: what kube-proxy (iptables
//! mode), the kubelet and upstream flanneld install, as `iptables-restore` input.
//!
//! Why: conntrack and these chains are per-packet work every upstream flannel node pays on
//! the kernel VXLAN path (the inner packet through PREROUTING/FORWARD/POSTROUTING, the
//! outer UDP packet through OUTPUT/POSTROUTING on the sender and PREROUTING/INPUT on the
//! receiver). A benchmark without them measures a node nobody runs.
//!
//! Shape, per kube-proxy's `syncProxyRules` (pkg/proxy/iptables/proxier.go): `nat`
//! PREROUTING and OUTPUT jump to `KUBE-SERVICES`, one match per ClusterIP there (a
//! `KUBE-SVC-*` chain per Service, a `KUBE-SEP-*` chain per endpoint with the DNAT), the
//! `KUBE-NODEPORTS` jump last; `KUBE-POSTROUTING` masquerades what `KUBE-MARK-MASQ`
//! marked. `filter` FORWARD: the firewall and Service chains for NEW connections,
//! `KUBE-FORWARD` (drop INVALID, accept marked, accept RELATED,ESTABLISHED). The kubelet's
//! `KUBE-FIREWALL` on INPUT/OUTPUT. flanneld's `FLANNEL-POSTRTG` and `FLANNEL-FWD` as
//! upstream writes them. The ClusterIPs (198.19.0.0/16) and endpoints are made up and no
//! benchmark traffic goes to them: NAT is looked at once per new connection, so what the
//! established flows pay is conntrack and the FORWARD/INPUT/OUTPUT matches.

use std::fmt::Write;

use ipnetwork::Ipv4Network;

/// How many Services the ruleset holds (two endpoints each).
pub const SERVICES: usize = 300;

/// The `iptables-restore` input for a node whose pod subnet is `subnet` in the cluster
/// network `network`, with `services` made-up ClusterIP Services.
pub fn iptables_rules(network: Ipv4Network, subnet: Ipv4Network, services: usize) -> String {
    let mut nat = String::new();
    let mut chains = String::from(
        ":KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n\
         :KUBE-MARK-MASQ - [0:0]\n:FLANNEL-POSTRTG - [0:0]\n",
    );
    nat.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
    );
    for i in 0..services {
        let ip = format!("198.19.{}.{}", i / 250, i % 250 + 1);
        let svc = format!("KUBE-SVC-BENCH{i:04}");
        let _ = writeln!(chains, ":{svc} - [0:0]");
        let _ = writeln!(
            nat,
            "-A KUBE-SERVICES -d {ip}/32 -p tcp -m comment --comment \"bench/svc-{i}:http cluster IP\" -m tcp --dport 80 -j {svc}"
        );
        let _ = writeln!(
            nat,
            "-A {svc} ! -s {network} -d {ip}/32 -p tcp -m comment --comment \"bench/svc-{i}:http cluster IP\" -m tcp --dport 80 -j KUBE-MARK-MASQ"
        );
        for (e, probability) in [(0, Some("0.50000000000")), (1, None)] {
            // Endpoints on other nodes of the made-up cluster (10.244.200+.x).
            let ep = format!("10.244.{}.{}", 200 + i % 50, 2 * (i / 50) + e + 2);
            let sep = format!("KUBE-SEP-BENCH{i:04}{e}");
            let _ = writeln!(chains, ":{sep} - [0:0]");
            match probability {
                Some(p) => {
                    let _ = writeln!(
                        nat,
                        "-A {svc} -m comment --comment \"bench/svc-{i}:http -> {ep}:8080\" -m statistic --mode random --probability {p} -j {sep}"
                    );
                }
                None => {
                    let _ = writeln!(
                        nat,
                        "-A {svc} -m comment --comment \"bench/svc-{i}:http -> {ep}:8080\" -j {sep}"
                    );
                }
            }
            let _ = writeln!(
                nat,
                "-A {sep} -s {ep}/32 -m comment --comment \"bench/svc-{i}:http\" -j KUBE-MARK-MASQ"
            );
            let _ = writeln!(
                nat,
                "-A {sep} -p tcp -m comment --comment \"bench/svc-{i}:http\" -m tcp -j DNAT --to-destination {ep}:8080"
            );
        }
    }
    nat.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    // flanneld's masquerade rules (upstream pkg/trafficmngr/iptables, MasqRules).
    let _ = write!(
        nat,
        "-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment \"flanneld masq\" -j RETURN\n\
         -A FLANNEL-POSTRTG -s {subnet} -d {network} -m comment --comment \"flanneld masq\" -j RETURN\n\
         -A FLANNEL-POSTRTG -s {network} -d {subnet} -m comment --comment \"flanneld masq\" -j RETURN\n\
         -A FLANNEL-POSTRTG ! -s {network} -d {subnet} -m comment --comment \"flanneld masq\" -j RETURN\n\
         -A FLANNEL-POSTRTG -s {network} ! -d 224.0.0.0/4 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully\n\
         -A FLANNEL-POSTRTG ! -s {network} -d {network} -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully\n"
    );
    let filter = format!(
        ":KUBE-FIREWALL - [0:0]\n:KUBE-PROXY-FIREWALL - [0:0]\n:KUBE-FORWARD - [0:0]\n\
         :KUBE-SERVICES - [0:0]\n:KUBE-EXTERNAL-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n\
         :FLANNEL-FWD - [0:0]\n\
         -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n\
         -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
         -A INPUT -j KUBE-FIREWALL\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
         -A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n\
         -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -j KUBE-FIREWALL\n\
         -A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment \"block incoming localnet connections\" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n\
         -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         -A FLANNEL-FWD -s {network} -m comment --comment \"flanneld forward\" -j ACCEPT\n\
         -A FLANNEL-FWD -d {network} -m comment --comment \"flanneld forward\" -j ACCEPT\n"
    );
    format!("*nat\n{chains}{nat}COMMIT\n*filter\n{filter}COMMIT\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_have_a_chain_per_service_and_endpoint_and_jump_from_the_base_chains() {
        let net: Ipv4Network = "10.244.0.0/16".parse().unwrap();
        let sub: Ipv4Network = "10.244.1.0/24".parse().unwrap();
        let r = iptables_rules(net, sub, 300);
        assert_eq!(r.matches(":KUBE-SVC-").count(), 300);
        assert_eq!(r.matches(":KUBE-SEP-").count(), 600);
        assert_eq!(r.matches("-j DNAT").count(), 600);
        assert!(r.contains(
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
        ));
        assert!(r.contains("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP"));
        assert!(
            r.contains("-d 198.19.1.50/32"),
            "ClusterIPs fill 198.19.x.1–250"
        );
        assert_eq!(r.matches("COMMIT").count(), 2);
    }
}
