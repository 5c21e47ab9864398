//! `flanneld cleanup [agent flags]`: remove everything flanneld created on this host, for
//! uninstalling, and nothing else. Run it after the agent stopped (a running agent would
//! put its state back). Idempotent: a second run finds nothing and succeeds.
//!
//! What it removes, each recognised by a mark only flanneld sets:
//! * the eBPF pins under `--bpf-pin-path` (removing the tcx link pins detaches the programs,
//!   and the maps go with their last reference);
//! * the VXLAN devices `flannel.<VNI>` / `flannel-v6.<VNI>` (kind vxlan); their routes,
//!   neighbours and FDB entries go with them;
//! * routes with `rtm_protocol` 84 ([`RTPROT_FLANNEL`]): host-gw and DirectRouting routes,
//!   the `--ip-blackhole-route` route; then nexthop objects with protocol 84 (those of
//!   DirectRouting routes; the VXLAN devices' went with them);
//! * the nftables table `flannel-ipv4` and the iptables `FLANNEL-*` chains with their jumps,
//!   then the `ip nat` / `ip filter` tables iptables-nft leaves behind, when nothing at all
//!   is left in them; the VXLAN peer guard's table `inet flannel-vxlan-guard`;
//! * `--subnet-file` (`subnet.env`).
//!
//! Not flanneld's, so left alone: `cni0` and the pods' veths (the bridge CNI plugin's), the
//! CNI config and binary (the DaemonSet's init containers install them; see deploy/).

use std::path::Path;

use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};

use crate::{
    backend::ebpf::PinLayout,
    config::Config,
    net::{
        masq,
        netlink::{self, Netlink, NlFamily, RTPROT_FLANNEL},
        vxlan_guard,
    },
};

/// Why cleanup stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A netlink request failed.
    #[error(transparent)]
    Netlink(#[from] netlink::Error),
    /// Removing the rules failed.
    #[error("removing masquerade/forward rules: {0}")]
    Rules(#[from] masq::Error),
    /// Removing a file or pin failed.
    #[error("removing {path}: {source}")]
    Remove {
        /// What.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Whether `name` is one of the VXLAN device names flanneld uses.
pub fn is_flannel_device_name(name: &str) -> bool {
    ["flannel.", "flannel-v6."].iter().any(|prefix| {
        name.strip_prefix(prefix)
            .is_some_and(|vni| !vni.is_empty() && vni.bytes().all(|b| b.is_ascii_digit()))
    })
}

fn is_vxlan(link: &LinkMessage) -> bool {
    link.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos
            .iter()
            .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Vxlan))),
        _ => false,
    })
}

/// Remove everything; returns one line per thing removed (empty: nothing was left).
pub async fn run(config: &Config) -> Result<Vec<String>, Error> {
    let mut removed = Vec::new();
    let pins = PinLayout::new(&config.ebpf.pin_root);
    if config.ebpf.pin_root.exists() {
        pins.remove_all().map_err(|source| Error::Remove {
            path: config.ebpf.pin_root.display().to_string(),
            source,
        })?;
        removed.push(format!("eBPF pins {}", config.ebpf.pin_root.display()));
    }

    let nl = Netlink::connect()?;
    for link in nl.links().await? {
        let Some(name) = netlink::link_name(&link) else {
            continue;
        };
        if is_flannel_device_name(name) && is_vxlan(&link) {
            let name = name.to_owned();
            if nl.link_del(link.header.index).await? {
                removed.push(format!("device {name}"));
            }
        }
    }
    remove_routes::<ipnetwork::Ipv4Network>(&nl, &mut removed).await?;
    remove_routes::<ipnetwork::Ipv6Network>(&nl, &mut removed).await?;
    for nh in nl.nexthops().await?.unwrap_or_default() {
        if nh.protocol == RTPROT_FLANNEL && nl.nexthop_del(nh.id).await? {
            removed.push(format!("nexthop {} proto {RTPROT_FLANNEL}", nh.id));
        }
    }

    // Absent rules are fine, so this cannot tell whether there were any.
    masq::teardown().await?;
    vxlan_guard::teardown().await?;
    for table in masq::drop_empty_iptables_nft_tables().await? {
        removed.push(format!("empty iptables-nft table ip {table}"));
    }

    remove_file(&config.subnet_file, &mut removed)?;
    Ok(removed)
}

/// Every route of family `N` this agent created (protocol 84).
async fn remove_routes<N: NlFamily>(nl: &Netlink, removed: &mut Vec<String>) -> Result<(), Error> {
    for route in nl.routes::<N>().await? {
        if u8::from(route.header.protocol) != RTPROT_FLANNEL {
            continue;
        }
        let what =
            netlink::route_dst::<N>(&route).map_or_else(|| "?".to_owned(), |d| d.to_string());
        if nl.route_del(netlink::route_del_from(&route)).await? {
            removed.push(format!("route {what} proto {RTPROT_FLANNEL}"));
        }
    }
    Ok(())
}

fn remove_file(path: &Path, removed: &mut Vec<String>) -> Result<(), Error> {
    match std::fs::remove_file(path) {
        Ok(()) => {
            removed.push(format!("file {}", path.display()));
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Remove {
            path: path.display().to_string(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_flannel_device_names_match() {
        for n in ["flannel.1", "flannel.4096", "flannel-v6.1"] {
            assert!(is_flannel_device_name(n), "{n}");
        }
        for n in [
            "flannel.",
            "flannel.1x",
            "flannel0",
            "cni0",
            "xflannel.1",
            "flannel-v6.",
        ] {
            assert!(!is_flannel_device_name(n), "{n}");
        }
    }
}
