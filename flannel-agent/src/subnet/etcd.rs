//! The etcd subnet manager: leases live in etcd v3 under `<prefix>/subnets/`, wire-compatible
//! with upstream flanneld (same keys, same value JSON, same create-if-absent transaction), so
//! mixed clusters work.
//!
//! Deliberate differences from upstream: a lost create race is retried (upstream's retry
//! never fires), a dual-stack create also loses when another key holds either of its
//! subnets (upstream checks only the exact key, so two hosts can win one IPv4 subnet), the
//! lease watch resyncs with a fresh snapshot after any disconnect (not only after
//! compaction), and renewal refuses to resurrect a key someone deleted.
//!
//! A start reads the leases once: `previous_lease`'s read is what the acquisition decides
//! on (its writes are transactions guarded by that read, so a stale one only loses and is
//! retried), and the acquisition's read, with our own write applied, is the first watch's
//! snapshot; the watch goes on from that read's revision, so nothing written meanwhile is
//! missed.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    KeyValue, PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};
use futures::stream::BoxStream;
use ipnetwork::{Ipv4Network, Ipv6Network};
use rand::seq::IndexedRandom;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::{SubnetManager, env_file::PreviousSubnets};
use crate::{
    lease::{
        KeySubnets, Lease, LeaseAttrs, LeaseEvent, LeaseRules, SkipLog, make_subnet_key,
        parse_record, parse_subnet_key,
    },
    netconf::{self, NetworkConfig},
    wire::{cidr::overlaps, truncated},
};

mod alloc;
mod health;
mod watch;

pub use alloc::{renew_after, renew_retry};

/// Upstream's default `--etcd-prefix`.
pub const DEFAULT_PREFIX: &str = "/coreos.com/network";
/// Upstream's default `--etcd-endpoints`.
pub const DEFAULT_ENDPOINTS: &str = "http://127.0.0.1:4001,http://127.0.0.1:2379";
/// Upstream's lease TTL.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

/// How long one unary etcd call may take before it is abandoned (and, by the caller,
/// retried). A request that reached a member just before its leader died is answered only
/// by etcd's own request timeout (5 s + two election timeouts, 7 s by default); a retry
/// goes through the client's balancer, which reaches a healthy member sooner.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// How long connecting to one endpoint may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Run one unary etcd call with [`CALL_TIMEOUT`].
async fn call<T>(
    op: impl Into<String>,
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(r) => r.map_err(Error::etcd(op)),
        Err(_) => Err(Error::Timeout {
            op: op.into(),
            after: CALL_TIMEOUT,
        }),
    }
}

/// How often a create that lost a race is retried before giving up.
const ACQUIRE_ATTEMPTS: u32 = 10;

/// Errors of the etcd subnet manager.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An etcd call failed (connection, auth, gRPC status).
    #[error("etcd {op}: {source}")]
    Etcd {
        /// What was being done.
        op: String,
        /// The client's error.
        source: etcd_client::Error,
    },
    /// Reading a TLS file named on the command line failed.
    #[error("reading {flag} {path}: {source}")]
    TlsFile {
        /// The flag that named the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `<prefix>/config` does not exist.
    #[error(
        "flannel config not found in etcd store at {key}. Did you create your config using \
         etcdv3 API?"
    )]
    ConfigNotFound {
        /// The key looked up.
        key: String,
    },
    /// `<prefix>/config` exists but is invalid.
    #[error("network config at etcd key {key} is invalid: {source}")]
    Config {
        /// The key read.
        key: String,
        /// Why it is invalid.
        source: netconf::Error,
    },
    /// etcd keys always carry an IPv4 subnet, so an IPv6-only network cannot be leased here.
    #[error("the etcd subnet manager needs EnableIPv4 (etcd subnet keys always have an IPv4 part)")]
    Ipv6Only,
    /// Every subnet in the configured range is taken.
    #[error("out of subnets: no free /{len} left in {min}..{max} ({family})")]
    OutOfSubnets {
        /// `ipv4` or `ipv6`.
        family: &'static str,
        /// Prefix length handed out.
        len: u8,
        /// `SubnetMin`.
        min: String,
        /// `SubnetMax`.
        max: String,
    },
    /// Every attempt to create a key lost a race to another host.
    #[error(
        "failed to acquire a lease after {attempts} attempts: other hosts kept taking the chosen subnet"
    )]
    AcquireRace {
        /// Attempts made.
        attempts: u32,
    },
    /// Our lease changed again while it was being restored (the watch reports it next).
    #[error("lease {key} changed while it was being restored")]
    RestoreRace {
        /// The etcd key.
        key: String,
    },
    /// An etcd call got no answer in time (a member down or electing a leader).
    #[error("etcd {op}: no answer within {after:?}")]
    Timeout {
        /// What was being done.
        op: String,
        /// The time allowed.
        after: Duration,
    },
    /// This host's lease key disappeared (expired, deleted, compacted away).
    #[error("lease {key} has been revoked (expired or deleted)")]
    LeaseLost {
        /// The etcd key.
        key: String,
    },
}

