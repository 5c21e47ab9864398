//! IP masquerade (`--ip-masq`) and forward-accept (`--iptables-forward-rules`) rules, as
//! upstream's `pkg/trafficmngr` installs them, in nftables or iptables mode.
//!
//! # How the agent calls this
//!
//! Per family, after the backend is registered and before `subnet.env` is written
//! (`agent::install_family_rules`): [`install`] once with a [`MasqConfig`] (the cluster
//! network, this host's subnet, `--ip-masq-fully-random-disable`, nftables or iptables); an error
//! stops the start, as upstream exits on it. Then [`resync_loop`], owned by the agent's
//! shutdown token, re-checks every `--iptables-resync` seconds and rewrites only what
//! differs, in both modes.
//!
//! The lower-level [`ensure_masq`] / [`ensure_forward`] rewrite one chain unconditionally.
//! Each install first removes the other implementation's objects, as upstream does at start.
//! [`teardown`] removes everything of both implementations (upstream never does this on
//! shutdown; it is for an explicit uninstall and for tests).
//!
//! # Rules (golden listings from upstream's `e2e/rules.go`)
//!
//! nftables: `table ip flannel-ipv4` with chain `postrtg` (nat, postrouting, srcnat) and
//! chain `forward` (filter, forward). iptables: chain `FLANNEL-POSTRTG` in `nat` jumped to
//! from the end of `POSTROUTING` (comment `flanneld masq`), chain `FLANNEL-FWD` in `filter`
//! jumped to from the end of `FORWARD` (comment `flanneld forward`).
//!
//! Rules are written as `nft -f -` / `iptables-restore --noflush` scripts: each call is one
//! kernel transaction (no window with a half-filled chain), and the script text is the
//! golden listing. Spawning those tools is confined to this module (the agent otherwise
//! uses netlink only); the VXLAN peer guard ([`crate::net::vxlan_guard`]) goes through
//! [`nft`] here too.

use std::{process::Stdio, time::Duration};

use ipnetwork::{Ipv4Network, Ipv6Network};
use tokio::{io::AsyncWriteExt, process::Command};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    repair::{self, RepairKind},
    wire::cidr::Cidr,
};

/// Comment on every masquerade rule (iptables mode).
pub const MASQ_COMMENT: &str = "flanneld masq";
/// Comment on every forward rule (iptables mode).
pub const FWD_COMMENT: &str = "flanneld forward";
/// The nftables table (IPv4).
pub const NFT_TABLE: &str = "flannel-ipv4";
/// The nftables table (IPv6).
pub const NFT_TABLE6: &str = "flannel-ipv6";
/// kube-proxy's masquerade mark: packets carrying it are left to kube-proxy.
const KUBE_PROXY_MARK: &str = "0x4000";

/// What differs between the IPv4 and IPv6 rule sets (upstream writes the same rules for
/// both, in `table ip flannel-ipv4` / `table ip6 flannel-ipv6`, or with `iptables` /
/// `ip6tables`).
pub trait RuleFamily: Cidr {
    /// nftables family and address keyword (`ip`, `ip6`).
    const NFT: &'static str;
    /// The nftables table.
    const TABLE: &'static str;
    /// Multicast, never masqueraded.
    const MULTICAST: &'static str;
    /// `iptables` or `ip6tables`.
    const IPTABLES: &'static str;
    /// `iptables-restore` or `ip6tables-restore`.
    const IPTABLES_RESTORE: &'static str;
}

impl RuleFamily for Ipv4Network {
    const NFT: &'static str = "ip";
    const TABLE: &'static str = NFT_TABLE;
    const MULTICAST: &'static str = "224.0.0.0/4";
    const IPTABLES: &'static str = "iptables";
    const IPTABLES_RESTORE: &'static str = "iptables-restore";
}

impl RuleFamily for Ipv6Network {
    const NFT: &'static str = "ip6";
    const TABLE: &'static str = NFT_TABLE6;
    const MULTICAST: &'static str = "ff00::/8";
    const IPTABLES: &'static str = "ip6tables";
    const IPTABLES_RESTORE: &'static str = "ip6tables-restore";
}

/// Errors of rule management.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The tool could not be started (not installed?).
    #[error("running {program}: {source}")]
    Spawn {
        /// `nft`, `iptables`, `iptables-restore`.
        program: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The tool rejected the rules.
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        /// The tool.
        program: &'static str,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed.
        stderr: String,
    },
}

