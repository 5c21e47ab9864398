//! The VXLAN peer guard: an nftables table that drops UDP to the VXLAN port from every
//! address that is not a known peer's, so the kernel VXLAN device — which accepts VXLAN
//! from anyone — only ever sees what the eBPF known-peer check would let through.
//!
//! Why a second check next to the program's: the kernel path is reachable without it
//! (programs detached or not yet attached, the agent stopped), and the input hook runs
//! after IP reassembly, so it judges a fragmented datagram as a whole. On by default on the
//! eBPF datapath, off on `--dataplane=kernel` (upstream accepts anyone) unless
//! `--vxlan-peer-check=true`. With IPv6 (`flannel-v6.<VNI>`, which no program guards) the
//! same holds for VXLAN over IPv6, from the peers' `PublicIPv6`.
//!
//! ```text
//! table inet flannel-vxlan-guard {
//!     counter dropped { … }
//!     set peers { type ipv4_addr; elements = { <every peer's sending addresses> } }
//!     set peers6 { type ipv6_addr; elements = { <their IPv6 addresses> } }   # IPv6 only
//!     set strangers { type ipv4_addr; size 1024; flags dynamic,timeout; timeout 1h; }
//!     set strangers6 { type ipv6_addr; … }                                   # IPv6 only
//!     chain input {
//!         type filter hook input priority filter; policy accept;
//!         udp dport 8472 ip saddr != @peers update @strangers { ip saddr counter } counter name "dropped" drop
//!         udp dport 8472 ip6 saddr != @peers6 update @strangers6 { ip6 saddr counter } counter name "dropped" drop
//!     }
//! }
//! ```
//!
//! `strangers` counts what was dropped by source; [`name_strangers`] reads it and logs each
//! source once with the remedy, as the eBPF datapath does for what its check drops.
//!
//! A peer event writes only the addresses that changed; the first write (and every repair)
//! rewrites the set and the rules in one `nft -f` transaction (no window with an empty
//! set); the named counter survives rewrites. The periodic resync ([`PeerGuard::replace_all`])
//! reads the table back (`nft -j list table`) and rewrites it only when it is not what was
//! written — a flushed table, a deleted element, an edited rule — recording the repair.
//! At thousands of peers that listing takes ~100 ms on a busy host, so the agent's resync
//! takes it off the event path ([`PeerGuard::reader`]) and compares afterwards
//! ([`PeerGuard::replace_all_with`]), leaving alone the addresses events wrote meanwhile.
//! The scripts run through [`crate::net::masq`]'s tool runner, the one place the agent
//! starts `nft`.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::IpAddr,
    time::Duration,
};

use tracing::{info, warn};

use super::masq;
use crate::{
    lease::SubnetId,
    repair::{self, RepairKind},
};

/// The table (family `inet`).
pub const TABLE: &str = "flannel-vxlan-guard";

/// Which addresses may send VXLAN to this host, kept in the nftables set.
#[derive(Debug)]
pub struct PeerGuard {
    port: u16,
    /// Whether VXLAN over IPv6 is guarded too (the host has `flannel-v6.<VNI>`).
    ipv6: bool,
    /// Sending addresses per peer, by its subnet(s) (a delete event names only those).
    senders: BTreeMap<SubnetId, BTreeSet<IpAddr>>,
    /// What the kernel holds, as far as we know; `None` forces the next write.
    applied: Option<BTreeSet<IpAddr>>,
    /// The chain and its rules as the kernel listed them right after the last full write
    /// (so nft's own rendering never reads as a difference); peer events leave them alone.
    golden_rules: Option<Vec<serde_json::Value>>,
    /// No `nft` binary: warned once, nothing to maintain.
    unavailable: bool,
    /// Full writes so far: a listing read across one is compared with the wrong rules.
    full_writes: u64,
}

/// A resync's read of the table, taken while lease events went on (see
/// [`PeerGuard::reader`]).
pub struct GuardRead {
    /// What the guard had written when the read began.
    applied: BTreeSet<IpAddr>,
    /// [`PeerGuard::full_writes`] then.
    full_writes: u64,
    listing: masq::Result<Listing>,
}

