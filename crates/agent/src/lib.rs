//! The dwcp node agent: one per computer. It keeps the node's VMs in an
//! embedded store, runs each in a QEMU process (through `dwcp-hypervisor`),
//! watches them, and serves the REST API that the CLI talks to.
//!
//! - [`AgentConfig`]: settings, from TOML, env and flags.
//! - [`Manager`]: the VMs: create, start, stop, pause, resume, delete;
//!   re-attaches to QEMU processes after an agent restart ([`Manager::recover`]).
//! - [`store`]: the redb store of VM records.
//! - [`http`]: the axum router and the OpenAPI document.
//!
//! Call order: [`run`] does `Manager::open` → bind the API → `recover` in the
//! background → serve until the shutdown future resolves. QEMU processes are
//! left running when the agent exits; the next agent finds them again.
//!
//! Checkpoints ([`Manager::checkpoint`], [`Manager::restore`]) go through
//! the VM image stream (`dwcp-vmstream`) into the page store (`dwcp-hde`,
//! `DATA/pages.redb`).
//!
//! What it does not do (yet): talk to other nodes or migrate.

mod checkpoint;
pub mod config;
mod footprint;
pub mod http;
pub mod manager;
pub mod migrate;
pub mod peers;
pub mod store;
mod warm;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;

pub use config::{AccelChoice, AgentConfig, ConfigError};
pub use manager::{format_chain, AgentError, Manager};

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot create the data directory {path}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Qemu(#[from] dwcp_hypervisor::QemuError),
    #[error("cannot open the page store")]
    Pages(#[from] dwcp_hde::HdeError),
    #[error("cannot load this node's certificate")]
    Identity(#[source] dwcp_transport::identity::IdentityError),
    #[error("cannot start the AMST listener")]
    Transport(#[source] dwcp_transport::TransportError),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the API server failed")]
    Serve(#[source] std::io::Error),
}

/// Runs the agent until `shutdown` resolves. `on_listening` is told the
/// bound API address (useful with port 0).
pub async fn run(
    cfg: AgentConfig,
    on_listening: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    cfg.validate()?;
    let manager = Manager::open(cfg.clone()).await?;
    let listener = tokio::net::TcpListener::bind(cfg.api)
        .await
        .map_err(|source| StartError::Listen {
            addr: cfg.api,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Listen {
        addr: cfg.api,
        source,
    })?;
    let _ = std::fs::write(cfg.data_dir.join("api.addr"), addr.to_string());
    tracing::info!(%addr, data_dir = %cfg.data_dir.display(), "agent API listening");
    on_listening(addr);
    let recovering = manager.clone();
    tokio::spawn(async move { recovering.recover().await });
    axum::serve(listener, http::router(manager.clone()))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(StartError::Serve)?;
    let running = manager
        .list()
        .iter()
        .filter(|v| v.state.has_process())
        .count();
    tracing::info!(
        running,
        "agent stopped; running VMs are left running and will be re-attached at the next start"
    );
    Ok(())
}
