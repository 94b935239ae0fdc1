//! repofs-server: git smart HTTP over a repofs mount, with libgit2 doing the pack work
//! on the mounted repositories, and the block sync that keeps the database in step
//! with each agent's default branch.
//!
//! Layers: [`pktline`] and [`protocol`] are sans-I/O; [`git`] holds every libgit2 call
//! (all blocking); [`db`] the SQL; [`http`] the axum edge that maps errors to status
//! codes; [`server`] startup and shutdown.

pub mod auth;
pub mod blocks;
pub mod db;
pub mod git;
pub mod http;
pub mod metrics;
pub mod pktline;
pub mod protocol;
pub mod server;
pub mod sync;

/// Start the server with its block sync wired in (what `repofs-server serve` runs).
pub async fn start(cfg: server::ServerConfig) -> anyhow::Result<server::RunningServer> {
    server::start(cfg).await
}
