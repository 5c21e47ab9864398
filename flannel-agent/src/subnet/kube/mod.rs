//! The Kubernetes subnet manager (`--kube-subnet-mgr`): leases live on Node objects.
//!
//! The node's subnet is its `spec.podCIDR(s)` (kube-controller-manager allocates, flannel
//! never does); what peers need to reach it is published as annotations on the node (see
//! [`annotations`]), written through the `nodes/<name>/status` subresource exactly as
//! upstream does, so the ClusterRole needs only `nodes/status: patch`. Peers come from a
//! watch on all nodes, each (re)list becoming one [`LeaseEvent::Snapshot`]; no Node objects
//! are cached, only their leases.

pub use crate::wire::annotations;
pub mod client;
pub mod node;
pub mod watch;

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use futures::stream::BoxStream;
use k8s_openapi::{api::core::v1::Node, apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use self::client::{ClientOptions, client_from_options, node_name_from_env};
use self::{
    annotations::{AnnotationNames, PrefixError},
    node::{Families, NodeError, annotations_to_patch, node_to_lease, pod_cidrs, published_attrs},
};
use crate::{
    lease::{Lease, LeaseAttrs, LeaseEvent, LeaseRules, SubnetId},
    netconf::NetworkConfig,
    subnet::SubnetManager,
    wire::cidr::{self, Cidr},
};

/// Errors of the Kubernetes subnet manager.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--kube-annotation-prefix` is unusable.
    #[error("--kube-annotation-prefix: {0}")]
    Prefix(#[from] PrefixError),
    /// `--net-config-path` could not be read.
    #[error("failed to read net conf {path}: {source}")]
    ReadNetConf {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `--net-config-path` does not parse.
    #[error("error parsing subnet config {path}: {reason}")]
    ParseNetConf {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        reason: String,
    },
    /// The net conf enables a family but has no network for it.
    #[error("net conf {path}: {family} is enabled but {field} is not set")]
    NetworkMissing {
        /// The file.
        path: PathBuf,
        /// `IPv4` or `IPv6`.
        family: &'static str,
        /// `Network` or `IPv6Network`.
        field: &'static str,
    },
    /// Neither `NODE_NAME` nor `POD_NAME` + `POD_NAMESPACE` is set.
    #[error("cannot tell which node this is: set NODE_NAME (or POD_NAME and POD_NAMESPACE)")]
    NodeNameUnknown,
    /// The pod named by `POD_NAMESPACE/POD_NAME` has no `spec.nodeName`.
    #[error("pod {namespace}/{pod} has no spec.nodeName")]
    PodNotScheduled {
        /// `POD_NAMESPACE`.
        namespace: String,
        /// `POD_NAME`.
        pod: String,
    },
    /// Reading pod `POD_NAMESPACE/POD_NAME` (to learn its node) failed.
    #[error("get pod {namespace}/{pod} (to find this node's name): {source}")]
    PodLookup {
        /// `POD_NAMESPACE`.
        namespace: String,
        /// `POD_NAME`.
        pod: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// `--kubeconfig-file` could not be loaded.
    #[error("--kubeconfig-file {path}: {source}")]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// No flags and not running in a pod.
    #[error("no --kube-api-url/--kubeconfig-file given and the in-cluster config is unusable: {0}")]
    InCluster(#[source] kube::config::InClusterError),
    /// `--kube-api-url` is not a URL.
    #[error("--kube-api-url {url:?} is not a valid URL: {reason}")]
    ApiUrl {
        /// The flag value.
        url: String,
        /// Parser message.
        reason: String,
    },
    /// The HTTP client could not be built.
    #[error("building the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    /// An API call failed.
    #[error("{op} node {node}: {source}")]
    Api {
        /// What was attempted (`patch status of`).
        op: &'static str,
        /// The node.
        node: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// Our own node is unusable (no pod CIDR, bad pod CIDR…).
    #[error(transparent)]
    Node(#[from] NodeError),
    /// Our own node did not become usable in time.
    #[error("node {node} not usable after {waited:?}: {last}")]
    Timeout {
        /// The node.
        node: String,
        /// How long we retried.
        waited: Duration,
        /// The last failure.
        last: String,
    },
    /// The node's pod CIDR is outside the cluster network.
    #[error(
        "subnet {network} specified in the flannel net config doesn't contain {pod_cidr} \
         PodCIDR of node {node}"
    )]
    PodCidrOutsideNetwork {
        /// The node.
        node: String,
        /// Its pod CIDR.
        pod_cidr: String,
        /// `Network` / `IPv6Network` of the net conf.
        network: String,
    },
}

impl Error {
    /// Whether retrying may help: the API server was unreachable or our node is not ready
    /// yet (no object, no pod CIDR). Bad flags, a bad net conf or a pod CIDR outside the
    /// network need an operator.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Api { source, .. } | Self::PodLookup { source, .. } => match source {
                kube::Error::Api(status) => status.code == 429 || status.code >= 500,
                _ => true,
            },
            Self::Timeout { .. } => true,
            _ => false,
        }
    }
}

impl From<Error> for super::Error {
    fn from(e: Error) -> Self {
        Self::Kube(Box::new(e))
    }
}

/// Retry timing for reads and patches of our own node (upstream: every 3 s for 30 s).
#[derive(Clone, Copy, Debug)]
pub struct Retry {
    /// Pause between attempts.
    pub interval: Duration,
    /// Give up after this long.
    pub timeout: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(3),
            timeout: Duration::from_secs(30),
        }
    }
}

