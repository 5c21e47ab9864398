//! The contract between flannel's eBPF programs and the agent.
//!
//! Every type that crosses the kernel/user boundary lives here, exactly once. The rules:
//!
//! * `#[repr(C)]`, `Copy`, explicit padding fields, no `bool`/`Option`/references, so the
//!   bytes the agent writes are the bytes the program reads and padding is always zero
//!   (garbage in padding breaks hash lookups).
//! * Addresses are network-order byte arrays; ports and VNIs are host-order integers that the
//!   programs convert once.
//! * Sizes and field offsets are pinned by unit tests: an ABI change has to be deliberate,
//!   and comes with a new [`names::LAYOUT_VERSION`] so pinned maps of the old layout are
//!   never reused by mistake.
#![no_std]
#![deny(missing_docs)]

pub mod maps;
pub mod names;
pub mod stats;
pub mod wire;

pub use maps::{DatapathConfig, Endpoint, EndpointKey, Flow, FlowKey, Peer, PeerKey, Route};
pub use stats::{Counter, DropReason, PassReason, PathReason, PeerStats};