/// `nft -j list table inet flannel-vxlan-guard`, parsed (no table: an empty listing).
async fn read_listing() -> masq::Result<Listing> {
    match masq::nft_json(&["list", "table", "inet", TABLE]).await {
        Ok(json) => Ok(Listing::parse(&json)),
        // No table: `nft` says so with an error.
        Err(masq::Error::Failed { .. }) => Ok(Listing::default()),
        Err(e) => Err(e),
    }
}

impl PeerGuard {
    /// A guard for VXLAN on `port` (over IPv6 as well with `ipv6`); nothing is written
    /// until the first peer update.
    pub fn new(port: u16, ipv6: bool) -> Self {
        Self {
            port,
            ipv6,
            senders: BTreeMap::new(),
            applied: None,
            golden_rules: None,
            unavailable: false,
            full_writes: 0,
        }
    }

    /// The table's listing as a future that borrows nothing, for a resync to read while
    /// lease events go on; `None` when there is nothing to compare yet (nothing written,
    /// or no `nft`): [`replace_all_with`](Self::replace_all_with) then writes it whole.
    pub fn reader(&self) -> Option<impl Future<Output = GuardRead> + Send + 'static> {
        if self.unavailable || self.golden_rules.is_none() {
            return None;
        }
        let applied = self.applied.clone()?;
        let full_writes = self.full_writes;
        Some(async move {
            GuardRead {
                applied,
                full_writes,
                listing: read_listing().await,
            }
        })
    }

    /// The peer owning `subnet` sends from `addrs` (added or changed).
    pub async fn set_peer(
        &mut self,
        subnet: SubnetId,
        addrs: impl IntoIterator<Item = IpAddr>,
    ) -> masq::Result<()> {
        self.senders.insert(subnet, addrs.into_iter().collect());
        self.apply().await
    }

    /// The peer owning `subnet` is gone.
    pub async fn remove_peer(&mut self, subnet: SubnetId) -> masq::Result<()> {
        self.senders.remove(&subnet);
        self.apply().await
    }

    /// The peer set is exactly `peers`: reads the table back and, when it is not what was
    /// written (flushed, an element deleted or added, the chain or a rule changed),
    /// rewrites it whole and records the repair. A mere change of peers since the last
    /// write is applied as a delta, not counted as a repair.
    pub async fn replace_all(
        &mut self,
        peers: impl IntoIterator<Item = (SubnetId, Vec<IpAddr>)>,
    ) -> masq::Result<()> {
        self.replace_all_with(peers, None).await
    }

    /// [`replace_all`](Self::replace_all), comparing with `read` when it was taken by
    /// [`reader`](Self::reader) (else the table is listed now). Addresses written by peer
    /// events since the read began (what was applied then and now differ in) are left out
    /// of the comparison: the listing may predate them. A full rewrite since makes the
    /// read useless: listed again.
    pub async fn replace_all_with(
        &mut self,
        peers: impl IntoIterator<Item = (SubnetId, Vec<IpAddr>)>,
        read: Option<GuardRead>,
    ) -> masq::Result<()> {
        self.senders = peers
            .into_iter()
            .map(|(net, addrs)| (net, addrs.into_iter().collect()))
            .collect();
        if self.unavailable {
            return Ok(());
        }
        if let (Some(applied), Some(golden)) = (&self.applied, &self.golden_rules) {
            let (listing, skip) = match read.filter(|r| r.full_writes == self.full_writes) {
                Some(r) => {
                    let skip: BTreeSet<IpAddr> =
                        r.applied.symmetric_difference(applied).copied().collect();
                    (r.listing?, skip)
                }
                None => (read_listing().await?, BTreeSet::new()),
            };
            match listing.differs_except(self.ipv6, applied, golden, &skip) {
                None => return self.apply().await,
                Some(what) => {
                    self.applied = None;
                    self.apply().await?;
                    repair::record(
                        RepairKind::PeerGuard,
                        format!("nftables table inet {TABLE}: {what}; rewritten"),
                    );
                    return Ok(());
                }
            }
        }
        self.applied = None;
        self.apply().await
    }

    /// Whether VXLAN over IPv6 is guarded too.
    pub fn ipv6(&self) -> bool {
        self.ipv6
    }

    /// Every address allowed to send (IPv6 ones only when IPv6 is guarded).
    pub fn allowed(&self) -> BTreeSet<IpAddr> {
        self.senders
            .values()
            .flatten()
            .filter(|a| self.ipv6 || a.is_ipv4())
            .copied()
            .collect()
    }

    async fn apply(&mut self) -> masq::Result<()> {
        if self.unavailable {
            return Ok(());
        }
        let want = self.allowed();
        if self.applied.as_ref() == Some(&want) {
            return Ok(());
        }
        // A peer event changes an address or two: write just that (a full rewrite of
        // thousands of elements per event would make every event O(N)). Should the delta
        // fail (the table was flushed under us), the full script puts everything back.
        let delta = self
            .applied
            .as_ref()
            .map(|applied| delta_script(applied, &want));
        let mut result = match &delta {
            Some(d) => masq::nft(d).await,
            None => masq::nft(&script(self.port, self.ipv6, &want)).await,
        };
        let mut full = delta.is_none();
        if delta.is_some() && matches!(result, Err(masq::Error::Failed { .. })) {
            result = masq::nft(&script(self.port, self.ipv6, &want)).await;
            full = true;
        }
        match result {
            Ok(()) => {}
            Err(masq::Error::Spawn { source, .. }) => {
                warn!(error = %source, "cannot run nft: VXLAN from non-peers is not filtered on the kernel device path");
                self.unavailable = true;
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        if self.applied.is_none() {
            info!(
                table = TABLE,
                port = self.port,
                ipv6 = self.ipv6,
                peers = want.len(),
                "VXLAN peer guard in place"
            );
        }
        if full {
            self.full_writes += 1;
            // What the rules look like now, for the resync to compare with.
            self.golden_rules = match masq::nft_json(&["list", "table", "inet", TABLE]).await {
                Ok(json) => Some(Listing::parse(&json).rules),
                Err(_) => None,
            };
        }
        self.applied = Some(want);
        Ok(())
    }
}

/// What `nft -j list table inet flannel-vxlan-guard` shows of the guard: the peer sets'
/// elements and the chain with its rules (handles left out: a rewrite renumbers them).
/// The `strangers` sets and the counter are not compared: they are state, and the rules
/// referring to them cannot exist without them.
#[derive(Debug, Default, PartialEq)]
pub struct Listing {
    /// `peers` (IPv4), `None` when the set is missing.
    pub peers: Option<BTreeSet<IpAddr>>,
    /// `peers6`, `None` when missing.
    pub peers6: Option<BTreeSet<IpAddr>>,
    /// The `input` chain and its rules, in order (empty when the chain is missing).
    pub rules: Vec<serde_json::Value>,
}

impl Listing {
    /// Parse `nft -j list table` output (anything unreadable is an empty listing).
    pub fn parse(json: &str) -> Self {
        let mut l = Self::default();
        let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
            return l;
        };
        for o in v["nftables"].as_array().into_iter().flatten() {
            if let Some(set) = o.get("set") {
                let elems: BTreeSet<IpAddr> = set["elem"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|e| {
                        // Plain sets list bare values; sets with per-element state objects.
                        e.as_str()
                            .or_else(|| e["elem"]["val"].as_str())?
                            .parse()
                            .ok()
                    })
                    .collect();
                match set["name"].as_str() {
                    Some("peers") => l.peers = Some(elems),
                    Some("peers6") => l.peers6 = Some(elems),
                    _ => {}
                }
            }
            for kind in ["chain", "rule"] {
                if let Some(obj) = o.get(kind)
                    && obj["name"].as_str().or(obj["chain"].as_str()) == Some("input")
                {
                    let mut obj = obj.clone();
                    if let Some(m) = obj.as_object_mut() {
                        m.remove("handle");
                    }
                    l.rules.push(serde_json::json!({ kind: obj }));
                }
            }
        }
        l
    }

    /// Why this listing is not the guard as written (`applied` in the sets, the chain and
    /// rules as `golden`), or `None` when it is.
    pub fn differs(
        &self,
        ipv6: bool,
        applied: &BTreeSet<IpAddr>,
        golden: &[serde_json::Value],
    ) -> Option<String> {
        self.differs_except(ipv6, applied, golden, &BTreeSet::new())
    }

    /// [`differs`](Self::differs), the addresses in `skip` (changed since the listing was
    /// taken) compared in neither direction.
    pub fn differs_except(
        &self,
        ipv6: bool,
        applied: &BTreeSet<IpAddr>,
        golden: &[serde_json::Value],
        skip: &BTreeSet<IpAddr>,
    ) -> Option<String> {
        if self.peers.is_none() && self.rules.is_empty() {
            return Some("missing".to_owned());
        }
        let mut wrong = Vec::new();
        let families: &[(&str, bool, &Option<BTreeSet<IpAddr>>)] = if ipv6 {
            &[
                ("peers", true, &self.peers),
                ("peers6", false, &self.peers6),
            ]
        } else {
            &[("peers", true, &self.peers)]
        };
        for (name, v4, have) in families {
            let want: BTreeSet<IpAddr> = applied
                .iter()
                .filter(|a| a.is_ipv4() == *v4)
                .copied()
                .collect();
            let Some(have) = have else {
                wrong.push(format!("set {name} missing"));
                continue;
            };
            let lacked: Vec<String> = want
                .difference(have)
                .filter(|a| !skip.contains(a))
                .map(IpAddr::to_string)
                .collect();
            let extra: Vec<String> = have
                .difference(&want)
                .filter(|a| !skip.contains(a))
                .map(IpAddr::to_string)
                .collect();
            if !lacked.is_empty() {
                wrong.push(format!("set {name} lacked {}", lacked.join(", ")));
            }
            if !extra.is_empty() {
                wrong.push(format!("set {name} held {}", extra.join(", ")));
            }
        }
        if self.rules != golden {
            wrong.push("chain input or its rules changed".to_owned());
        }
        (!wrong.is_empty()).then(|| wrong.join("; "))
    }
}