/// Result of rule management.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the rules of one family are built from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MasqConfig<N = Ipv4Network> {
    /// The cluster network (`C`).
    pub network: N,
    /// This host's subnet, as a network (`P`, e.g. `10.244.1.0/24`).
    pub subnet: N,
    /// `--random-fully` / `fully-random` (upstream default on).
    pub fully_random: bool,
    /// nftables mode (`EnableNFTables`) rather than iptables.
    pub nftables: bool,
}

impl<N: RuleFamily> MasqConfig<N> {
    fn c(&self) -> String {
        // Normalise to the network address: "10.244.0.0/16", never "10.244.3.7/16".
        crate::wire::cidr::masked(self.network).to_string()
    }
    fn p(&self) -> String {
        crate::wire::cidr::masked(self.subnet).to_string()
    }
}

/// Install (or rewrite) the masquerade rules.
pub async fn ensure_masq<N: RuleFamily>(cfg: &MasqConfig<N>) -> Result<()> {
    if cfg.nftables {
        teardown_iptables::<N>().await?;
        nft(&nft_masq_script(cfg)).await?;
    } else {
        teardown_nft::<N>().await?;
        let jump =
            !iptables_rule_exists::<N>("nat", "POSTROUTING", MASQ_COMMENT, "FLANNEL-POSTRTG")
                .await?;
        iptables_restore::<N>(&iptables_masq_script(cfg, jump)).await?;
    }
    info!(network = %cfg.network, subnet = %cfg.subnet, nftables = cfg.nftables, "masquerade rules in place");
    Ok(())
}

/// Install (or rewrite) the forward-accept rules.
pub async fn ensure_forward<N: RuleFamily>(cfg: &MasqConfig<N>) -> Result<()> {
    if cfg.nftables {
        teardown_iptables::<N>().await?;
        nft(&nft_forward_script(cfg)).await?;
    } else {
        teardown_nft::<N>().await?;
        let jump =
            !iptables_rule_exists::<N>("filter", "FORWARD", FWD_COMMENT, "FLANNEL-FWD").await?;
        iptables_restore::<N>(&iptables_forward_script(cfg, jump)).await?;
    }
    info!(network = %cfg.network, nftables = cfg.nftables, "forward rules in place");
    Ok(())
}

/// Install the requested rule sets (masquerade when `ip_masq`, forward-accept when
/// `forward`), removing the other implementation's objects first.
pub async fn install<N: RuleFamily>(
    cfg: &MasqConfig<N>,
    ip_masq: bool,
    forward: bool,
) -> Result<()> {
    if ip_masq {
        ensure_masq(cfg).await?;
    }
    if forward {
        ensure_forward(cfg).await?;
    }
    Ok(())
}

/// Keep the rules in place until `cancel` fires: every `period`, compare them with what
/// [`install`] wrote and reinstall what differs — a firewall reload, an `iptables -F`, an
/// `nft flush ruleset` is repaired within one period.
///
/// iptables mode compares each chain (and its jump) with the script's rules. nftables
/// mode compares the table's listing with the one the kernel printed right after
/// [`install`] (so nft's own formatting never reads as a difference); upstream does not
/// resync its nftables table at all, but `nft flush ruleset` is a common firewall reload.
pub async fn resync_loop<N: RuleFamily>(
    cfg: MasqConfig<N>,
    ip_masq: bool,
    forward: bool,
    period: Duration,
    cancel: CancellationToken,
) {
    if period.is_zero() {
        return;
    }
    let mut golden = if cfg.nftables {
        nft_list_table::<N>().await.ok()
    } else {
        None
    };
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(period) => {}
        }
        if cfg.nftables {
            resync_nft(&cfg, ip_masq, forward, &mut golden).await;
            continue;
        }
        if ip_masq {
            resync_one(&cfg, "nat", iptables_masq_script(&cfg, true), "masquerade").await;
        }
        if forward {
            resync_one(
                &cfg,
                "filter",
                iptables_forward_script(&cfg, true),
                "forward",
            )
            .await;
        }
    }
}

async fn resync_one<N: RuleFamily>(cfg: &MasqConfig<N>, table: &str, want: String, what: &str) {
    let listing = match iptables_list::<N>(table).await {
        Ok(l) => l,
        Err(error) => {
            warn!(%error, rules = what, "cannot list iptables rules");
            return;
        }
    };
    if rules_in_place(&want, &listing) {
        return;
    }
    let r = if what == "masquerade" {
        ensure_masq(cfg).await
    } else {
        ensure_forward(cfg).await
    };
    match r {
        Ok(()) => repair::record(
            RepairKind::Rules,
            format!(
                "{} {what} rules ({table} table) were missing or changed; reinstalled",
                N::IPTABLES
            ),
        ),
        Err(error) => warn!(%error, rules = what, "reinstalling iptables rules failed"),
    }
}