/// Leases on Kubernetes Node objects.
pub struct KubeSubnetManager {
    nodes: Api<Node>,
    node_name: String,
    names: Arc<AnnotationNames>,
    config: NetworkConfig,
    families: Families,
    node_public_ip: Option<Ipv4Addr>,
    node_public_ipv6: Option<Ipv6Addr>,
    set_node_network_unavailable: bool,
    retry: Retry,
}

impl std::fmt::Debug for KubeSubnetManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSubnetManager")
            .field("node_name", &self.node_name)
            .field("families", &self.families)
            .finish_non_exhaustive()
    }
}

/// Reads and parses `net-conf.json`. Upstream runs no `CheckNetworkConfig` in kube mode:
/// `SubnetLen`/`SubnetMin`/`SubnetMax` do not matter since the subnet is the pod CIDR.
pub fn read_net_conf(path: &Path) -> Result<NetworkConfig, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::ReadNetConf {
        path: path.to_owned(),
        source,
    })?;
    let config = NetworkConfig::parse(&text).map_err(|e| Error::ParseNetConf {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    if config.enable_ipv4 && config.network.is_none() {
        return Err(Error::NetworkMissing {
            path: path.to_owned(),
            family: "IPv4",
            field: "Network",
        });
    }
    if config.enable_ipv6 && config.ipv6_network.is_none() {
        return Err(Error::NetworkMissing {
            path: path.to_owned(),
            family: "IPv6",
            field: "IPv6Network",
        });
    }
    Ok(config)
}

impl KubeSubnetManager {
    /// Reads the net conf, normalises the annotation prefix and reads this node's
    /// `node-public-ip(v6)` annotations (waiting for the node object to exist, as upstream
    /// waits for its informer cache).
    pub async fn new(
        client: Client,
        node_name: String,
        net_conf_path: &Path,
        annotation_prefix: &str,
    ) -> Result<Self, Error> {
        Self::with_retry(
            client,
            node_name,
            net_conf_path,
            annotation_prefix,
            Retry::default(),
        )
        .await
    }

    /// [`Self::new`] with explicit retry timing (tests use short ones).
    pub async fn with_retry(
        client: Client,
        node_name: String,
        net_conf_path: &Path,
        annotation_prefix: &str,
        retry: Retry,
    ) -> Result<Self, Error> {
        let names = AnnotationNames::new(annotation_prefix)?;
        let config = read_net_conf(net_conf_path)?;
        let families = Families {
            ipv4: config.enable_ipv4,
            ipv6: config.enable_ipv6,
        };
        let mut this = Self {
            nodes: Api::all(client),
            node_name,
            names: Arc::new(names),
            config,
            families,
            node_public_ip: None,
            node_public_ipv6: None,
            set_node_network_unavailable: true,
            retry,
        };
        let node = this.wait_for_node(|_| Ok(())).await?;
        this.read_node_public_ips(&node);
        info!(node = %this.node_name, prefix = %annotation_prefix, "kube subnet manager ready");
        Ok(this)
    }

    /// Builds everything from upstream's flags: client from `--kube-api-url` /
    /// `--kubeconfig-file` (or in-cluster), node name from `NODE_NAME` (or the pod).
    pub async fn from_flags(
        client_opts: &ClientOptions,
        net_conf_path: &Path,
        annotation_prefix: &str,
    ) -> Result<Self, Error> {
        let client = client_from_options(client_opts).await?;
        let node_name = node_name_from_env(&client).await?;
        Self::new(client, node_name, net_conf_path, annotation_prefix).await
    }

    /// `--set-node-network-unavailable` (default true): whether [`SubnetManager::complete_lease`]
    /// clears the node's `NetworkUnavailable` condition.
    pub fn set_node_network_unavailable(mut self, on: bool) -> Self {
        self.set_node_network_unavailable = on;
        self
    }

    /// This node's name.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The normalised annotation names in use.
    pub fn annotation_names(&self) -> &AnnotationNames {
        &self.names
    }

    /// The `node-public-ip` annotation read at start-up: when set it replaces `--public-ip`
    /// (and so drives interface selection), as upstream does.
    pub fn node_public_ip(&self) -> Option<Ipv4Addr> {
        self.node_public_ip
    }

    /// The `node-public-ipv6` annotation read at start-up.
    pub fn node_public_ipv6(&self) -> Option<Ipv6Addr> {
        self.node_public_ipv6
    }

    fn read_node_public_ips(&mut self, node: &Node) {
        let ann = node.metadata.annotations.clone().unwrap_or_default();
        if let Some(v) = ann.get(&self.names.node_public_ip) {
            match v.parse() {
                Ok(ip) => self.node_public_ip = Some(ip),
                Err(error) => warn!(
                    node = %self.node_name, annotation = %self.names.node_public_ip, value = %v,
                    %error, "ignoring invalid node public IP annotation"
                ),
            }
        }
        if let Some(v) = ann.get(&self.names.node_public_ipv6) {
            match v.parse() {
                Ok(ip) => self.node_public_ipv6 = Some(ip),
                Err(error) => warn!(
                    node = %self.node_name, annotation = %self.names.node_public_ipv6, value = %v,
                    %error, "ignoring invalid node public IPv6 annotation"
                ),
            }
        }
    }

    /// GETs our node until it exists and `check` accepts it, every `retry.interval` for at
    /// most `retry.timeout`.
    async fn wait_for_node(
        &self,
        check: impl Fn(&Node) -> Result<(), Error>,
    ) -> Result<Node, Error> {
        let deadline = tokio::time::Instant::now() + self.retry.timeout;
        loop {
            let last = match self.nodes.get_opt(&self.node_name).await {
                Ok(Some(node)) => match check(&node) {
                    Ok(()) => return Ok(node),
                    Err(e) => e.to_string(),
                },
                Ok(None) => format!("node {} not found", self.node_name),
                Err(e) => e.to_string(),
            };
            if tokio::time::Instant::now() + self.retry.interval > deadline {
                return Err(Error::Timeout {
                    node: self.node_name.clone(),
                    waited: self.retry.timeout,
                    last,
                });
            }
            debug!(node = %self.node_name, reason = %last, "waiting for own node");
            tokio::time::sleep(self.retry.interval).await;
        }
    }

    /// Strategic-merge patch of our node's status subresource, retried like upstream.
    async fn patch_status(&self, patch: &serde_json::Value) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + self.retry.timeout;
        loop {
            let result = self
                .nodes
                .patch_status(
                    &self.node_name,
                    &PatchParams::default(),
                    &Patch::Strategic(patch),
                )
                .await;
            match result {
                Ok(_) => return Ok(()),
                Err(source) if tokio::time::Instant::now() + self.retry.interval > deadline => {
                    return Err(Error::Api {
                        op: "patch status of",
                        node: self.node_name.clone(),
                        source,
                    });
                }
                Err(error) => {
                    warn!(node = %self.node_name, %error, "patching node status failed, retrying");
                    tokio::time::sleep(self.retry.interval).await;
                }
            }
        }
    }

    /// Our subnets: the node's pod CIDR of each enabled family, which must lie inside that
    /// family's configured network. A disabled family's pod CIDR is not ours to use (an
    /// IPv6-only network on a dual-stack node leases the IPv6 one only).
    fn own_subnets(&self, node: &Node) -> Result<SubnetId, Error> {
        let cidrs = pod_cidrs(node)?;
        let subnet = if self.families.ipv4 {
            Some(self.own_family(cidrs.v4, self.config.network)?)
        } else {
            None
        };
        let ipv6_subnet = if self.families.ipv6 {
            Some(self.own_family(cidrs.v6, self.config.ipv6_network)?)
        } else {
            None
        };
        Ok((subnet, ipv6_subnet))
    }

    /// One enabled family's pod CIDR, checked against its network.
    fn own_family<N: Cidr>(&self, cidr: Option<N>, network: Option<N>) -> Result<N, Error> {
        let cidr = cidr.ok_or_else(|| NodeError::MissingFamily {
            node: self.node_name.clone(),
            family: N::FAMILY,
        })?;
        if let Some(network) = network
            && !cidr::contains(network, cidr)
        {
            return Err(Error::PodCidrOutsideNetwork {
                node: self.node_name.clone(),
                pod_cidr: cidr.to_string(),
                network: network.to_string(),
            });
        }
        Ok(cidr)
    }

    async fn acquire(&self, attrs: &LeaseAttrs) -> Result<Lease, Error> {
        // Wait for kube-controller-manager to assign a pod CIDR (a fresh node may not have
        // one for a few seconds); a CIDR outside the network fails at once.
        let node = self
            .wait_for_node(|n| match pod_cidrs(n) {
                Err(NodeError::PodCidrNotAssigned { .. }) => Err(NodeError::PodCidrNotAssigned {
                    node: self.node_name.clone(),
                }
                .into()),
                _ => Ok(()),
            })
            .await?;
        let (subnet, ipv6_subnet) = self.own_subnets(&node)?;
        // The lease as peers will read it (overwrites applied): what the agent later
        // compares its own node with.
        let lease = Lease {
            subnet,
            ipv6_subnet,
            extra_senders: Vec::new(),
            attrs: published_attrs(&node, &self.names, self.families, attrs),
        };
        let patch = annotations_to_patch(&node, &self.names, self.families, attrs);
        if patch.is_empty() {
            debug!(node = %self.node_name, "node annotations already up to date");
        } else {
            let keys: Vec<&str> = patch.keys().map(String::as_str).collect();
            info!(node = %self.node_name, annotations = ?keys, "publishing lease on node");
            self.patch_status(&serde_json::json!({ "metadata": { "annotations": patch } }))
                .await?;
        }
        info!(node = %self.node_name, subnet = %lease.subnets(), "lease acquired");
        Ok(lease)
    }

    async fn clear_network_unavailable(&self) -> Result<(), Error> {
        let now = serde_json::to_value(Time(Timestamp::now())).expect("timestamps serialise");
        let patch = serde_json::json!({
            "status": { "conditions": [{
                "type": "NetworkUnavailable",
                "status": "False",
                "reason": "FlannelIsUp",
                "message": "Flannel is running on this node",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }]}
        });
        self.patch_status(&patch).await
    }
}

