//! keytrail-collector: receives batches from agents, deduplicates and stores them, and serves
//! analysts. Reads as `receive` (TLS, caps, identity) → `dedup` (what is new) → `store` (the
//! only sled user) → `api` (analyst routes). `errors` is the one status-code table; `config`
//! parses contract §3; `telemetry` holds the counters.

pub mod analytics;
pub mod api;
pub mod cli;
pub mod clock;
pub mod config;
pub mod dedup;
pub mod errors;
pub mod receive;
pub mod store;
pub mod telemetry;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use keytrail_common::wire::DecodeLimits;

use crate::config::CollectorConfig;
use crate::store::{Store, StoreOptions};
use crate::telemetry::CollectorMetrics;

/// How often retention runs (and once shortly after start).
const PURGE_EVERY: Duration = Duration::from_secs(3600);

/// Runs the collector until SIGTERM or SIGINT.
///
/// Shutdown order: stop accepting on both ports → let the store writer finish the group it
/// holds (agents whose request was cut off resend; duplicates are harmless) → final flush.
/// Says at start-up what an operator may not have meant: secrets other users can read, a
/// receive port that takes any agent id, an analyst API open to the network without a token.
fn warn_about_exposure(config: &CollectorConfig, token: bool) {
    use keytrail_common::config::warn_if_exposed;
    warn_if_exposed(&config.key, "receive.key private key");
    if let Some(t) = &config.token_file {
        warn_if_exposed(t, "api.token_file analyst token");
    }
    if config.client_ca.is_none() {
        tracing::warn!("receive.client_ca is not set: any TLS client can send batches under any agent id (no mTLS)");
    }
    if !token && !config.api_listen.ip().is_loopback() {
        tracing::warn!(
            api = %config.api_listen,
            "the analyst API listens beyond loopback without api.token_file: anyone who can reach it reads the data"
        );
    }
}

pub async fn run(config: CollectorConfig) -> anyhow::Result<()> {
    let token = config.read_token().map_err(anyhow::Error::msg)?;
    warn_about_exposure(&config, token.is_some());
    // Certificates, key and client CA are re-read when they change: rotation needs no restart.
    let (cert, key, ca) = (config.cert.clone(), config.key.clone(), config.client_ca.clone());
    let mut tls_files = vec![cert.clone(), key.clone()];
    tls_files.extend(ca.clone());
    let tls = keytrail_common::tls::Reloading::new("receive TLS", tls_files, move || {
        keytrail_common::tls::server_config(&cert, &key, ca.as_deref())
    })
    .map_err(anyhow::Error::msg)?;
    let dir = config.data_dir.clone();
    let options = StoreOptions {
        cache_bytes: config.cache_bytes,
        dedup_window: config.dedup_window,
        raw_events: config.raw_events,
        plans: config.plans.clone(),
        snapshot_every: crate::store::DEFAULT_SNAPSHOT_EVENTS,
        snapshot_bytes_per_event: crate::store::DEFAULT_SNAPSHOT_BYTES_PER_EVENT,
    };
    let store = tokio::task::spawn_blocking(move || Store::open(&dir, options)).await??;
    let writer = store.start_writer();
    let metrics = Arc::new(CollectorMetrics::default());
    let recv_listener = tokio::net::TcpListener::bind(config.receive_listen)
        .await
        .with_context(|| format!("binding the receive port {}", config.receive_listen))?;
    let api_listener = tokio::net::TcpListener::bind(config.api_listen)
        .await
        .with_context(|| format!("binding the API port {}", config.api_listen))?;
    tracing::info!(
        receive = %recv_listener.local_addr()?,
        api = %api_listener.local_addr()?,
        mtls = config.client_ca.is_some(),
        data_dir = %config.data_dir.display(),
        token = token.is_some(),
        "keytrail-collector started"
    );
    let receiver = Arc::new(receive::Receiver {
        writer,
        limits: DecodeLimits {
            max_frame_bytes: receive::Receiver::frame_cap(config.max_batch_bytes),
            max_uncompressed_bytes: config.max_batch_bytes as usize,
            max_events: config.max_batch_events,
        },
        mtls: config.client_ca.is_some(),
        store: Arc::clone(&store),
        metrics: Arc::clone(&metrics),
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let recv = tokio::spawn(receive::serve(recv_listener, Arc::new(tls), receiver, stop_rx.clone()));
    let api = Arc::new(api::Api {
        store: Arc::clone(&store),
        metrics,
        token,
    });
    let api_task = tokio::spawn(api::serve(api_listener, api, stop_rx));
    let purge_store = Arc::clone(&store);
    let purge = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(10)).await;
        loop {
            let s = Arc::clone(&purge_store);
            match tokio::task::spawn_blocking(move || s.purge(keytrail_common::time::now_ns())).await {
                Ok(Ok((raw, dedup))) if raw + dedup > 0 => {
                    tracing::info!(raw_events = raw, dedup_keys = dedup, "retention purge")
                }
                Ok(Err(e)) => tracing::error!(error = %e, "retention purge failed"),
                _ => {}
            }
            tokio::time::sleep(PURGE_EVERY).await;
        }
    });

    keytrail_common::serve::wait_for_signal().await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = recv.await;
    let _ = api_task.await;
    purge.abort();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let s = Arc::clone(&store);
    tokio::task::spawn_blocking(move || s.close()).await.ok();
    tracing::info!("stopped");
    Ok(())
}
