//! Health endpoints (upstream `mustRunHealthz`): `/healthz` is liveness (always 200 once the
//! process serves), `/readyz` is 503 until the rules are installed and `subnet.env` is
//! written, then 200. Kubelets and load balancers probe these, so bodies match upstream;
//! which datapath runs (and why eBPF fell back, if it did) is the `X-Flannel-Datapath`
//! header of `/readyz`.
//! `/metrics` serves [`crate::metrics`] in the Prometheus text format.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{Router, extract::State, http::StatusCode, routing::get};

use crate::backend::ebpf::FallbackReason;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Why the health server could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Binding the listen address failed.
    #[error("health server: cannot listen on {addr}: {source}")]
    Bind {
        /// `--healthz-ip:--healthz-port`.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Which datapath carries pod traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DatapathStatus {
    /// Our eBPF VXLAN programs.
    Ebpf,
    /// The kernel VXLAN device, as configured (`--dataplane=kernel`).
    Kernel,
    /// The kernel VXLAN device because eBPF could not run (`--dataplane=auto`).
    KernelFallback(FallbackReason),
    /// host-gw routes.
    HostGw,
}

impl DatapathStatus {
    /// A stable label: `ebpf`, `kernel`, `host-gw`, or `kernel-fallback:<reason kind>`
    /// (a metric label value too).
    pub fn label(&self) -> String {
        match self {
            Self::Ebpf => "ebpf".into(),
            Self::Kernel => "kernel".into(),
            Self::KernelFallback(reason) => format!("kernel-fallback:{}", reason.kind()),
            Self::HostGw => "host-gw".into(),
        }
    }
}

/// Shared readiness: a flag set once, never cleared, and the datapath chosen at start.
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    ready: Arc<AtomicBool>,
    datapath: Arc<Mutex<Option<DatapathStatus>>>,
}

impl Readiness {
    /// Marks the agent ready.
    pub fn mark_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    /// Whether the agent is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Records the datapath the backend runs.
    pub fn set_datapath(&self, status: DatapathStatus) {
        *self.datapath.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
    }

    /// The datapath, once the backend is built.
    pub fn datapath(&self) -> Option<DatapathStatus> {
        self.datapath
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

async fn healthz() -> &'static str {
    "flanneld is running"
}

async fn readyz(
    State(ready): State<Readiness>,
) -> (StatusCode, [(&'static str, String); 1], &'static str) {
    let datapath = ready
        .datapath()
        .map_or_else(|| "none".into(), |d| d.label());
    let header = [("x-flannel-datapath", datapath)];
    if ready.is_ready() {
        (StatusCode::OK, header, "flanneld is ready")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            header,
            "flanneld is not ready yet",
        )
    }
}

async fn metrics() -> ([(http::header::HeaderName, &'static str); 1], String) {
    // Reading the pinned maps is a few thousand syscalls at most: off the async workers.
    let body = tokio::task::spawn_blocking(|| crate::metrics::get().encode())
        .await
        .unwrap_or_default();
    (
        [(http::header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        body,
    )
}

/// The router, for tests and embedding.
pub fn router(ready: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(ready)
}

/// Binds `addr` and serves until `cancel` fires. Returns the bound address (useful with
/// port 0) and the server task.
pub async fn start(
    addr: SocketAddr,
    ready: Readiness,
    cancel: CancellationToken,
) -> Result<(SocketAddr, JoinHandle<()>), Error> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })?;
    let local = listener.local_addr().unwrap_or(addr);
    info!(addr = %local, "health server listening");
    let task = tokio::spawn(async move {
        let shutdown = async move { cancel.cancelled().await };
        if let Err(error) = axum::serve(listener, router(ready))
            .with_graceful_shutdown(shutdown)
            .await
        {
            warn!(%error, "health server stopped");
        }
    });
    Ok((local, task))
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn fetch(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn healthz_and_readyz() {
        let ready = Readiness::default();
        let cancel = CancellationToken::new();
        let (addr, task) = start(
            "127.0.0.1:0".parse().unwrap(),
            ready.clone(),
            cancel.clone(),
        )
        .await
        .unwrap();
        let h = fetch(addr, "/healthz").await;
        assert!(
            h.starts_with("HTTP/1.1 200") && h.ends_with("flanneld is running"),
            "{h}"
        );
        let r = fetch(addr, "/readyz").await;
        assert!(
            r.starts_with("HTTP/1.1 503") && r.ends_with("flanneld is not ready yet"),
            "{r}"
        );
        assert!(r.contains("x-flannel-datapath: none"), "{r}");
        ready.set_datapath(DatapathStatus::KernelFallback(FallbackReason::NoBtf));
        ready.mark_ready();
        let r = fetch(addr, "/readyz").await;
        assert!(
            r.starts_with("HTTP/1.1 200") && r.ends_with("flanneld is ready"),
            "{r}"
        );
        assert!(
            r.contains("x-flannel-datapath: kernel-fallback:no_btf"),
            "{r}"
        );
        cancel.cancel();
        task.await.unwrap();
        // Busy port: a clear error naming the address.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = l.local_addr().unwrap();
        let err = start(busy, ready, CancellationToken::new())
            .await
            .unwrap_err();
        assert!(err.to_string().contains(&busy.to_string()));
    }
}
