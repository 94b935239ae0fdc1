//! repofs-server
