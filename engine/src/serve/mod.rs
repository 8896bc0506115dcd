//! `ccluster serve`: the HTTP API (runs, tasks, logs, artifacts, reports, plans; starting,
//! cancelling and retrying runs), its live event streams, and the web dashboard, over the state
//! directories of one or more repositories.
//!
//! The server never holds a state's writer: runs are driven by `ccluster apply` processes (the
//! server starts its own runs as such processes), and the server reads what every driver leaves for
//! readers — the archives of finished runs, the live snapshots and the event logs of runs in
//! progress (docs/architecture.md, "Serving").

pub mod dashboard;

use std::net::SocketAddr;
use std::path::PathBuf;

use axum::routing::get;
use axum::Router;

/// What `ccluster serve` was asked for.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub addr: SocketAddr,
    /// Repository directories whose `.ccluster/` state is served.
    pub repos: Vec<PathBuf>,
    /// The `ccluster` binary that runs started by the server are driven by.
    pub exe: PathBuf,
}

/// The server's routes.
pub fn router(_config: &ServeConfig) -> Router {
    Router::new()
        .route("/", get(dashboard::index))
        .route("/assets/{file}", get(dashboard::asset))
}

/// Serves until the process is stopped.
pub async fn serve(config: ServeConfig) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.addr).await?;
    axum::serve(listener, router(&config)).await
}