impl Error {
    fn etcd(op: impl Into<String>) -> impl FnOnce(etcd_client::Error) -> Self {
        let op = op.into();
        move |source| Self::Etcd { op, source }
    }

    /// Whether retrying the same call later may succeed (etcd unreachable or busy), as
    /// opposed to a configuration problem.
    pub fn is_transient(&self) -> bool {
        use tonic::Code;
        match self {
            // Bad credentials or a malformed request will not fix themselves.
            Self::Etcd { source, .. } => match source {
                etcd_client::Error::GRpcStatus(status) => !matches!(
                    status.code(),
                    Code::Unauthenticated
                        | Code::PermissionDenied
                        | Code::InvalidArgument
                        | Code::Unimplemented
                ),
                etcd_client::Error::InvalidArgs(_) | etcd_client::Error::InvalidUri(_) => false,
                _ => true,
            },
            Self::ConfigNotFound { .. }
            | Self::AcquireRace { .. }
            | Self::RestoreRace { .. }
            | Self::Timeout { .. } => true,
            _ => false,
        }
    }
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// How to reach etcd and how to lease, from the command line.
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// Endpoint URLs.
    pub endpoints: Vec<String>,
    /// Key prefix (`--etcd-prefix`).
    pub prefix: String,
    /// `--etcd-keyfile`.
    pub keyfile: Option<PathBuf>,
    /// `--etcd-certfile`.
    pub certfile: Option<PathBuf>,
    /// `--etcd-cafile`.
    pub cafile: Option<PathBuf>,
    /// `--etcd-username`.
    pub username: Option<String>,
    /// `--etcd-password`.
    pub password: Option<String>,
    /// Lease TTL (24 h upstream).
    pub ttl: Duration,
    /// Renew this long before expiry (`--subnet-lease-renew-margin`).
    pub renew_margin: Duration,
    /// Subnets from the previous run's `subnet.env`, preferred when free.
    pub previous: PreviousSubnets,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            endpoints: DEFAULT_ENDPOINTS.split(',').map(str::to_owned).collect(),
            prefix: DEFAULT_PREFIX.to_owned(),
            keyfile: None,
            certfile: None,
            cafile: None,
            username: None,
            password: None,
            ttl: DEFAULT_TTL,
            renew_margin: Duration::from_secs(3600),
            previous: PreviousSubnets::default(),
        }
    }
}

/// A lease record read from etcd.
#[derive(Clone, Debug)]
struct Record {
    key: String,
    lease: Lease,
    mod_revision: i64,
    /// The etcd lease the key is attached to; 0 for a reservation (no TTL).
    etcd_lease: i64,
    /// Whether the lease passed the network's [`LeaseRules`] (what a datapath may see).
    routable: bool,
}

/// One read of every lease key.
#[derive(Clone, Debug, Default)]
struct Listing {
    /// Every readable record, routable or not.
    records: Vec<Record>,
    /// Every subnet whose key parses (readable or not: a key with a bad value still
    /// occupies its subnet).
    used: Vec<KeySubnets>,
    /// The store revision of the read.
    revision: i64,
    /// Whether `routable` was decided (the network's rules were known).
    checked: bool,
    /// The revision of our own lease write, already applied to `records`: a watch from
    /// `revision` skips its events.
    own_write: Option<i64>,
}

impl Listing {
    /// The read with our own record `own` written (replacing the record with key
    /// `replaced`, if any), as if the read had seen it.
    fn with_own(mut self, own: Record, replaced: Option<&str>) -> Self {
        self.records
            .retain(|r| r.key != own.key && Some(r.key.as_str()) != replaced);
        self.own_write = Some(own.mod_revision);
        if let Some(v4) = own.lease.subnet {
            self.used.push((v4, own.lease.ipv6_subnet));
        }
        // In key order, as etcd lists them.
        let at = self.records.partition_point(|r| r.key < own.key);
        self.records.insert(at, own);
        self
    }
}

/// What a lease watch starts from: the routable leases of one read, the read's revision
/// (the watch goes on after it) and the revision of our own write already applied to them,
/// whose events are not passed on again.
#[derive(Debug)]
pub(super) struct WatchStart {
    pub(super) leases: Vec<Lease>,
    pub(super) revision: i64,
    pub(super) skip: Option<i64>,
}