/// The `nft -f` script that makes the table hold exactly `allowed` for `port`, over IPv4
/// and, with `ipv6`, over IPv6.
pub fn script(port: u16, ipv6: bool, allowed: &BTreeSet<IpAddr>) -> String {
    let t = format!("inet {TABLE}");
    let mut s = format!(
        "add table {t} {{ comment \"flanneld: VXLAN only from known peers\" ; }}\n\
         add set {t} peers {{ type ipv4_addr ; comment \"addresses peers send VXLAN from\" ; }}\n"
    );
    // Dropped VXLAN by source, for the operator; never flushed, so counts survive rewrites.
    s.push_str(&format!(
        "add set {t} strangers {{ type ipv4_addr ; size 1024 ; flags dynamic,timeout ; timeout 1h ; }}\n"
    ));
    if ipv6 {
        s.push_str(&format!(
            "add set {t} peers6 {{ type ipv6_addr ; comment \"addresses peers send VXLAN over IPv6 from\" ; }}\n\
             add set {t} strangers6 {{ type ipv6_addr ; size 1024 ; flags dynamic,timeout ; timeout 1h ; }}\n"
        ));
    }
    s.push_str(&format!(
        "add counter {t} dropped\n\
         add chain {t} input {{ type filter hook input priority filter ; policy accept ; }}\n\
         flush chain {t} input\n\
         flush set {t} peers\n"
    ));
    if ipv6 {
        s.push_str(&format!("flush set {t} peers6\n"));
    }
    s.push_str(&elements("add", allowed));
    s.push_str(&format!(
        "add rule {t} input meta nfproto ipv4 udp dport {port} ip saddr != @peers update @strangers {{ ip saddr counter }} counter name dropped drop comment \"VXLAN from an address that is no peer's\"\n"
    ));
    if ipv6 {
        s.push_str(&format!(
            "add rule {t} input meta nfproto ipv6 udp dport {port} ip6 saddr != @peers6 update @strangers6 {{ ip6 saddr counter }} counter name dropped drop comment \"VXLAN from an address that is no peer's\"\n"
        ));
    }
    s
}