impl SubnetManager for KubeSubnetManager {
    async fn network_config(&self) -> super::Result<NetworkConfig> {
        Ok(self.config.clone())
    }

    async fn acquire_lease(&self, attrs: &LeaseAttrs) -> super::Result<Lease> {
        Ok(self.acquire(attrs).await?)
    }

    fn watch_leases(&self) -> BoxStream<'static, super::Result<LeaseEvent>> {
        watch::lease_events(
            self.nodes.clone(),
            Arc::clone(&self.names),
            self.families,
            LeaseRules::new(&self.config).any_length(),
        )
    }

    async fn complete_lease(&self, _lease: &Lease, cancel: CancellationToken) -> super::Result<()> {
        if self.set_node_network_unavailable {
            tokio::select! {
                result = self.clear_network_unavailable() => match result {
                    Ok(()) => info!(node = %self.node_name, "cleared NetworkUnavailable"),
                    // Upstream only logs this: the datapath works regardless.
                    Err(error) => warn!(node = %self.node_name, %error, "could not clear NetworkUnavailable"),
                },
                () = cancel.cancelled() => return Ok(()),
            }
        }
        // Nothing to renew in kube mode: the lease lives as long as the node object.
        cancel.cancelled().await;
        Ok(())
    }

    async fn previous_lease(&self, _public_ip: Ipv4Addr) -> super::Result<Option<Lease>> {
        // Our own node object is this host's identity; its annotations are the lease.
        let node =
            self.nodes.get_opt(&self.node_name).await.map_err(|e| {
                super::Error::Other(format!("reading node {}: {e}", self.node_name))
            })?;
        Ok(node.and_then(|n| node_to_lease(&n, &self.names, self.families).ok()))
    }

    async fn restore_lease(&self, lease: &Lease) -> super::Result<Lease> {
        // The subnet is the node's pod CIDR, so publishing the attributes again is the
        // whole restore; a changed pod CIDR is not ours to undo.
        let now = self.acquire(&lease.attrs).await?;
        if now.id() != lease.id() {
            return Err(super::Error::Other(format!(
                "node {}: pod CIDR is now {} instead of {}; restart flanneld to re-register",
                self.node_name,
                now.subnets(),
                lease.subnets()
            )));
        }
        Ok(now)
    }
}