/// nftables mode: reinstall when our table's listing is not the one after the last install.
async fn resync_nft<N: RuleFamily>(
    cfg: &MasqConfig<N>,
    ip_masq: bool,
    forward: bool,
    golden: &mut Option<String>,
) {
    let now = nft_list_table::<N>().await;
    if let (Some(g), Ok(l)) = (golden.as_ref(), now.as_ref())
        && g == l
    {
        return;
    }
    let why = if now.is_err() { "missing" } else { "changed" };
    match install(cfg, ip_masq, forward).await {
        Ok(()) => {
            *golden = nft_list_table::<N>().await.ok();
            repair::record(
                RepairKind::Rules,
                format!(
                    "nftables table {} {} was {why}; reinstalled",
                    N::NFT,
                    N::TABLE
                ),
            );
        }
        Err(error) => warn!(%error, "reinstalling the nftables rules failed"),
    }
}

/// `nft list table ip flannel-ipv4` (or `ip6 flannel-ipv6`; an error when the table
/// does not exist).
async fn nft_list_table<N: RuleFamily>() -> Result<String> {
    run_tool("nft", &["list", "table", N::NFT, N::TABLE], None).await
}

/// Whether every `-A` line of `script` appears in `listing` (`iptables -S`), the chain's own
/// rules in the same order and nothing else in the chain.
fn rules_in_place(script: &str, listing: &str) -> bool {
    let want: Vec<&str> = script.lines().filter(|l| l.starts_with("-A ")).collect();
    let Some(chain) = script
        .lines()
        .find_map(|l| l.strip_prefix(':'))
        .and_then(|l| l.split_whitespace().next())
    else {
        return false;
    };
    let prefix = format!("-A {chain} ");
    let own_want: Vec<&str> = want
        .iter()
        .copied()
        .filter(|l| l.starts_with(&prefix))
        .collect();
    let own_have: Vec<&str> = listing.lines().filter(|l| l.starts_with(&prefix)).collect();
    own_want == own_have && want.iter().all(|w| listing.lines().any(|l| l == *w))
}

/// Remove every rule, chain and table of both implementations and both families (absent
/// ones are fine).
pub async fn teardown() -> Result<()> {
    teardown_nft::<Ipv4Network>().await?;
    teardown_nft::<Ipv6Network>().await?;
    teardown_iptables::<Ipv4Network>().await?;
    teardown_iptables::<Ipv6Network>().await
}

/// The nftables script for the masquerade chain: create-if-absent, flush, refill.
pub fn nft_masq_script<N: RuleFamily>(cfg: &MasqConfig<N>) -> String {
    let (c, p) = (cfg.c(), cfg.p());
    let masq = if cfg.fully_random {
        "masquerade fully-random"
    } else {
        "masquerade"
    };
    let (ip, table, multicast) = (N::NFT, N::TABLE, N::MULTICAST);
    let t = format!("{ip} {table}");
    format!(
        "add table {t} {{ comment \"rules for {table}\" ; }}\n\
         add chain {t} postrtg {{ type nat hook postrouting priority srcnat ; policy accept ; comment \"chain to manage traffic masquerading by flannel\" ; }}\n\
         flush chain {t} postrtg\n\
         add rule {t} postrtg meta mark {KUBE_PROXY_MARK} return\n\
         add rule {t} postrtg {ip} saddr {p} {ip} daddr {c} return\n\
         add rule {t} postrtg {ip} saddr {c} {ip} daddr {p} return\n\
         add rule {t} postrtg {ip} saddr != {p} {ip} daddr {c} return\n\
         add rule {t} postrtg {ip} saddr {c} {ip} daddr != {multicast} {masq}\n\
         add rule {t} postrtg {ip} saddr != {c} {ip} daddr {c} {masq}\n"
    )
}

