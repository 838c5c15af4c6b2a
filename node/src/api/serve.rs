//! The API's HTTP server: hyper's HTTP/1 connections with a header-read timeout, at most
//! [`MAX_API_CONNECTIONS`] at a time, and a graceful stop.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tracing::Instrument;

/// Most API connections open at once; further clients wait in the listen backlog until one
/// closes. Bounds the node's file descriptors and memory against a flood of connections.
pub const MAX_API_CONNECTIONS: usize = 256;
/// Longest a client may take to send a request's headers, in seconds, counted from when the
/// server starts reading them (a new connection, or the next request on a kept-alive one);
/// then the connection is closed. Stops half-open requests from holding connections.
pub const HEADER_READ_TIMEOUT_SECS: u64 = 10;
/// How long the server pauses accepting after `accept` fails (out of file descriptors), in
/// milliseconds, so that it does not spin.
pub const ACCEPT_RETRY_MS: u64 = 100;

/// Serve `app` on `listener` until `stop` turns true; then stop accepting, let each
/// connection finish its request in flight, and return once all are closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_API_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stop.wait_for(|s| *s) => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|s| *s) => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "the API cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(ACCEPT_RETRY_MS)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let mut stop = stop.clone();
        let connection = async move {
            let _permit = permit;
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(HEADER_READ_TIMEOUT_SECS))
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let finished = tokio::select! {
                result = conn.as_mut() => Some(result),
                _ = stop.wait_for(|s| *s) => None,
            };
            let result = match finished {
                Some(result) => result,
                None => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "API connection closed");
            }
        };
        tokio::spawn(connection.in_current_span());
    }
    // Every connection gives its slot back when it closes.
    let _ = slots.acquire_many(MAX_API_CONNECTIONS as u32).await;
    Ok(())
}
