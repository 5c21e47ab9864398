//! Keeps the client's balancer on live etcd members.
//!
//! etcd-client balances requests over every `--etcd-endpoints` entry, and a dead member
//! looks ready to it: each request routed there fails at once, which makes that member
//! the least loaded and so the one picked next. Left alone, renewals and lists keep
//! failing while two healthy members sit idle (measured: a 6 s lease expired with a third
//! of the cluster down). So every endpoint is probed once a second on a connection of its
//! own (`Status`, bounded by a timeout); one that fails is taken out of the balancer, and
//! put back as soon as it answers again. The last live endpoint is never removed: with all
//! of them down, the requests' own retries decide.

use std::{collections::BTreeMap, time::Duration};

use etcd_client::{Client, ConnectOptions};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How often each endpoint is probed.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long a probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Probe `endpoints` until `cancel` fires, adding and removing them on `client`.
pub(super) async fn run(
    client: Client,
    endpoints: Vec<String>,
    options: ConnectOptions,
    cancel: CancellationToken,
) {
    // Per endpoint: its probe connection (dropped after a failure) and whether it is in the
    // balancer.
    let mut state: BTreeMap<String, (Option<Client>, bool)> =
        endpoints.into_iter().map(|e| (e, (None, true))).collect();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(PROBE_EVERY) => {}
        }
        for (endpoint, (probe, in_use)) in &mut state {
            let alive = probe_once(endpoint, probe, &options).await;
            if alive && !*in_use {
                match client.add_endpoint(endpoint.as_str()).await {
                    Ok(()) => {
                        info!(%endpoint, "etcd endpoint answers again; using it");
                        *in_use = true;
                    }
                    Err(error) => warn!(%endpoint, %error, "cannot re-add etcd endpoint"),
                }
            } else if !alive && *in_use {
                match client.remove_endpoint(endpoint.as_str()).await {
                    Ok(()) => {
                        warn!(%endpoint, "etcd endpoint unreachable; sending requests to the other endpoints");
                        *in_use = false;
                    }
                    Err(error) => warn!(%endpoint, %error, "cannot remove etcd endpoint"),
                }
            }
        }
        // Never leave the balancer empty: if nothing answered, put everything back and let
        // the callers' retries find whichever member returns first.
        if state.values().all(|(_, in_use)| !in_use) {
            for (endpoint, (_, in_use)) in &mut state {
                if client.add_endpoint(endpoint.as_str()).await.is_ok() {
                    *in_use = true;
                }
            }
        }
    }
}

/// One probe: `Status` on the endpoint's own connection, made if needed.
async fn probe_once(endpoint: &str, probe: &mut Option<Client>, options: &ConnectOptions) -> bool {
    let attempt = async {
        if probe.is_none() {
            *probe = Some(Client::connect([endpoint], Some(options.clone())).await?);
        }
        probe.as_mut().expect("just set").status().await.map(drop)
    };
    match tokio::time::timeout(PROBE_TIMEOUT, attempt).await {
        Ok(Ok(())) => true,
        _ => {
            *probe = None;
            false
        }
    }
}
