//! repofs: a FUSE filesystem that keeps git repositories in object storage.
//!
//! The store (`file://`, `memory://`, `s3://`, `gs://`) is shown as a tree; inside any
//! `*.git` directory the filesystem knows git's file classes (see [`classify`]) and
//! applies write-back with git's ordering: objects are stored before the refs that
//! point at them, refs are published with compare-and-swap, and every ref change is
//! reported as a [`RefUpdated`] event.
//!
//! Layers: [`store`] (object store with retries and counters), [`cache`] (bounded disk
//! cache), [`fs`] (the filesystem core, no FUSE), `fuse` (the adapter), [`mount`]
//! (configuration and mounting, used by the `repofs` binary and in-process by the
//! server).

pub mod cache;
pub mod classify;
pub mod error;
pub mod fs;
mod fuse;
pub mod mount;
pub mod refs;
pub mod stats;
pub mod store;

pub use error::FsError;
pub use fs::Fs;
pub use mount::{parse_size, MountConfig, MountHandle};
pub use refs::{Oid, RefUpdated};
pub use stats::StatsSnapshot;
