//! SKELETON: to be written (kernel datapaths work). The constructor signature is the
//! contract with the agent.
#![allow(unused_variables, reason = "skeleton")]

use crate::backend::{Backend, Error, ExternalInterface, Result};
use crate::lease::{Lease, LeaseAttrs};
#[allow(unused_imports, reason = "skeleton")]
use crate::netconf::VxlanConfig;

/// SKELETON.
pub struct EbpfVxlan;

impl EbpfVxlan {
    /// Build the backend for this host.
    pub async fn new(ext: ExternalInterface, config: VxlanConfig, pin_root: std::path::PathBuf) -> Result<Self> {
        Err(Error::Other("not implemented yet".into()))
    }
}

impl Backend for EbpfVxlan {
    async fn prepare(&mut self) -> Result<LeaseAttrs> {
        Err(Error::Other("not implemented yet".into()))
    }
    async fn register(&mut self, own: &Lease) -> Result<()> {
        Ok(())
    }
    async fn add_peer(&mut self, peer: &Lease) -> Result<()> {
        Ok(())
    }
    async fn remove_peer(&mut self, peer: &Lease) -> Result<()> {
        Ok(())
    }
    async fn reconcile(&mut self, peers: &[Lease]) -> Result<()> {
        Ok(())
    }
    fn mtu(&self) -> u32 {
        0
    }
}