/// `<verb> element` lines putting `addrs` into (or out of) the set of their family.
fn elements(verb: &str, addrs: &BTreeSet<IpAddr>) -> String {
    let t = format!("inet {TABLE}");
    let mut s = String::new();
    for (set, v4) in [("peers", true), ("peers6", false)] {
        let list: Vec<String> = addrs
            .iter()
            .filter(|a| a.is_ipv4() == v4)
            .map(IpAddr::to_string)
            .collect();
        if !list.is_empty() {
            s.push_str(&format!(
                "{verb} element {t} {set} {{ {} }}\n",
                list.join(", ")
            ));
        }
    }
    s
}

/// The `nft -f` script that turns the sets from `applied` into `want` (the table, chains
/// and rules already exist). Adding an element that is there or deleting one that is not
/// fails the transaction, which the caller answers with the full [`script`].
pub fn delta_script(applied: &BTreeSet<IpAddr>, want: &BTreeSet<IpAddr>) -> String {
    let added: BTreeSet<IpAddr> = want.difference(applied).copied().collect();
    let removed: BTreeSet<IpAddr> = applied.difference(want).copied().collect();
    elements("add", &added) + &elements("delete", &removed)
}

/// The warning for a source of dropped VXLAN, the same whichever check dropped it (`by`):
/// what to do if it is in fact a flannel host sending from an address its lease does not
/// name.
pub fn warn_stranger(src: IpAddr, packets: u64, by: &'static str) {
    warn!(
        source = %src,
        packets,
        by,
        "VXLAN from {src} is not from a known peer and is dropped; if it is a flannel \
         host sending from an address its lease does not name, make that address \
         known (kube: the node's InternalIP/ExternalIP or its public-ip-overwrite \
         annotation; etcd: --public-ip on that host), or turn the check off with \
         --vxlan-peer-check=false"
    );
}

