//! Health endpoints (upstream `mustRunHealthz`): `/healthz` is liveness (always 200 once the
//! process serves), `/readyz` is 503 until the rules are installed and `subnet.env` is
//! written, then 200. Kubelets and load balancers probe these, so bodies match upstream.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{Router, extract::State, http::StatusCode, routing::get};
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

/// Shared readiness flag: set once, never cleared.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Marks the agent ready.
    pub fn mark_ready(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether the agent is ready.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

async fn healthz() -> &'static str {
    "flanneld is running"
}

async fn readyz(State(ready): State<Readiness>) -> (StatusCode, &'static str) {
    if ready.is_ready() {
        (StatusCode::OK, "flanneld is ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "flanneld is not ready yet")
    }
}

/// The router, for tests and embedding.
pub fn router(ready: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
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
        ready.mark_ready();
        let r = fetch(addr, "/readyz").await;
        assert!(
            r.starts_with("HTTP/1.1 200") && r.ends_with("flanneld is ready"),
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
