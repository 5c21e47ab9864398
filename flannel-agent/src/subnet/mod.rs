//! Subnet managers: where leases live. One trait, two implementations (etcd, Kubernetes),
//! chosen once at start-up.

use std::future::Future;

use futures::stream::BoxStream;
use tokio_util::sync::CancellationToken;

use crate::{
    lease::{Lease, LeaseAttrs, LeaseEvent},
    netconf::NetworkConfig,
};

pub mod env_file;
pub mod etcd;
pub mod kube;

/// Errors of the subnet managers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Anything else, with context.
    #[error("{0}")]
    Other(String),
    /// The Kubernetes subnet manager failed.
    #[error(transparent)]
    Kube(Box<self::kube::Error>),
    /// The etcd subnet manager failed.
    #[error(transparent)]
    Etcd(Box<self::etcd::Error>),
}

impl Error {
    /// Whether the same call may succeed later (store unreachable, config not written yet,
    /// a lost race) rather than a configuration problem that retrying cannot fix.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Etcd(e) => e.is_transient(),
            Self::Kube(e) => e.is_transient(),
            Self::Other(_) => false,
        }
    }
}

impl From<self::etcd::Error> for Error {
    fn from(e: self::etcd::Error) -> Self {
        Self::Etcd(Box::new(e))
    }
}

/// Result of subnet manager operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A source of leases.
pub trait SubnetManager: Send + Sync {
    /// The cluster network configuration (validated).
    fn network_config(&self) -> impl Future<Output = Result<NetworkConfig>> + Send;

    /// Acquire (or re-acquire after a restart) this host's lease, publishing `attrs`.
    fn acquire_lease(&self, attrs: &LeaseAttrs) -> impl Future<Output = Result<Lease>> + Send;

    /// Every lease in the cluster, this host's included: a [`LeaseEvent::Snapshot`] first,
    /// then changes; a new snapshot after any gap (reconnect, compaction, relist). The first
    /// snapshot after [`Self::acquire_lease`] may be the acquisition's own read of the
    /// leases (etcd), with the changes since it following, so a start reads them once.
    fn watch_leases(&self) -> BoxStream<'static, Result<LeaseEvent>>;

    /// Keep `lease` alive until `cancel` fires (etcd: renew before expiry, putting the key
    /// back if it is gone; kube: clear the node's NetworkUnavailable condition). Returns an
    /// error if the lease can't be kept.
    fn complete_lease(
        &self,
        lease: &Lease,
        cancel: CancellationToken,
    ) -> impl Future<Output = Result<()>> + Send;

    /// The lease this host (identified by its public IP) published before, if the store
    /// still has it: where the VTEP MAC survives a reboot.
    fn previous_lease(
        &self,
        public_ip: std::net::Ipv4Addr,
    ) -> impl Future<Output = Result<Option<Lease>>> + Send;

    /// Publish this host's `lease` again exactly as acquired, after someone overwrote or
    /// deleted it in the store (or with a new address, after the uplink's changed). The
    /// subnet stays this host's: its pods hold addresses in it, and every peer must keep
    /// routing it here. Returns the lease as published (kube: with the node's
    /// `public-ip-overwrite` applied), which the own-lease watch compares with.
    fn restore_lease(&self, lease: &Lease) -> impl Future<Output = Result<Lease>> + Send;
}