/// How often [`name_strangers`] lists the sets (one `nft` run per family).
const STRANGERS_POLL: Duration = Duration::from_secs(5);

/// Read the `strangers` sets every [`STRANGERS_POLL`] until `cancel`, warning once per
/// source ([`warn_stranger`]); ends quietly when `nft` cannot run.
pub async fn name_strangers(ipv6: bool, cancel: tokio_util::sync::CancellationToken) {
    let mut logged: HashSet<IpAddr> = HashSet::new();
    let sets: &[&str] = if ipv6 {
        &["strangers", "strangers6"]
    } else {
        &["strangers"]
    };
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(STRANGERS_POLL) => {}
        }
        for set in sets {
            let json = match masq::nft_json(&["list", "set", "inet", TABLE, set]).await {
                Ok(json) => json,
                Err(masq::Error::Spawn { .. }) => return,
                // The table is being rewritten, or was flushed: the resync puts it back.
                Err(_) => continue,
            };
            for (src, packets) in parse_strangers(&json) {
                if logged.len() >= 65_536 {
                    logged.clear();
                }
                if logged.insert(src) {
                    warn_stranger(src, packets, "nftables peer guard");
                }
            }
        }
    }
}

/// How often [`watch_chain`] lists the guard's chain.
pub const CHAIN_POLL: Duration = Duration::from_secs(2);

/// Until `cancel`, every [`CHAIN_POLL`]: asks for a resync when the guard's chain is gone
/// or reads differently from the poll before (`nft flush ruleset`, a firewall reload, an
/// edited rule), so those are repaired in seconds rather than at the periodic resync
/// (which compares everything and decides whether anything is to be repaired). Only the
/// change is reported, so a chain that stays different asks once, not every poll. The
/// listing is a few lines whatever the number of peers (the set is named, not listed); a
/// deleted element is left to the periodic resync. Ends quietly when `nft` cannot run.
pub async fn watch_chain(
    tx: tokio::sync::mpsc::Sender<super::monitor::Trigger>,
    cancel: tokio_util::sync::CancellationToken,
) {
    let mut last: Option<String> = None;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(CHAIN_POLL) => {}
        }
        let now = match masq::nft_list(&["list", "chain", "inet", TABLE, "input"]).await {
            Ok(listing) => Some(listing),
            Err(masq::Error::Spawn { .. }) => return,
            // Not written yet (no peer update so far), or gone.
            Err(_) => None,
        };
        if last.is_some() && now != last {
            let _ = tx.try_send(super::monitor::Trigger::Kernel(format!(
                "nftables chain inet {TABLE} input missing or changed"
            )));
        }
        last = now;
    }
}

/// The elements of a `strangers` set in `nft -j list set` output: each source with its
/// packet count.
pub fn parse_strangers(json: &str) -> Vec<(IpAddr, u64)> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return Vec::new();
    };
    v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["set"]["elem"].as_array())
        .flatten()
        .filter_map(|e| {
            let elem = &e["elem"];
            let src = elem["val"].as_str()?.parse().ok()?;
            Some((src, elem["counter"]["packets"].as_u64().unwrap_or(0)))
        })
        .collect()
}