impl From<Listing> for WatchStart {
    fn from(listing: Listing) -> Self {
        Self {
            leases: listing
                .records
                .into_iter()
                .filter(|r| r.routable)
                .map(|r| r.lease)
                .collect(),
            revision: listing.revision,
            skip: listing.own_write,
        }
    }
}

/// The subnet manager backed by etcd v3.
#[derive(Clone)]
pub struct EtcdSubnetManager {
    client: Client,
    /// Prefix without trailing `/` (Go `path.Join` semantics).
    prefix: String,
    ttl: Duration,
    renew_margin: Duration,
    previous: PreviousSubnets,
    /// What peers' leases must satisfy, from the last network config read.
    rules: Arc<RwLock<Option<LeaseRules>>>,
    /// Bad records already warned about.
    skipped: SkipLog,
    /// The last read of every lease, left for the next reader that can start from it
    /// instead of reading them all again: the acquisition after `previous_lease`, then the
    /// first watch after the acquisition. At 5,000 nodes each read is 5,000 records.
    listing: Arc<Mutex<Option<Listing>>>,
    /// Stops the endpoint prober when the last clone of the manager goes.
    _health: Option<Arc<tokio_util::sync::DropGuard>>,
}

impl EtcdSubnetManager {
    /// Connects to etcd. TLS is used only when both a key and a certificate are given
    /// (upstream); a CA file alone only warns.
    pub async fn connect(opts: EtcdOptions) -> Result<Self> {
        // Keep-alives make a silently dead connection fail the watch instead of hanging it.
        let mut connect = ConnectOptions::new()
            .with_require_leader(true)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_connect_timeout(CONNECT_TIMEOUT);
        if let Some(user) = opts.username.as_deref().filter(|u| !u.is_empty()) {
            connect = connect.with_user(user, opts.password.clone().unwrap_or_default());
        }
        match (&opts.keyfile, &opts.certfile) {
            (Some(key), Some(cert)) => {
                let read = |flag, path: &PathBuf| {
                    std::fs::read(path).map_err(|source| Error::TlsFile {
                        flag,
                        path: path.clone(),
                        source,
                    })
                };
                let mut tls = TlsOptions::new().identity(Identity::from_pem(
                    read("--etcd-certfile", cert)?,
                    read("--etcd-keyfile", key)?,
                ));
                tls = match &opts.cafile {
                    Some(ca) => {
                        tls.ca_certificate(Certificate::from_pem(read("--etcd-cafile", ca)?))
                    }
                    None => tls.with_native_roots(),
                };
                connect = connect.with_tls(tls);
            }
            _ => {
                if opts.cafile.is_some() || opts.keyfile.is_some() || opts.certfile.is_some() {
                    warn!(
                        "TLS needs both --etcd-keyfile and --etcd-certfile; connecting to etcd without TLS"
                    );
                }
            }
        }
        let client = Client::connect(&opts.endpoints, Some(connect.clone()))
            .await
            .map_err(Error::etcd(format!(
                "connect to {}",
                opts.endpoints.join(",")
            )))?;
        let health = (opts.endpoints.len() > 1).then(|| {
            let cancel = CancellationToken::new();
            tokio::spawn(health::run(
                client.clone(),
                opts.endpoints.clone(),
                connect,
                cancel.clone(),
            ));
            Arc::new(cancel.drop_guard())
        });
        Ok(Self {
            client,
            prefix: opts.prefix.trim_end_matches('/').to_owned(),
            ttl: opts.ttl.max(Duration::from_secs(1)),
            renew_margin: opts.renew_margin,
            previous: opts.previous,
            rules: Arc::default(),
            skipped: SkipLog::default(),
            listing: Arc::default(),
            _health: health,
        })
    }

    /// The etcd key of the network configuration.
    pub fn config_key(&self) -> String {
        format!("{}/config", self.prefix)
    }

    /// The key prefix all lease keys live under (with trailing `/`).
    pub fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    /// The etcd key of a lease.
    pub fn lease_key(&self, subnet: Ipv4Network, ipv6: Option<Ipv6Network>) -> String {
        format!("{}{}", self.subnets_prefix(), make_subnet_key(subnet, ipv6))
    }

    /// The full etcd key of `lease` and its IPv4 subnet; a lease without one (IPv6-only,
    /// which this manager never hands out) has no key.
    fn key_of(&self, lease: &Lease) -> Result<(String, Ipv4Network)> {
        let subnet = lease.subnet.ok_or(Error::Ipv6Only)?;
        Ok((self.lease_key(subnet, lease.ipv6_subnet), subnet))
    }