/// The nftables script for the forward chain.
pub fn nft_forward_script<N: RuleFamily>(cfg: &MasqConfig<N>) -> String {
    let c = cfg.c();
    let (ip, table) = (N::NFT, N::TABLE);
    let t = format!("{ip} {table}");
    format!(
        "add table {t} {{ comment \"rules for {table}\" ; }}\n\
         add chain {t} forward {{ type filter hook forward priority filter ; policy accept ; comment \"chain to accept flannel traffic\" ; }}\n\
         flush chain {t} forward\n\
         add rule {t} forward {ip} saddr {c} accept\n\
         add rule {t} forward {ip} daddr {c} accept\n"
    )
}

/// The `iptables-restore --noflush` script for `FLANNEL-POSTRTG` (declaring the chain
/// creates or flushes it); `jump` adds the `POSTROUTING` jump when it is missing.
pub fn iptables_masq_script<N: RuleFamily>(cfg: &MasqConfig<N>, jump: bool) -> String {
    let (c, p, multicast) = (cfg.c(), cfg.p(), N::MULTICAST);
    let m = format!("-m comment --comment \"{MASQ_COMMENT}\"");
    let masq = if cfg.fully_random {
        "MASQUERADE --random-fully"
    } else {
        "MASQUERADE"
    };
    let mut s = format!(
        "*nat\n:FLANNEL-POSTRTG - [0:0]\n\
         -A FLANNEL-POSTRTG -m mark --mark {KUBE_PROXY_MARK}/{KUBE_PROXY_MARK} {m} -j RETURN\n\
         -A FLANNEL-POSTRTG -s {p} -d {c} {m} -j RETURN\n\
         -A FLANNEL-POSTRTG -s {c} -d {p} {m} -j RETURN\n\
         -A FLANNEL-POSTRTG ! -s {c} -d {p} {m} -j RETURN\n\
         -A FLANNEL-POSTRTG -s {c} ! -d {multicast} {m} -j {masq}\n\
         -A FLANNEL-POSTRTG ! -s {c} -d {c} {m} -j {masq}\n"
    );
    if jump {
        s.push_str(&format!("-A POSTROUTING {m} -j FLANNEL-POSTRTG\n"));
    }
    s.push_str("COMMIT\n");
    s
}

/// The `iptables-restore --noflush` script for `FLANNEL-FWD`.
pub fn iptables_forward_script<N: RuleFamily>(cfg: &MasqConfig<N>, jump: bool) -> String {
    let c = cfg.c();
    let m = format!("-m comment --comment \"{FWD_COMMENT}\"");
    let mut s = format!(
        "*filter\n:FLANNEL-FWD - [0:0]\n\
         -A FLANNEL-FWD -s {c} {m} -j ACCEPT\n\
         -A FLANNEL-FWD -d {c} {m} -j ACCEPT\n"
    );
    if jump {
        s.push_str(&format!("-A FORWARD {m} -j FLANNEL-FWD\n"));
    }
    s.push_str("COMMIT\n");
    s
}

/// iptables-nft creates `table ip nat` / `table ip filter` with their base chains the first
/// time a rule goes in, and leaves them behind when the last rule and chain are deleted.
/// After [`teardown`], drop such a table when nothing at all is left in it (no rule, set or
/// map; only chains whose policy is accept), which filters nothing, so an uninstall leaves
/// the nftables ruleset as it was. Tables with anything in them stay. Returns the tables
/// dropped.
pub async fn drop_empty_iptables_nft_tables() -> Result<Vec<&'static str>> {
    let mut dropped = Vec::new();
    for table in ["nat", "filter"] {
        let listing = match run_tool("nft", &["-j", "list", "table", "ip", table], None).await {
            Ok(l) => l,
            // No nft, or no such table: nothing to drop.
            Err(_) => continue,
        };
        if is_empty_nft_table(&listing) {
            nft(&format!("delete table ip {table}\n")).await?;
            dropped.push(table);
        }
    }
    Ok(dropped)
}

/// Whether `nft -j list table …` output holds only the table and accept-policy chains.
fn is_empty_nft_table(json: &str) -> bool {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return false;
    };
    let Some(objects) = v["nftables"].as_array() else {
        return false;
    };
    objects.iter().all(|o| {
        let Some(obj) = o.as_object() else {
            return false;
        };
        obj.iter().all(|(kind, body)| match kind.as_str() {
            "metainfo" | "table" => true,
            "chain" => body["policy"].as_str().is_none_or(|p| p == "accept"),
            _ => false,
        })
    })
}

