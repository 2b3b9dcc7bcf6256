//! keytrail-agent: the sidecar. Reads as a pipeline:
//! `ingest` (local API) → `buffer` (durable, sled) → `ship` (batch, compress, send, retry).
//! `config` parses contract §3's TOML; `telemetry` holds the counters every stage updates.

pub mod buffer;
pub mod config;
pub mod ingest;
pub mod proxy;
pub mod ship;
pub mod telemetry;

use std::sync::Arc;

use anyhow::Context as _;
use keytrail_common::fingerprint::Fingerprinter;

use crate::buffer::{Buffer, BufferLimits};
use crate::config::AgentConfig;
use crate::ship::{CollectorClient, ShipHealth};
use crate::telemetry::AgentMetrics;

/// Runs the agent until SIGTERM or SIGINT.
///
/// Shutdown order: stop accepting requests → stop sealer and shipper (a batch in flight is
/// simply resent next time) → let the writer answer what it holds → final flush.
pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let proxy_adapter = match &config.proxy {
        Some(p) => Some(proxy::adapter(p).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let fingerprinter = Fingerprinter::from_file(&config.fingerprint_secret_file).map_err(anyhow::Error::msg)?;
    keytrail_common::config::warn_if_exposed(
        &config.fingerprint_secret_file,
        "privacy.fingerprint_secret_file secret",
    );
    if let Some((_, key)) = &config.ship.client_cert {
        keytrail_common::config::warn_if_exposed(key, "ship.key private key");
    }
    let clock = Arc::new(ship::AgentClock::default());
    let client = CollectorClient::new(&config.ship, Arc::clone(&clock)).map_err(anyhow::Error::msg)?;
    let metrics = Arc::new(AgentMetrics::default());
    let limits = BufferLimits {
        max_bytes: config.max_bytes,
        when_full: config.when_full,
        cache_bytes: config.cache_bytes,
        batch_max_events: config.ship.batch_max_events,
        batch_max_bytes: config.ship.batch_max_bytes,
        zstd_level: config.ship.zstd_level,
    };
    let dir = config.buffer_dir.clone();
    let agent_id = config.agent_id.clone();
    let m = Arc::clone(&metrics);
    let buffer = tokio::task::spawn_blocking(move || Buffer::open(&dir, agent_id.as_deref(), limits, m))
        .await
        .context("opening the buffer")??;
    let appender = buffer.start_writer();
    let listener = tokio::net::TcpListener::bind(config.ingest_listen)
        .await
        .with_context(|| format!("binding the ingest API on {}", config.ingest_listen))?;
    let health = Arc::new(ShipHealth::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // The proxy: its listener, and the recorder that turns its exchanges into events.
    let mut proxy_addr = None;
    // Resolves when the recorder has finished (or its thread ended otherwise).
    let mut recorder_done = None;
    let mut proxy_thread = None;
    if let (Some(p), Some(adapter)) = (&config.proxy, proxy_adapter) {
        let upstream = proxy::Upstream::parse(&p.upstream).map_err(anyhow::Error::msg)?;
        let (tx, rx) = proxy::record_channel();
        let keep_headers = adapter.request_headers();
        let px = proxy::Proxy::new(
            upstream,
            p.upstream_ca.as_deref(),
            keep_headers,
            tx,
            Arc::clone(&metrics),
        )
        .map_err(anyhow::Error::msg)?;
        let l = tokio::net::TcpListener::bind(p.listen)
            .await
            .with_context(|| format!("binding the proxy on {}", p.listen))?;
        proxy_addr = Some(l.local_addr()?);
        let defaults = proxy::RecorderDefaults::new(
            buffer.agent_id().to_string(),
            config.context.clone(),
            Arc::clone(&clock),
        );
        let recorder = proxy::run_recorder(
            rx,
            Arc::from(adapter),
            Fingerprinter::from_file(&config.fingerprint_secret_file).map_err(anyhow::Error::msg)?,
            defaults,
            appender.clone(),
            Arc::clone(&metrics),
        );
        // Recording runs on a thread of its own, off the request path, at the normal priority;
        // its CPU work goes to a background thread at the lowest one, which it helps when that
        // falls behind (`proxy::encode`). A whole recorder at a low priority fell behind under
        // a saturating load: at nice +10, 0.7-2.4 % of calls went unrecorded (`queue_full`,
        // docs/benchmarks.md, session 19); at SCHED_IDLE, 0.9-12 % (session 21).
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        recorder_done = Some(done_rx);
        // Detached: at shutdown the agent waits for `done_rx` (bounded), not for the thread.
        std::thread::Builder::new()
            .name("keytrail-record".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt.block_on(recorder),
                    Err(e) => tracing::error!(error = %e, "starting the recorder's runtime failed; proxied calls are not recorded"),
                }
                drop(done_tx);
            })
            .context("starting the proxy's recorder thread")?;
        // The proxy runs on its own single-threaded runtime: a request, its upstream exchange
        // and its response stay on one thread, with no cross-core wake-ups on the request path
        // (the way nginx's event loop works). Recording runs on its own thread (above).
        let listener = l.into_std()?;
        let (px, stop) = (Arc::new(px), stop_rx.clone());
        proxy_thread = Some(
            std::thread::Builder::new()
                .name("keytrail-proxy".into())
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(rt) => rt,
                        Err(e) => {
                            tracing::error!(error = %e, "starting the proxy runtime failed; the proxy is down");
                            return;
                        }
                    };
                    rt.block_on(async move {
                        match tokio::net::TcpListener::from_std(listener) {
                            Ok(l) => proxy::serve(l, px, stop).await,
                            Err(e) => tracing::error!(error = %e, "the proxy listener failed; the proxy is down"),
                        }
                    });
                })
                .context("starting the proxy thread")?,
        );
    }
    let counts = buffer.counts();
    tracing::info!(
        agent_id = buffer.agent_id(),
        ingest = %listener.local_addr()?,
        proxy = proxy_addr.map(|a| a.to_string()),
        collector = %config.ship.collector,
        buffer = %config.buffer_dir.display(),
        buffered_events = counts.pending_events + counts.sealed_events,
        "keytrail-agent started"
    );

    let sealer = tokio::spawn(ship::run_sealer(
        Arc::clone(&buffer),
        config.ship.batch_timeout,
        stop_rx.clone(),
    ));
    let shipper = tokio::spawn(ship::run_shipper(
        Arc::clone(&buffer),
        client,
        config.ship.clone(),
        Arc::clone(&health),
        Arc::clone(&metrics),
        stop_rx.clone(),
    ));
    let inflight = ingest::Api::inflight_budget(&config);
    let api = Arc::new(ingest::Api {
        inflight,
        config,
        buffer: Arc::clone(&buffer),
        appender,
        fingerprinter,
        metrics,
        health,
        ids: ingest::EventIds::new(),
        clock,
    });
    let server = tokio::spawn(ingest::serve(listener, Arc::clone(&api), stop_rx));

    keytrail_common::serve::wait_for_signal().await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = server.await;
    // The proxy hands over what it staged and stops; then the recorder drains its queue into
    // the buffer (bounded wait), so a clean stop loses no proxied call.
    if let Some(t) = proxy_thread {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    if let Some(done) = recorder_done {
        // The sender is dropped when the recorder ends, however it ends.
        if tokio::time::timeout(std::time::Duration::from_secs(10), done)
            .await
            .is_err()
        {
            tracing::warn!("the proxy recorder did not drain within 10 s; the calls it has not recorded yet are lost");
        }
    }
    sealer.abort();
    shipper.abort();
    // Give handlers already waiting on the writer a moment to be answered.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    drop(api);
    let b = Arc::clone(&buffer);
    tokio::task::spawn_blocking(move || b.close()).await.ok();
    tracing::info!("stopped");
    Ok(())
}

/// `keytrail-agent validate`: the config and every file it names.
pub fn validate(config: &AgentConfig) -> Result<(), String> {
    config.check_files()
}
