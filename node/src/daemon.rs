//! The node process: `run` opens a home, starts the node and network actors and the HTTP API,
//! supervises them, and stops them on Ctrl-C or SIGTERM.

use std::sync::Arc;

use tokio::sync::watch;
use tracing::Instrument;

use crate::atomic::write_atomic;
use crate::config::{Config, Home};
use crate::core::{Core, OpenError, ReadError};
use crate::net::{Fault, NetCounters, NetError, build_swarm};
use crate::node::spawn;

/// Why a node could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("another tidesync node is already running on {home}{api}")]
    AlreadyRunning {
        home: std::path::PathBuf,
        api: String,
    },
    #[error("cannot read the change log of {home}: {source}")]
    Read {
        home: std::path::PathBuf,
        source: ReadError,
    },
    #[error("cannot listen for the HTTP API on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot write {file}: {source}")]
    ApiFile {
        file: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("the HTTP API failed: {0}")]
    Serve(std::io::Error),
    #[error(
        "the node's actor stopped unexpectedly ({0}); the node exits rather than answer 503 for ever"
    )]
    ActorDied(String),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Prepare(#[from] crate::api::PrepareError),
}

/// Run the node on `home` until Ctrl-C or SIGTERM.
pub async fn run(home: &Home) -> Result<(), RunError> {
    let mut config = Config::load(home).map_err(OpenError::from)?;
    let core = match Core::open(home, &config, true) {
        Ok(core) => core,
        Err(OpenError::Store(crate::store::StoreError::InUse { .. })) => {
            let api = std::fs::read_to_string(home.api_file())
                .map(|a| format!(" (its API is at {})", a.trim()))
                .unwrap_or_default();
            return Err(RunError::AlreadyRunning {
                home: home.dir.clone(),
                api,
            });
        }
        Err(e) => return Err(e.into()),
    };
    let span = tracing::info_span!("node", name = %config.name, id = %core.node_id().short());
    async move {
        let token = crate::api::prepare_home(home, &mut config)?;
        let mut core = core;
        let fault = Fault::from_env();
        if fault != Fault::None {
            tracing::warn!(
                ?fault,
                "TEST FAULT ENABLED: this node misbehaves on purpose"
            );
        }
        core.inject_process_fault(fault);
        let counters = Arc::new(NetCounters::default());
        let mut swarm = build_swarm(
            core.identity(),
            fault,
            Arc::clone(&counters),
            config.discovery.mdns,
        )?;
        for addr in &config.listen {
            swarm
                .listen_on(addr.clone())
                .map_err(|e| NetError::Listen {
                    addr: addr.clone(),
                    detail: e.to_string(),
                })?;
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let instruments = crate::metrics::Instruments::new();
        let metrics = instruments.metrics.clone();
        let (handle, actor) = spawn(
            core,
            swarm,
            home.clone(),
            config.clone(),
            counters,
            instruments,
            stop_rx.clone(),
        )
        .map_err(|source| RunError::Read {
            home: home.dir.clone(),
            source,
        })?;
        let listener = tokio::net::TcpListener::bind(config.api.listen)
            .await
            .map_err(|source| RunError::Bind {
                addr: config.api.listen,
                source,
            })?;
        let bound = listener.local_addr().map_err(|source| RunError::Bind {
            addr: config.api.listen,
            source,
        })?;
        write_atomic(&home.api_file(), format!("{bound}\n").as_bytes(), 0o600).map_err(
            |source| RunError::ApiFile {
                file: home.api_file(),
                source,
            },
        )?;
        tracing::info!(node = %handle.info().node, api = %bound, "node running");

        let signals = shutdown_signal().map_err(RunError::Signals)?;
        let guard = crate::api::Guard::new(bound, &config.api.hosts, token);
        let app = crate::api::router(handle.clone(), guard, home.dir.clone(), metrics);
        let served = crate::api::serve(listener, app, stop_rx.clone());
        let served = tokio::spawn(served.in_current_span());
        // The actor is supervised: should it ever stop before we ask it to (a panic that
        // escaped every guard), the process logs why and exits non-zero, rather than keep
        // an API that answers 503 to everything. Its store is released only as the
        // process ends.
        let mut actor = actor;
        let died = tokio::select! {
            _ = signals => None,
            ended = &mut actor => Some(match ended {
                Err(e) if e.is_panic() => {
                    let panic = e.into_panic();
                    panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .map(|m| format!("it panicked: {m}"))
                        .unwrap_or_else(|| "it panicked".to_string())
                }
                Err(e) => format!("it was cancelled: {e}"),
                Ok(()) => "it returned".to_string(),
            }),
        };
        if let Some(why) = &died {
            tracing::error!(reason = %why, "the node's actor stopped; exiting");
        } else {
            tracing::info!("stopping");
        }
        let _ = stop_tx.send(true);
        if let Some(why) = died {
            served.abort();
            let _ = std::fs::remove_file(home.api_file());
            return Err(RunError::ActorDied(why));
        }
        let served = served.await;
        let _ = actor.await;
        let _ = std::fs::remove_file(home.api_file());
        tracing::info!("stopped");
        match served {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(RunError::Serve(e)),
            Err(e) => Err(RunError::Serve(std::io::Error::other(e))),
        }
    }
    .instrument(span)
    .await
}

/// Resolves on Ctrl-C or SIGTERM.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    })
}