async fn teardown_nft<N: RuleFamily>() -> Result<()> {
    // "add" then "delete" in one transaction: removes the table whether or not it exists,
    // on any nft version (no need for `destroy`, nft ≥ 1.0.8).
    let t = format!("{} {}", N::NFT, N::TABLE);
    match nft(&format!("add table {t}\ndelete table {t}\n")).await {
        // No nft binary or no nf_tables: there is nothing of ours to remove.
        Err(Error::Spawn { .. }) => Ok(()),
        other => other,
    }
}

async fn teardown_iptables<N: RuleFamily>() -> Result<()> {
    for (table, parent, comment, chain) in [
        ("nat", "POSTROUTING", MASQ_COMMENT, "FLANNEL-POSTRTG"),
        ("filter", "FORWARD", FWD_COMMENT, "FLANNEL-FWD"),
    ] {
        let listing = match iptables_list::<N>(table).await {
            Ok(l) => l,
            // No iptables binary: there is nothing of ours to remove.
            Err(Error::Spawn { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        // Remove every jump (duplicates included), then the chain itself.
        let jump = jump_rule(parent, comment, chain);
        for _ in listing.lines().filter(|l| *l == jump) {
            iptables::<N>(&jump_args("-D", table, parent, comment, chain)).await?;
        }
        if listing.lines().any(|l| l == format!("-N {chain}")) {
            iptables::<N>(&["-w", "-t", table, "-F", chain]).await?;
            iptables::<N>(&["-w", "-t", table, "-X", chain]).await?;
            debug!(table, chain, "removed iptables chain");
        }
    }
    Ok(())
}

/// The jump rule as `iptables -S` prints it.
fn jump_rule(parent: &str, comment: &str, chain: &str) -> String {
    format!("-A {parent} -m comment --comment \"{comment}\" -j {chain}")
}

fn jump_args<'a>(
    op: &'a str,
    table: &'a str,
    parent: &'a str,
    comment: &'a str,
    chain: &'a str,
) -> Vec<&'a str> {
    vec![
        "-w",
        "-t",
        table,
        op,
        parent,
        "-m",
        "comment",
        "--comment",
        comment,
        "-j",
        chain,
    ]
}

async fn iptables_rule_exists<N: RuleFamily>(
    table: &str,
    parent: &str,
    comment: &str,
    chain: &str,
) -> Result<bool> {
    let jump = jump_rule(parent, comment, chain);
    Ok(iptables_list::<N>(table).await?.lines().any(|l| l == jump))
}

/// `iptables -t table -S` (or `ip6tables`).
async fn iptables_list<N: RuleFamily>(table: &str) -> Result<String> {
    run_tool(N::IPTABLES, &["-w", "-t", table, "-S"], None).await
}

/// The one place this agent starts a process to program the kernel: nftables and iptables
/// rule sets are applied through their own tools (atomic `-f`/`-restore` transactions);
/// everything else goes through netlink.
#[expect(
    clippy::disallowed_methods,
    reason = "nft/iptables(-restore) are the supported interfaces to their rule sets"
)]
fn tool(program: &'static str) -> Command {
    Command::new(program)
}

/// Run `iptables args` (or `ip6tables`).
async fn iptables<N: RuleFamily>(args: &[&str]) -> Result<()> {
    run_tool(N::IPTABLES, args, None).await.map(drop)
}

async fn iptables_restore<N: RuleFamily>(script: &str) -> Result<()> {
    run_tool(N::IPTABLES_RESTORE, &["--noflush", "--wait"], Some(script))
        .await
        .map(drop)
}

/// Apply an `nft -f -` script (one transaction); also used by [`crate::net::vxlan_guard`].
pub(crate) async fn nft(script: &str) -> Result<()> {
    run_tool("nft", &["-f", "-"], Some(script)).await.map(drop)
}

/// `nft -j <args>`: a listing in nftables' JSON; also used by [`crate::net::vxlan_guard`].
pub(crate) async fn nft_json(args: &[&str]) -> Result<String> {
    let mut all = vec!["-j"];
    all.extend_from_slice(args);
    run_tool("nft", &all, None).await
}

/// `nft <args>`: a listing in nftables' text form; also used by [`crate::net::vxlan_guard`].
pub(crate) async fn nft_list(args: &[&str]) -> Result<String> {
    run_tool("nft", args, None).await
}