    async fn read_config(&self) -> Result<NetworkConfig> {
        let key = self.config_key();
        let resp = call(
            format!("get {key}"),
            self.client.clone().get(key.as_str(), None),
        )
        .await?;
        let kv = resp
            .kvs()
            .first()
            .ok_or_else(|| Error::ConfigNotFound { key: key.clone() })?;
        let text = String::from_utf8_lossy(kv.value());
        let cfg = NetworkConfig::parse_and_check(&text)
            .map_err(|source| Error::Config { key, source })?;
        *self.rules.write().unwrap_or_else(|e| e.into_inner()) = Some(LeaseRules::new(&cfg));
        Ok(cfg)
    }

    /// The lease rules of the network config, reading it if it was not read yet.
    pub(super) async fn lease_rules(&self) -> Result<LeaseRules> {
        let cached = self.rules.read().unwrap_or_else(|e| e.into_inner()).clone();
        match cached {
            Some(rules) => Ok(rules),
            None => Ok(LeaseRules::new(&self.read_config().await?)),
        }
    }

    /// Reads one lease record; a malformed one, or with `rules` an invalid one, is skipped
    /// and warned about once (its value truncated), however often a resync lists it again.
    pub(super) fn read_record(&self, rules: Option<&LeaseRules>, kv: &KeyValue) -> Option<Lease> {
        let lease = self.parse_kv(kv)?;
        rules
            .is_none_or(|r| self.routable(r, &lease, kv))
            .then_some(lease)
    }

    /// The lease in `kv`; a malformed one is warned about once.
    fn parse_kv(&self, kv: &KeyValue) -> Option<Lease> {
        let key = String::from_utf8_lossy(kv.key());
        parse_record(&key, kv.value())
            .map_err(|e| self.skip(kv, &e.to_string()))
            .ok()
    }

    /// Whether `lease` (read from `kv`) may reach a datapath; one that may not is warned
    /// about once.
    fn routable(&self, rules: &LeaseRules, lease: &Lease, kv: &KeyValue) -> bool {
        rules
            .check(lease)
            .map_err(|invalid| self.skip(kv, &invalid.to_string()))
            .is_ok()
    }

    fn skip(&self, kv: &KeyValue, error: &str) {
        let key = String::from_utf8_lossy(kv.key());
        if self.skipped.first_time(&key, kv.value()) {
            warn!(key = %truncated(kv.key()), %error, value = %truncated(kv.value()),
                  "ignoring malformed or invalid lease");
        }
    }

