//! repofs-server: git smart HTTP over a repofs mount (issue 3, in progress).
//!
//! So far: the sans-I/O pkt-line codec the protocol layer is built on.

pub mod pktline;
