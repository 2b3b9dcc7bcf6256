//! Server plumbing shared by the agent and the collector: the accept loop, the HTTP/1.1
//! connection settings every listener uses, and waiting for a stop signal.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// How long a connection may take to send its request head (slow-loris guard).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections until `shutdown` flips; each one (with `TCP_NODELAY`) is handed to
/// `handle`, which runs in a task of its own. Accept errors (e.g. out of file descriptors)
/// are logged and retried after a short pause instead of ending the server.
pub async fn accept_loop<F, Fut>(listener: TcpListener, mut shutdown: watch::Receiver<bool>, handle: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(handle(stream, peer));
    }
}

/// The HTTP/1.1 server settings of every keytrail listener.
pub fn http1() -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder
}

/// Resolves on SIGTERM or SIGINT.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Runs a server's main future on a multi-threaded runtime; the error is one line for the
/// operator (`main` prints it and exits non-zero).
pub fn run_to_completion(main: impl Future<Output = anyhow::Result<()>>) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    runtime.block_on(main).map_err(|e| format!("{e:#}"))
}
