//! flanneld: gives every pod in a cluster a routable IP.
//!
//! The agent leases this host a subnet of the cluster network from a [`subnet`] manager
//! (etcd or the Kubernetes API), watches every other host's lease, and programs a
//! [`backend`] (eBPF VXLAN, kernel VXLAN or host-gw) so pod traffic reaches them. The
//! [`agent`] module wires those together; everything else is one concern per module.

pub mod agent;
pub mod backend;
pub mod cleanup;
pub mod cli;
pub mod cni;
pub mod config;
pub mod docker_opts;
pub mod inspect;
pub mod lease;
pub mod metrics;
pub mod net;
pub mod netconf;
pub mod repair;
pub mod server;
pub mod subnet;
pub mod telemetry;
pub mod version;
pub mod wire;
