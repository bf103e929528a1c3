//! The parts of `branchsync-server` that other crates use too: the HTTP
//! status server and client ([`http`]) and the chain's TLS ([`tls`]). The
//! daemon itself (config, link, node) lives in the `branchsync` binary,
//! which builds on this library; the scenario runner behind `branchsync
//! scenario run` and `demo` is a crate of its own (`branchsync-scenario`,
//! in `scenarios/runner/`), a client of the sites like an ERP.

pub mod http;
pub mod tls;