/// Run `program args`, with `script` on stdin if given; its stdout on success, its stderr
/// in the error otherwise.
async fn run_tool(program: &'static str, args: &[&str], script: Option<&str>) -> Result<String> {
    let spawn_err = |source| Error::Spawn { program, source };
    let mut child = tool(program)
        .args(args)
        .stdin(if script.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let (Some(script), Some(mut stdin)) = (script, child.stdin.take()) {
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(spawn_err)?;
    }
    let out = child.wait_with_output().await.map_err(spawn_err)?;
    if !out.status.success() {
        return Err(Error::Failed {
            program,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> MasqConfig {
        MasqConfig {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.1.0/24".parse().unwrap(),
            fully_random: true,
            nftables: false,
        }
    }

    #[test]
    fn iptables_rules_match_upstreams_golden_listing() {
        let s = iptables_masq_script(&cfg(), true);
        let m = r#"-m comment --comment "flanneld masq""#;
        for rule in [
            format!("-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {m} -j RETURN"),
            format!("-A FLANNEL-POSTRTG -s 10.244.1.0/24 -d 10.244.0.0/16 {m} -j RETURN"),
            format!("-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.1.0/24 {m} -j RETURN"),
            format!("-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.1.0/24 {m} -j RETURN"),
            format!(
                "-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 {m} -j MASQUERADE --random-fully"
            ),
            format!(
                "-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 {m} -j MASQUERADE --random-fully"
            ),
            format!("-A POSTROUTING {m} -j FLANNEL-POSTRTG"),
        ] {
            assert!(s.contains(&rule), "missing {rule}\n{s}");
        }
        assert!(!iptables_masq_script(&cfg(), false).contains("-A POSTROUTING"));
    }

    #[test]
    fn nft_rules_match_upstreams_golden_listing() {
        let c = MasqConfig {
            fully_random: false,
            ..cfg()
        };
        let s = nft_masq_script(&c);
        assert!(
            s.contains("postrtg ip saddr != 10.244.1.0/24 ip daddr 10.244.0.0/16 return"),
            "{s}"
        );
        assert!(s.contains("ip daddr != 224.0.0.0/4 masquerade\n"), "{s}");
        let f = nft_forward_script(&c);
        assert!(f.contains("forward ip saddr 10.244.0.0/16 accept"), "{f}");
    }

    #[test]
    fn ipv6_rules_are_upstreams_with_ip6_names() {
        let c = MasqConfig::<Ipv6Network> {
            network: "fd00:10:244::/56".parse().unwrap(),
            subnet: "fd00:10:244:1::/64".parse().unwrap(),
            fully_random: true,
            nftables: true,
        };
        let s = nft_masq_script(&c);
        for rule in [
            "add table ip6 flannel-ipv6 { comment \"rules for flannel-ipv6\" ; }",
            "add rule ip6 flannel-ipv6 postrtg meta mark 0x4000 return",
            "add rule ip6 flannel-ipv6 postrtg ip6 saddr fd00:10:244:1::/64 ip6 daddr fd00:10:244::/56 return",
            "add rule ip6 flannel-ipv6 postrtg ip6 saddr fd00:10:244::/56 ip6 daddr != ff00::/8 masquerade fully-random",
            "add rule ip6 flannel-ipv6 postrtg ip6 saddr != fd00:10:244::/56 ip6 daddr fd00:10:244::/56 masquerade fully-random",
        ] {
            assert!(s.contains(rule), "missing {rule}\n{s}");
        }
        let f = nft_forward_script(&c);
        assert!(
            f.contains("add rule ip6 flannel-ipv6 forward ip6 daddr fd00:10:244::/56 accept"),
            "{f}"
        );
        let i = iptables_masq_script(&c, false);
        assert!(
            i.contains("-A FLANNEL-POSTRTG -s fd00:10:244::/56 ! -d ff00::/8 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully"),
            "{i}"
        );
    }

    #[test]
    fn resync_detects_missing_or_extra_rules() {
        let script = iptables_masq_script(&cfg(), true);
        // `iptables -S` prints rules exactly as the script writes them.
        let listing: String = script
            .lines()
            .filter(|l| l.starts_with("-A "))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(rules_in_place(&script, &listing), "{listing}");
        let missing: String = listing.lines().skip(1).map(|l| format!("{l}\n")).collect();
        assert!(!rules_in_place(&script, &missing));
        let extra = format!("{listing}-A FLANNEL-POSTRTG -j ACCEPT\n");
        assert!(!rules_in_place(&script, &extra));
    }

    #[test]
    fn host_bits_are_normalised() {
        let c = MasqConfig {
            subnet: "10.244.1.1/24".parse().unwrap(),
            ..cfg()
        };
        assert_eq!(c.p(), "10.244.1.0/24");
    }
}