/// Remove the table (absent is fine): for an explicit uninstall and for tests.
pub async fn teardown() -> masq::Result<()> {
    match masq::nft(&format!(
        "add table inet {TABLE}\ndelete table inet {TABLE}\n"
    ))
    .await
    {
        Err(masq::Error::Spawn { .. }) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_lists_every_sender_once_and_drops_the_rest() {
        let allowed: BTreeSet<IpAddr> = ["198.18.0.3", "198.18.0.2"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let s = script(8472, false, &allowed);
        assert!(
            s.contains("add element inet flannel-vxlan-guard peers { 198.18.0.2, 198.18.0.3 }"),
            "{s}"
        );
        assert!(
            s.contains("udp dport 8472 ip saddr != @peers update @strangers"),
            "{s}"
        );
        // The set is flushed before it is refilled, in the same transaction.
        assert!(s.find("flush set").unwrap() < s.find("add element").unwrap());
        // No peers: no (invalid) empty element list, and everything is dropped.
        let empty = script(4789, false, &BTreeSet::new());
        assert!(!empty.contains("add element"), "{empty}");
        assert!(empty.contains("udp dport 4789"), "{empty}");
        assert!(!s.contains("peers6"), "no IPv6 set without IPv6: {s}");
    }

    #[test]
    fn with_ipv6_the_v6_senders_go_into_their_own_set_and_rule() {
        let allowed: BTreeSet<IpAddr> = ["198.18.0.2", "fd00:198::2"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let s = script(8472, true, &allowed);
        assert!(
            s.contains("add element inet flannel-vxlan-guard peers { 198.18.0.2 }"),
            "{s}"
        );
        assert!(
            s.contains("add element inet flannel-vxlan-guard peers6 { fd00:198::2 }"),
            "{s}"
        );
        assert!(
            s.contains(
                "meta nfproto ipv6 udp dport 8472 ip6 saddr != @peers6 update @strangers6 { ip6 saddr counter } counter name dropped drop"
            ),
            "{s}"
        );
        assert!(
            s.find("flush set inet flannel-vxlan-guard peers6").unwrap()
                < s.find("peers6 { fd00").unwrap()
        );
    }

    #[test]
    fn strangers_are_counted_by_source_and_read_back_from_nft_json() {
        let s = script(8472, false, &BTreeSet::new());
        assert!(
            s.contains("ip saddr != @peers update @strangers { ip saddr counter } counter name dropped drop"),
            "{s}"
        );
        assert!(
            !s.contains("flush set inet flannel-vxlan-guard strangers"),
            "{s}"
        );
        // nft 1.0.6's listing of such a set.
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"set": {"family": "inet", "name": "strangers", "table": "flannel-vxlan-guard", "type": "ipv4_addr", "elem": [{"elem": {"val": "198.18.1.66", "expires": 3599, "counter": {"packets": 3, "bytes": 87}}}]}}]}"#;
        assert_eq!(
            parse_strangers(json),
            vec![("198.18.1.66".parse().unwrap(), 3)]
        );
        assert!(parse_strangers("not json").is_empty());
    }

    #[test]
    fn delta_script_adds_and_deletes_only_what_changed() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let applied: BTreeSet<IpAddr> = [ip("198.18.0.2"), ip("198.18.0.3")].into();
        let want: BTreeSet<IpAddr> = [ip("198.18.0.3"), ip("198.18.0.4"), ip("fd00::4")].into();
        assert_eq!(
            delta_script(&applied, &want),
            "add element inet flannel-vxlan-guard peers { 198.18.0.4 }\n\
             add element inet flannel-vxlan-guard peers6 { fd00::4 }\n\
             delete element inet flannel-vxlan-guard peers { 198.18.0.2 }\n"
        );
    }

    #[test]
    fn the_resync_tells_a_tampered_table_from_the_one_written() {
        // nft 1.0.6's listing of the table as `script` writes it (one peer, IPv4 only).
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"table": {"family": "inet", "name": "flannel-vxlan-guard", "handle": 1}}, {"counter": {"family": "inet", "name": "dropped", "table": "flannel-vxlan-guard", "handle": 4, "packets": 0, "bytes": 0}}, {"set": {"family": "inet", "name": "peers", "table": "flannel-vxlan-guard", "type": "ipv4_addr", "handle": 1, "elem": ["198.18.0.2", "198.18.0.3"]}}, {"set": {"family": "inet", "name": "strangers", "table": "flannel-vxlan-guard", "type": "ipv4_addr", "handle": 2, "size": 1024, "flags": ["timeout"], "timeout": 3600}}, {"chain": {"family": "inet", "table": "flannel-vxlan-guard", "name": "input", "handle": 5, "type": "filter", "hook": "input", "prio": 0, "policy": "accept"}}, {"rule": {"family": "inet", "table": "flannel-vxlan-guard", "chain": "input", "handle": 6, "expr": [{"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "@peers"}}, {"drop": null}]}}]}"#;
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let l = Listing::parse(json);
        let golden = l.rules.clone();
        assert_eq!(golden.len(), 2, "{golden:?}");
        let applied: BTreeSet<IpAddr> = [ip("198.18.0.2"), ip("198.18.0.3")].into();
        assert_eq!(l.differs(false, &applied, &golden), None);
        // A rewrite renumbers handles: not a difference.
        let renumbered = Listing::parse(&json.replace("\"handle\": 6", "\"handle\": 9"));
        assert_eq!(renumbered.differs(false, &applied, &golden), None);
        // One element deleted.
        let fewer: BTreeSet<IpAddr> = [ip("198.18.0.2"), ip("198.18.0.3"), ip("198.18.0.4")].into();
        assert_eq!(
            l.differs(false, &fewer, &golden).as_deref(),
            Some("set peers lacked 198.18.0.4")
        );
        // The rule turned into an accept.
        let edited = Listing::parse(&json.replace("\"drop\"", "\"accept\""));
        assert_eq!(
            edited.differs(false, &applied, &golden).as_deref(),
            Some("chain input or its rules changed")
        );
        // Flushed (nft fails to list it).
        assert_eq!(
            Listing::default()
                .differs(false, &applied, &golden)
                .as_deref(),
            Some("missing")
        );
        // Guarding IPv6 too, a missing peers6 set is a difference.
        assert_eq!(
            l.differs(true, &applied, &golden).as_deref(),
            Some("set peers6 missing")
        );
    }

    #[test]
    fn a_listing_taken_before_peer_events_is_compared_without_their_addresses() {
        let json = r#"{"nftables": [{"set": {"family": "inet", "name": "peers", "table": "flannel-vxlan-guard", "type": "ipv4_addr", "handle": 1, "elem": ["198.18.0.2", "198.18.0.3", "198.18.0.5"]}}]}"#;
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let l = Listing::parse(json);
        // Listed with .2 .3 .5; events since added .4 and removed .3; someone deleted .5.
        let then: BTreeSet<IpAddr> = [ip("198.18.0.2"), ip("198.18.0.3"), ip("198.18.0.5")].into();
        let now: BTreeSet<IpAddr> = [ip("198.18.0.2"), ip("198.18.0.4"), ip("198.18.0.5")].into();
        let skip: BTreeSet<IpAddr> = then.symmetric_difference(&now).copied().collect();
        assert_eq!(l.differs_except(false, &now, &[], &skip), None);
        let tampered = Listing::parse(&json.replace(", \"198.18.0.5\"", ""));
        assert_eq!(
            tampered.differs_except(false, &now, &[], &skip).as_deref(),
            Some("set peers lacked 198.18.0.5"),
            "a deletion before the listing is still a difference"
        );
    }

    #[tokio::test]
    async fn a_delete_by_subnet_removes_that_peers_addresses() {
        let mut g = PeerGuard::new(8472, false);
        // Without nft writes: pretend nft is unavailable so only the bookkeeping runs.
        g.unavailable = true;
        let a: SubnetId = (Some("10.244.1.0/24".parse().unwrap()), None);
        let b: SubnetId = (None, Some("fd00:10:244:2::/64".parse().unwrap()));
        g.set_peer(
            a,
            ["198.18.0.1".parse().unwrap(), "192.0.2.1".parse().unwrap()],
        )
        .await
        .unwrap();
        g.set_peer(b, ["198.18.0.2".parse().unwrap()])
            .await
            .unwrap();
        assert_eq!(g.allowed().len(), 3);
        g.remove_peer(a).await.unwrap();
        assert_eq!(
            g.allowed().into_iter().collect::<Vec<_>>(),
            vec!["198.18.0.2".parse::<IpAddr>().unwrap()]
        );
    }
}