    /// The rules of the network config last read, if one was.
    fn cached_rules(&self) -> Option<LeaseRules> {
        self.rules.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads every lease record. Each is marked routable or not by the rules of the
    /// network config last read (the watch passes on only routable ones; acquisition looks
    /// at all, so an own lease made incompatible by a config change is still found and
    /// replaced).
    async fn list(&self) -> Result<Listing> {
        let prefix = self.subnets_prefix();
        let rules = self.cached_rules();
        let resp = call(
            format!("list {prefix}"),
            self.client
                .clone()
                .get(prefix.as_str(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let mut listing = Listing {
            revision: resp.header().map_or(0, |h| h.revision()),
            checked: rules.is_some(),
            ..Listing::default()
        };
        for kv in resp.kvs() {
            if let Ok(key) = kv.key_str()
                && let Ok(id) = parse_subnet_key(key)
            {
                listing.used.push(id);
            }
            if let Some(lease) = self.parse_kv(kv) {
                let routable = rules.as_ref().is_none_or(|r| self.routable(r, &lease, kv));
                listing.records.push(Record {
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    lease,
                    mod_revision: kv.mod_revision(),
                    etcd_lease: kv.lease(),
                    routable,
                });
            }
        }
        Ok(listing)
    }

    /// The listing left by the last reader, if any (taken: each is used once).
    fn take_listing(&self) -> Option<Listing> {
        self.listing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    fn leave_listing(&self, listing: Listing) {
        *self.listing.lock().unwrap_or_else(|e| e.into_inner()) = Some(listing);
    }

    /// Where the first watch starts: the listing the acquisition left, if its routability
    /// was decided.
    pub(super) fn take_watch_start(&self) -> Option<WatchStart> {
        self.take_listing()
            .filter(|l| l.checked)
            .map(WatchStart::from)
    }

    /// Where a watch starts afresh: a new read of every lease.
    pub(super) async fn watch_start(&self) -> Result<WatchStart> {
        Ok(self.list().await?.into())
    }

    async fn grant(&self) -> Result<i64> {
        let resp = call(
            "lease grant",
            self.client
                .clone()
                .lease_grant(self.ttl.as_secs() as i64, None),
        )
        .await?;
        Ok(resp.id())
    }

    async fn revoke(&self, id: i64) {
        if let Err(error) = self.client.clone().lease_revoke(id).await {
            debug!(lease = id, %error, "revoking an unused etcd lease failed; it will expire");
        }
    }

    /// Puts `value` at `key` under a fresh etcd lease if `cmp` holds; `false` if it did not.
    async fn put_if(&self, key: &str, value: String, cmp: Compare) -> Result<bool> {
        self.put_if_with(key, value, cmp, true).await
    }

    /// [`Self::put_if`], optionally without a TTL (re-putting a reservation keeps it one).
    async fn put_if_with(&self, key: &str, value: String, cmp: Compare, ttl: bool) -> Result<bool> {
        Ok(self.put_when(key, value, vec![cmp], ttl).await?.is_some())
    }

    /// Puts `value` at `key` if every comparison holds: the store revision of the put and
    /// the etcd lease it is under (0 for none), or `None` when a comparison did not hold.
    async fn put_when(
        &self,
        key: &str,
        value: String,
        cmps: Vec<Compare>,
        ttl: bool,
    ) -> Result<Option<(i64, i64)>> {
        self.replace_when(None, key, value, cmps, ttl).await
    }

    /// [`Self::put_when`], deleting `old` in the same transaction when given: watchers see
    /// the delete and the put at one revision.
    async fn replace_when(
        &self,
        old: Option<&str>,
        key: &str,
        value: String,
        cmps: Vec<Compare>,
        ttl: bool,
    ) -> Result<Option<(i64, i64)>> {
        let id = if ttl { self.grant().await? } else { 0 };
        let opts = (id != 0).then(|| PutOptions::new().with_lease(id));
        let mut ops: Vec<TxnOp> = old.map(|k| TxnOp::delete(k, None)).into_iter().collect();
        ops.push(TxnOp::put(key, value, opts));
        let txn = Txn::new().when(cmps).and_then(ops);
        let resp = call(format!("txn put {key}"), self.client.clone().txn(txn)).await?;
        if !resp.succeeded() {
            if id != 0 {
                self.revoke(id).await;
            }
            return Ok(None);
        }
        Ok(Some((resp.header().map_or(0, |h| h.revision()), id)))
    }

    /// Creates the lease key of `subnet`/`ipv6_subnet`, replacing `replacing` (our own lease
    /// that no longer fits the config) in the same transaction: the store revision of the
    /// create and the etcd lease of the key, or `None` when another host took either half
    /// first, or changed the replaced lease.
    ///
    /// A dual-stack key names both subnets, so "the key is absent" (upstream's only check)
    /// lets two hosts that drew the same IPv4 subnet with different IPv6 ones both win. The
    /// IPv4 half is guarded inside the transaction: no key may start with it, with or without
    /// an IPv6 half. The IPv6 half sits after `&`, out of reach of a key-range comparison, so
    /// it is checked right after the create: of two keys sharing it, the one created first
    /// stays and the later one withdraws. The later creator always sees the earlier key (its
    /// check lists after its own create), so exactly one of them withdraws.
    async fn create(
        &self,
        subnet: Ipv4Network,
        ipv6_subnet: Option<Ipv6Network>,
        value: String,
        replacing: Option<&Record>,
    ) -> Result<Option<(i64, i64)>> {
        let key = self.lease_key(subnet, ipv6_subnet);
        let v4_key = self.lease_key(subnet, None);
        let old = replacing.map(|r| r.key.as_str());
        let mut guards = vec![Compare::version(key.as_str(), CompareOp::Equal, 0)];
        if let Some(rec) = replacing {
            guards.push(Compare::mod_revision(
                rec.key.as_str(),
                CompareOp::Equal,
                rec.mod_revision,
            ));
        }
        // Keys holding the IPv4 half: `<v4>` itself and everything under `<v4>&`; the
        // replaced lease may be one of them and is left out of the comparison.
        if old != Some(v4_key.as_str()) {
            guards.push(Compare::version(v4_key.as_str(), CompareOp::Equal, 0));
        }
        let dual = format!("{v4_key}&");
        let dual_end = format!("{v4_key}'"); // '&' + 1: the end of the `<v4>&` prefix
        match old.filter(|k| k.starts_with(&dual)) {
            None => guards.push(Compare::version(dual, CompareOp::Equal, 0).with_range(dual_end)),
            Some(old) => {
                guards.push(Compare::version(dual, CompareOp::Equal, 0).with_range(old));
                guards.push(
                    Compare::version(format!("{old}\0"), CompareOp::Equal, 0).with_range(dual_end),
                );
            }
        }
        let Some((created, etcd_lease)) = self.replace_when(old, &key, value, guards, true).await?
        else {
            return Ok(None);
        };
        let Some(v6) = ipv6_subnet else {
            return Ok(Some((created, etcd_lease)));
        };
        let prefix = self.subnets_prefix();
        let resp = call(
            format!("list {prefix}"),
            self.client.clone().get(
                prefix.as_str(),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            ),
        )
        .await?;
        let earlier = resp.kvs().iter().find(|kv| {
            kv.create_revision() < created
                && kv.key_str().is_ok_and(|k| {
                    parse_subnet_key(k)
                        .is_ok_and(|(_, other)| other.is_some_and(|o| overlaps(o, v6)))
                })
        });
        let Some(earlier) = earlier else {
            return Ok(Some((created, etcd_lease)));
        };
        info!(%key, earlier = %String::from_utf8_lossy(earlier.key()),
              "another host created a lease with the same IPv6 subnet first; withdrawing ours");
        // Revoking the etcd lease deletes the key with it, and only if it is still ours.
        call(
            format!("withdraw {key}"),
            self.client.clone().lease_revoke(etcd_lease),
        )
        .await?;
        Ok(None)
    }

    /// One acquisition attempt; `None` when another host took the chosen subnets first.
    ///
    /// `previous` holds the subnets to prefer; an own lease replaced here adds its own, so
    /// they are still preferred by the next attempt.
    ///
    /// The first attempt may decide on the listing `previous_lease` left (a few seconds
    /// old): every write here is a transaction guarded by what the listing showed, so a
    /// stale listing only loses the race and the next attempt lists afresh. What this
    /// attempt read, with our write applied, is left for the first watch.
    async fn try_acquire(
        &self,
        cfg: &NetworkConfig,
        attrs: &LeaseAttrs,
        previous: &mut PreviousSubnets,
    ) -> Result<Option<Lease>> {
        let mut listing = match self.take_listing() {
            Some(listing) => listing,
            None => self.list().await?,
        };
        let value = attrs.to_json();
        let mut replacing = None;

        // 1. Reuse the lease already published for our public IP.
        if let Some(rec) = listing
            .records
            .iter()
            .find(|r| r.lease.attrs.public_ip == attrs.public_ip)
        {
            // Records come from keys, which always have an IPv4 part.
            let compatible = rec.lease.subnet.is_some_and(|sn| cfg.v4_compatible(sn))
                && cfg.v6_compatible(rec.lease.ipv6_subnet);
            if compatible {
                let cmp =
                    Compare::mod_revision(rec.key.as_str(), CompareOp::Equal, rec.mod_revision);
                // A reservation (key without TTL) stays one, as upstream documents.
                let ttl = rec.etcd_lease != 0;
                let Some(written) = self.put_when(&rec.key, value, vec![cmp], ttl).await? else {
                    return Ok(None);
                };
                info!(key = %rec.key, "reusing the lease already held by this public IP");
                let lease = Lease {
                    attrs: attrs.clone(),
                    ..rec.lease.clone()
                };
                let key = rec.key.clone();
                self.leave_own(listing, &lease, key, None, written);
                return Ok(Some(lease));
            }
            warn!(key = %rec.key, "lease of this public IP is incompatible with the network config; replacing it");
            listing
                .used
                .retain(|(v4, v6)| (Some(*v4), *v6) != rec.lease.id());
            // What still fits of the replaced lease is kept: enabling IPv6 on a running
            // cluster must not renumber a host's IPv4 pods, even without a subnet.env.
            previous.subnet = previous.subnet.or(rec.lease.subnet);
            previous.ipv6_subnet = previous.ipv6_subnet.or(rec.lease.ipv6_subnet);
            replacing = Some(rec.clone());
        }

        // 2. The subnet of the previous run, if still free; 3. otherwise a random free one.
        let (subnet, ipv6_subnet) = self.choose(cfg, &listing.used, *previous)?;
        let Some(written) = self
            .create(subnet, ipv6_subnet, value, replacing.as_ref())
            .await?
        else {
            return Ok(None);
        };
        let lease = Lease {
            subnet: Some(subnet),
            ipv6_subnet,
            extra_senders: Vec::new(),
            attrs: attrs.clone(),
        };
        let key = self.lease_key(subnet, ipv6_subnet);
        let replaced = replacing.map(|r| r.key);
        self.leave_own(listing, &lease, key, replaced.as_deref(), written);
        Ok(Some(lease))
    }

    /// Leaves `listing` with our `lease` (written under `key` at the store revision and
    /// etcd lease `written`, replacing the key `replaced`) applied, for the first watch.
    fn leave_own(
        &self,
        listing: Listing,
        lease: &Lease,
        key: String,
        replaced: Option<&str>,
        written: (i64, i64),
    ) {
        let routable = self.cached_rules().is_none_or(|r| r.check(lease).is_ok());
        let own = Record {
            key,
            lease: lease.clone(),
            mod_revision: written.0,
            etcd_lease: written.1,
            routable,
        };
        self.leave_listing(listing.with_own(own, replaced));
    }

    fn choose(
        &self,
        cfg: &NetworkConfig,
        used: &[KeySubnets],
        previous: PreviousSubnets,
    ) -> Result<(Ipv4Network, Option<Ipv6Network>)> {
        let used4: Vec<Ipv4Network> = used.iter().map(|(v4, _)| *v4).collect();
        let used6: Vec<Ipv6Network> = used.iter().filter_map(|(_, v6)| *v6).collect();
        let v4_free =
            |sn: Ipv4Network| cfg.v4_compatible(sn) && !used4.iter().any(|u| overlaps(*u, sn));
        let prev4 = previous.subnet.filter(|sn| v4_free(*sn));
        let prev6 = previous
            .ipv6_subnet
            .filter(|sn| cfg.v6_compatible(Some(*sn)) && !used6.iter().any(|u| overlaps(*u, *sn)));
        let mut rng = rand::rng();
        let subnet = match prev4 {
            Some(sn) => {
                info!(subnet = %sn, "reusing the subnet of the previous run");
                sn
            }
            None => *alloc::free_v4(cfg, &used4, alloc::CANDIDATES)
                .choose(&mut rng)
                .ok_or_else(|| Error::OutOfSubnets {
                    family: "ipv4",
                    len: cfg.subnet_len,
                    min: cfg.subnet_min.to_string(),
                    max: cfg.subnet_max.to_string(),
                })?,
        };
        let ipv6_subnet = if !cfg.enable_ipv6 {
            None
        } else if prev4.is_some() && prev6.is_some() {
            prev6
        } else {
            Some(
                *alloc::free_v6(cfg, &used6, alloc::CANDIDATES)
                    .choose(&mut rng)
                    .ok_or_else(|| Error::OutOfSubnets {
                        family: "ipv6",
                        len: cfg.ipv6_subnet_len,
                        min: cfg
                            .ipv6_subnet_min
                            .map(|a| a.to_string())
                            .unwrap_or_default(),
                        max: cfg
                            .ipv6_subnet_max
                            .map(|a| a.to_string())
                            .unwrap_or_default(),
                    })?,
            )
        };
        Ok((subnet, ipv6_subnet))
    }

    /// Renews our lease: a new etcd lease and a re-put (upstream). A key that is gone by
    /// then is put back, loudly: the subnet is still this host's (its pods hold addresses
    /// in it); the agent's own-lease guard normally restores it long before.
    async fn renew(&self, lease: &Lease) -> Result<()> {
        let (key, _) = self.key_of(lease)?;
        let cmp = Compare::version(key.as_str(), CompareOp::Greater, 0);
        if self.put_if(&key, lease.attrs.to_json(), cmp).await? {
            debug!(%key, ttl = ?self.ttl, "renewed lease");
            return Ok(());
        }
        error!(%key, "own lease was gone at renewal; putting it back");
        self.restore(lease).await
    }

    /// Writes our lease back exactly as published, whatever the key holds now (deleted,
    /// or overwritten with another host's attributes). A reservation (a key without TTL)
    /// stays one; anything else gets a fresh TTL.
    async fn restore(&self, lease: &Lease) -> Result<()> {
        let (key, _) = self.key_of(lease)?;
        let resp = call(
            format!("get {key}"),
            self.client.clone().get(key.as_str(), None),
        )
        .await?;
        let current = resp.kvs().first();
        let ttl = current.is_none_or(|kv| kv.lease() != 0);
        // Only over what was just read: a concurrent change is seen (and handled) as the
        // next watch event rather than overwritten blindly.
        let cmp = match current {
            Some(kv) => Compare::mod_revision(key.as_str(), CompareOp::Equal, kv.mod_revision()),
            None => Compare::version(key.as_str(), CompareOp::Equal, 0),
        };
        if self
            .put_if_with(&key, lease.attrs.to_json(), cmp, ttl)
            .await?
        {
            Ok(())
        } else {
            Err(Error::RestoreRace { key })
        }
    }

    /// How long our key's etcd lease has left (`None` for a reservation, which never
    /// expires), or `LeaseLost` when the key is gone.
    async fn own_ttl(&self, key: &str) -> Result<Option<Duration>> {
        let mut client = self.client.clone();
        let resp = call(format!("get {key}"), client.get(key, None)).await?;
        let kv = resp.kvs().first().ok_or_else(|| Error::LeaseLost {
            key: key.to_owned(),
        })?;
        if kv.lease() == 0 {
            return Ok(None);
        }
        let ttl = call(
            format!("time-to-live of {key}"),
            client.lease_time_to_live(kv.lease(), None),
        )
        .await?;
        Ok(Some(Duration::from_secs(ttl.ttl().max(0) as u64)))
    }

    async fn complete(&self, lease: &Lease, cancel: CancellationToken) -> Result<()> {
        let (key, subnet) = self.key_of(lease)?;
        let retry = renew_retry(self.ttl);
        let renew_in = renew_after(self.ttl, self.renew_margin);
        // etcd may be briefly unreachable right now: that is not a lost lease.
        let mut backoff = watch::Backoff::default();
        let left = loop {
            match self.own_ttl(&key).await {
                Ok(left) => break left,
                Err(Error::LeaseLost { .. }) => {
                    error!(%key, "own lease is gone; putting it back");
                    if let Err(error) = self.restore(lease).await {
                        warn!(%key, %error, "restoring own lease failed; retrying");
                    }
                    tokio::select! {
                        () = cancel.cancelled() => return Ok(()),
                        () = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
                Err(error) => {
                    crate::metrics::get().datastore_error("get_lease");
                    warn!(%key, %error, "reading own lease failed; retrying");
                    tokio::select! {
                        () = cancel.cancelled() => return Ok(()),
                        () = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        };
        let renewing = left.is_some();
        if let Some(left) = left {
            crate::metrics::get().set_lease_expiry(subnet, left);
        }
        // When the current grant leaves less than the margin, renew right away.
        let mut next_renewal =
            Instant::now() + left.unwrap_or_default().saturating_sub(self.ttl - renew_in);
        if renewing {
            info!(%key, ttl = ?self.ttl, every = ?renew_in, "keeping the lease alive");
        } else {
            info!(%key, "lease is a reservation (no TTL); not renewing");
        }
        loop {
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                () = tokio::time::sleep_until(next_renewal.into()), if renewing => {
                    match self.renew(lease).await {
                        Ok(()) => {
                            next_renewal = Instant::now() + renew_in;
                            crate::metrics::get().lease_renewals.inc();
                            crate::metrics::get().set_lease_expiry(subnet, self.ttl);
                        }
                        Err(error) => {
                            crate::metrics::get().datastore_error("renew_lease");
                            warn!(%key, %error, retry_in = ?retry, "renewing the lease failed");
                            next_renewal = Instant::now() + retry;
                        }
                    }
                }
            }
        }
    }
}

/// The lease a delete event stands for: only the subnet is known.
fn removed_lease(kv: &KeyValue) -> Option<Lease> {
    let key = String::from_utf8_lossy(kv.key());
    match parse_subnet_key(&key) {
        Ok((subnet, ipv6_subnet)) => Some(Lease::bare(Some(subnet), ipv6_subnet)),
        Err(error) => {
            debug!(%error, "ignoring delete of a bad subnet key");
            None
        }
    }
}

impl SubnetManager for EtcdSubnetManager {
    async fn network_config(&self) -> super::Result<NetworkConfig> {
        Ok(self.read_config().await?)
    }

    async fn acquire_lease(&self, attrs: &LeaseAttrs) -> super::Result<Lease> {
        let mut previous = self.previous;
        for attempt in 1..=ACQUIRE_ATTEMPTS {
            let cfg = self.read_config().await?;
            if !cfg.enable_ipv4 {
                return Err(Error::Ipv6Only.into());
            }
            if let Some(lease) = self.try_acquire(&cfg, attrs, &mut previous).await? {
                info!(subnet = %lease.subnets(), key = ?lease.key(), "acquired lease");
                return Ok(lease);
            }
            let pause = Duration::from_millis(rand::random_range(10..100) * u64::from(attempt));
            debug!(
                attempt,
                ?pause,
                "another host took the chosen subnet first; retrying"
            );
            tokio::time::sleep(pause).await;
        }
        Err(Error::AcquireRace {
            attempts: ACQUIRE_ATTEMPTS,
        }
        .into())
    }

    fn watch_leases(&self) -> BoxStream<'static, super::Result<LeaseEvent>> {
        watch::watch_leases(self.clone())
    }

    async fn complete_lease(&self, lease: &Lease, cancel: CancellationToken) -> super::Result<()> {
        Ok(self.complete(lease, cancel).await?)
    }

    async fn restore_lease(&self, lease: &Lease) -> super::Result<Lease> {
        self.restore(lease).await?;
        Ok(lease.clone())
    }

    async fn previous_lease(&self, public_ip: std::net::Ipv4Addr) -> super::Result<Option<Lease>> {
        let listing = self.list().await?;
        let found = listing
            .records
            .iter()
            .find(|r| r.lease.attrs.public_ip == public_ip)
            .map(|r| r.lease.clone());
        // The acquisition that follows at start-up decides on this read.
        self.leave_listing(listing);
        Ok(found)
    }
}

/// Builds watch options for a prefix from `revision`.
fn prefix_watch(revision: i64) -> WatchOptions {
    WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision)
}

/// Whether a watch event is a deletion.
fn is_delete(ev: &etcd_client::Event) -> bool {
    ev.event_type() == EventType::Delete
}
